"""WebDataset tars written from shard rows, for the tests that read them."""

import io
import json
import tarfile
from pathlib import Path


def write_webdataset(rows: dict, folder: Path, per_tar: int = 200) -> None:
    folder.mkdir(parents=True)
    for start in range(0, len(rows["key"]), per_tar):
        with tarfile.open(folder / f"shard-{start // per_tar:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_tar, len(rows["key"]))):
                key, caption = rows["key"][i], rows["caption"][i]
                members = {"png": rows["image"][i], "txt": caption if isinstance(caption, bytes) else caption.encode(),
                           "cls": str(rows["label"][i]).encode(), "json": json.dumps({"image_id": rows["image_id"][i]}).encode()}
                for ext, data in members.items():
                    if data is None:  # a sample without an image
                        continue
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
