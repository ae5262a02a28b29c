"""The chaos soak's short schedule (``benchmarks/chaos.py --minutes 5``): one training run on a
three-node local cluster through seven kinds of fault — a killed worker, a killed raylet, a
reclaimed node, a full disk, an S3 outage, a killed driver resumed with ``--resume``, a shard
garbled mid-epoch — that loses no row, trains none twice and keeps the losses of the same run
left alone. The soak checks all of that itself and exits 1 on any miss; this test runs it
and reads its table."""

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1500)  # the uninterrupted run and the soak: about 8 minutes on 2 cores
@pytest.mark.skipif(os.geteuid() != 0, reason="the soak mounts a tmpfs as the nodes' disk, which needs root")
def test_a_short_chaos_soak_survives_every_fault_and_loses_nothing(repo_root, tmp_path):
    # Its own process group: whatever happens here, none of its cluster's processes outlive it.
    # A step of this run takes about 1 s with its evaluations and checkpoints: 10 epochs, 120
    # steps, about 30 past the last fault (fired at steps 88–91 in runs here).
    soak = subprocess.Popen([sys.executable, "benchmarks/chaos.py", "--minutes", "5", "--seed", "0", "--step-seconds", "1.0",
                             "--workdir", str(tmp_path / "soak")],
                            cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = soak.communicate(timeout=1400)
    finally:
        if soak.poll() is None:
            os.killpg(soak.pid, signal.SIGTERM)  # the soak unmounts and shuts its cluster down
            try:
                soak.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(soak.pid, signal.SIGKILL)
    assert soak.returncode == 0, out[-4000:] + err[-2000:]
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    kinds = {row[1].strip() for row in rows}
    assert len(rows) >= 7 and len(kinds) >= 6, out[-3000:]
    assert all(row[6].strip() == "yes" for row in rows), out[-3000:]
    assert {"worker kill", "raylet kill", "node reclaim", "disk full", "s3 outage", "driver kill",
            "shard unreadable"} <= kinds
    summary = next(line for line in out.splitlines() if line.startswith("faults injected"))
    assert "resumed from 0" in summary and "MISS" not in out
