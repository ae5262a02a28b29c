"""The baseline of ``benchmarks/train_speed.py``: ``benchmarks/plain_ddp.py`` under a real
``torchrun`` trains the config's model on the built-in shards with two gloo ranks, and prints
what the benchmark reads (its first step, then a line per epoch)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_plain_torchrun_baseline_trains_and_reports_each_epoch(tiny_shapes_overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "benchmarks/plain_ddp.py"), *tiny_shapes_overrides, "train.epochs=2"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines.count("first step done") == 1  # rank 0 only
    epochs = [json.loads(line) for line in lines if line.startswith('{"epoch"')]
    # 512 rows, 2 ranks, 32 rows per rank per step: 8 steps an epoch, every epoch.
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["steps"] == 8 for e in epochs), epochs
    assert all(e["samples_per_s"] > 0 and math.isfinite(e["rank0_loss"]) and e["rank0_loss"] > 0 for e in epochs)
