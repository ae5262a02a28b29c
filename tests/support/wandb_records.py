"""Reading a W&B offline run's transaction log (``run-<id>.wandb``) without W&B's servers.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, a 2-byte magic, a version byte),
then records in 32 KiB blocks, each chunk with a 7-byte header (CRC-32C, little-endian length,
type: full / first / middle / last); each record is a ``wandb_internal_pb2.Record``. W&B's own
Python reader went into its Go core, so the tests read it here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no W&B transaction log"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path) -> list[tuple[int, dict]]:
    """``(step, {key: value})`` of every ``run.log`` call, in order."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.append((record.history.step.num, items))
    return rows
