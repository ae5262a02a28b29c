"""``benchmarks/gpu_check.py``'s dry run on the CPU: the script a lent GPU machine runs must work
there, where Ray is not installed, and print every measurement it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# Runs the script with ``import ray`` failing, as on a GPU machine without Ray.
WITHOUT_RAY = """
import runpy, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed on this machine")
sys.meta_path.insert(0, NoRay())
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_check_dry_run_without_ray_prints_every_measurement(tmp_path):
    out = tmp_path / "gpu_check.txt"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
         "--out", str(out)], cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()

    gather = re.search(r"gloo gather \(world 1\) vs local loss on cpu: largest difference of value and gradients (\S+)", text)
    assert gather and float(gather.group(1)) < 1e-6, text
    sharded = re.search(r"FSDP2 on cpu \(float32, activation checkpointing\) vs the bare model, 3 steps: .* "
                        r"largest relative difference (\S+)", text)
    assert sharded and float(sharded.group(1)) < 1e-5, text
    gathered = re.search(r"FSDP2 whole state loaded into a bare model: largest embedding difference (\S+)", text)
    assert gathered and float(gathered.group(1)) < 1e-5, text
    bf16 = re.search(r"bf16 autocast vs float32.*relative difference (\S+)\), gradient cosine (\S+)", text)
    # bf16 rounds the towers' activations: the loss moves by under 5% and the gradient keeps its
    # direction (cosine 0.90 for this quick run's tiny model on the CPU, 0.997-0.998 at the GPU
    # run's sizes); a gradient of another batch or with a term dropped is near orthogonal to it.
    assert bf16 and float(bf16.group(1)) < 0.05 and float(bf16.group(2)) > 0.8, text
    decoded = re.search(r"data.decode=gpu, 16 JPEGs .*: ([\d,]+) images/s on the device.* mean \|Δ\| ([\d.]+), "
                        r"max (\d+) grey levels, 16/16 decoded", text)
    # On a CPU "device" the byte path decodes at full scale where the CPU way may scale by 1/2:
    # the pictures differ by resampling only.
    assert decoded and float(decoded.group(2)) < 3 and "FAILED" not in text, text
    clock = re.search(r"phase clock on cpu \(synchronised\): step (\S+) ms = (.*) ms", text)
    assert clock, text
    phases = {name: float(ms) for name, ms in re.findall(r"(\w+) ([\d.]+)", clock.group(2))}
    assert {"forward", "loss", "backward", "optimizer"} <= set(phases)
    assert abs(sum(phases.values()) - float(clock.group(1))) < 0.05 * float(clock.group(1))
    assert re.search(r"epoch 1: loss [\d.]+ \(first step [\d.]+\), \d+ samples/s", text)
    assert "| 256 | triplet semi_hard |" in text and "| 256 | matmul floor |" in text
    row = re.search(r"\| 4 \| eager \| ([\d.]+) \| (\d+) \| ([\d.]+) \| - \| ([\d.]+)% \| (\d+) \| (\d+), data wait ([\d.]+)%", text)
    assert row, text
    step_ms, _, tflops, loss_share, _, fed, data_wait = map(float, row.groups())
    assert step_ms > 0 and tflops > 0 and 0 < loss_share < 100 and fed > 0 and 0 <= data_wait < 100


def test_the_measured_model_is_clip_vit_b32_sized():
    """The GPU run's model (the dry run uses a stand-in): torchvision's ViT-B/32 at 224 px and
    CLIP's text tower shape — 12 layers, 512 wide, 77 tokens, a 49,408-word vocabulary."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from step_throughput import CLIP_TEXT_LENGTH, CLIP_TEXT_VOCAB, clip_sized_config
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from vcl_dist.models import build_dual_encoder

    cfg = clip_sized_config(256)
    model = build_dual_encoder(cfg.model, CLIP_TEXT_VOCAB, CLIP_TEXT_LENGTH, 0)
    image = sum(p.numel() for p in model.image_tower.parameters())
    text = sum(p.numel() for p in model.text_tower.parameters())
    assert 87e6 < image < 89e6  # ViT-B/32 without its head: 87.5 M
    assert 62e6 < text < 66e6  # 25.3 M of token embeddings + 12 × 3.15 M
    assert cfg.train.batch_size == 256 and cfg.data.image_size == 224
