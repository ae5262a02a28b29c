"""Training samples/s with a locked image tower (LiT): its features computed once against the tower
run every step.

    python benchmarks/locked_features.py [--rows 2048] [--epochs 2] [--arch resnet18] [--size 64]

Two real 2-worker runs (``jobs/train.py``'s code path) on the built-in data with the same
config — ``model.image.lock=true``, ``data.augment=false``, a torchvision ``--arch`` image tower,
a small trainable text tower — one with ``train.cache_locked_features=true`` (the default: the
tower's outputs computed once with Ray Data, then read), one with it off (the locked tower runs
in every step, on freshly decoded pictures). Prints a table of the training throughput (median
of the epochs' ``samples_per_s`` after the first), the one-time feature computation and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    import ray

    from vcl_dist.config import load_config
    from vcl_dist.train.runner import run_training

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    work = Path(tempfile.mkdtemp(prefix="vcl-locked-"))
    base = [f"data.cache_dir={work / 'cache'}", f"run.storage_path={work / 'runs'}", f"data.shapes.num_train={args.rows}",
            "data.shapes.num_val=128", f"data.shapes.image_size={args.size}", f"data.image_size={args.size}",
            f"model.image.arch={args.arch}", "model.image.lock=true", "data.augment=false", f"train.epochs={args.epochs}",
            "model.text.hidden_size=64", "model.text.intermediate_size=128", "model.text.num_layers=1",
            "model.text.num_heads=2", "model.embed_dim=64", "train.batch_size=128", "run.log_every_steps=1000"]
    rows = []
    for name, cached in (("features computed once", True), ("tower every step", False)):
        cfg = load_config(REPO / "jobs/configs/default.yaml",
                          [*base, f"run.name={'cached' if cached else 'every-step'}", f"train.cache_locked_features={cached}"])
        printed = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            outcome = run_training(cfg)
        total = time.perf_counter() - started
        found = re.search(r"features of \d+ rows once in ([0-9.]+) s", printed.getvalue())
        rates = [m["samples_per_s"] for m in outcome.history]
        # Epoch 1 includes the workers' start and the first reads; the later epochs are the steady state.
        rows.append((name, rates[0], statistics.median(rates[1:] or rates), float(found.group(1)) if found else 0.0, total))
    ray.shutdown()
    print(f"\n{args.rows} rows of {args.size} px, {args.arch} locked, {args.epochs} epochs, 2 workers, global batch 128")
    print(f"{'image tower':<24} {'samples/s epoch 1':>18} {'samples/s later':>16} {'feature pass s':>15} {'whole run s':>12}")
    for name, first, later, features, total in rows:
        print(f"{name:<24} {first:>18.1f} {later:>16.1f} {features:>15.1f} {total:>12.1f}")
    print(f"speed-up of the training steps after epoch 1: {rows[0][2] / rows[1][2]:.1f}x; "
          f"of the whole run, the feature pass included: {rows[1][4] / rows[0][4]:.1f}x")


if __name__ == "__main__":
    main()
