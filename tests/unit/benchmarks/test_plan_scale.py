"""``benchmarks/plan_scale.py`` at a small size: the real planner over faked shard metadata
prints one row per size, with a checkpointed position that does not grow with the rows."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_plan_scale_prints_a_row_per_size_with_a_position_of_constant_size():
    proc = subprocess.run([sys.executable, "benchmarks/plan_scale.py", "--shards", "300", "3000", "--rows-per-shard", "500",
                           "--workers", "4", "--local-batch", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| ([\d,]+) \| ([\d,]+) \| .*$", proc.stdout, flags=re.M)
    assert [shards for shards, _ in rows] == ["300", "3,000"], proc.stdout
    positions = [int(line.split("|")[6].replace(",", "")) for line in proc.stdout.splitlines()
                 if re.match(r"^\| [\d,]+ \|", line)]
    assert len(positions) == 2 and max(positions) < 2048 and positions[1] - positions[0] < 64, proc.stdout
