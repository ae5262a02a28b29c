"""Evaluate a model on an embedded split and write what a person looks at: an HTML report with PNGs.

The report folder holds ``report.html``, ``metrics.json``, ``plots/`` (training curves from the
run's history, recall@K bars) and ``queries/`` (for a few captions, a contact sheet of the
top-k retrieved images; for a few images, the query image beside its top-k captions). Every
file the HTML references is in the folder: it can be copied or served as it is.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from ..evaluate import distinct_images, retrieval_metrics, zero_shot_accuracy
from ..runtime.step_phases import PHASES
from .contact_sheet import contact_sheet
from .model import RetrievalModel
from .search import fixed_size_lists_to_numpy

PLOTS_DIR = "plots"
QUERIES_DIR = "queries"


def table_embeddings(table: pa.Table) -> dict[str, torch.Tensor]:
    """Embedding Parquet rows -> the ``image``, ``text``, ``label``, ``group`` tensors of `vcl_dist.evaluate`."""
    return {
        "image": torch.from_numpy(fixed_size_lists_to_numpy(table["image_embedding"])),
        "text": torch.from_numpy(fixed_size_lists_to_numpy(table["text_embedding"])),
        "label": torch.tensor(table["label"].to_numpy(zero_copy_only=False), dtype=torch.long),
        "group": torch.tensor(table["image_group"].to_numpy(zero_copy_only=False), dtype=torch.long),
    }


def evaluate_table(model: RetrievalModel, table: pa.Table, class_names: Sequence[str] | None,
                   ks: Sequence[int] = (1, 5, 10), prompt_template: str | Sequence[str] = "a photo of a {}") -> dict[str, float]:
    """Recall@K both ways (instance and class level), rsum, mean and median ranks, zero-shot
    accuracy (``prompt_template``: one template, or several to ensemble)."""
    embeddings = table_embeddings(table)
    metrics = retrieval_metrics(embeddings, ks, model.normalized)
    if class_names:
        metrics["zero_shot_acc"] = zero_shot_accuracy(
            model.model, model.tokenizer, class_names, prompt_template, embeddings, model.device,
            model.config.data.max_text_length, model.normalized,
        )
    return metrics


def evaluate_folds(model: RetrievalModel, table: pa.Table, folds: Sequence[Sequence[str]], class_names: Sequence[str] | None,
                   ks: Sequence[int] = (1, 5, 10), prompt_template: str | Sequence[str] = "a photo of a {}") -> dict[str, float]:
    """`evaluate_table` on each fold of images (their ``image_id`` lists: COCO's 1K test
    protocol), every metric averaged over the folds; ``folds``: how many.

    Raises:
        ValueError: a fold none of whose images is in the table (one line).
    """
    from ..data.preprocess import stable_id

    groups = table["image_group"].to_numpy(zero_copy_only=False)
    per_fold = []
    for number, fold in enumerate(folds):
        mask = np.isin(groups, np.array([stable_id(str(i)) for i in fold], dtype=np.int64))
        if not mask.any():
            raise ValueError(f"fold {number + 1} of {len(folds)}: none of its {len(fold)} images is in the split")
        per_fold.append(evaluate_table(model, table.filter(pa.array(mask)), class_names, ks, prompt_template))
    metrics = {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0] if all(key in m for m in per_fold)}
    metrics["folds"] = float(len(folds))
    return metrics


def write_report(out_dir: str | Path, *, model: RetrievalModel, table: pa.Table, metrics: dict[str, float],
                 history: list[dict], title: str, ks: Sequence[int] = (1, 5, 10), examples: int = 4, top_k: int = 8) -> Path:
    """Write the report folder; returns the path of ``report.html``."""
    out = Path(out_dir)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    (out / QUERIES_DIR).mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    figures = []
    if history:
        figures.append(("Training curves", _training_curves(history, out / PLOTS_DIR / "training_curves.png")))
        if any(step_time_breakdown(m) for m in history):
            figures.append(("Where the step time went", _step_time_chart(history, out / PLOTS_DIR / "step_time.png")))
    figures.append(("Recall@K", _recall_chart(metrics, ks, out / PLOTS_DIR / "recall_at_k.png")))
    # Converted once for both kinds of example query.
    rows = {**table_embeddings(table), "thumbnail": table["thumbnail"].to_pylist(), "caption": table["caption"].to_pylist()}
    text_queries = _text_query_sheets(model, rows, out / QUERIES_DIR, examples, top_k)
    image_queries = _image_queries(model, rows, out / QUERIES_DIR, examples, top_k)
    page = out / "report.html"
    page.write_text(_html(title, metrics, figures, text_queries, image_queries, out))
    return page


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _training_curves(history: list[dict], path: Path) -> Path:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in history]
    fig, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_ax.plot(epochs, [m.get("train_loss") for m in history], marker="o")
    loss_ax.set(title="train loss", xlabel="epoch")
    for key, label in (("val_i2t_r1", "image→text R@1"), ("val_t2i_r1", "text→image R@1"),
                       ("val_t2i_class_r1", "text→image class R@1"), ("val_zero_shot_acc", "zero-shot")):
        if any(key in m for m in history):
            recall_ax.plot(epochs, [m.get(key, float("nan")) for m in history], marker="o", label=label)
    recall_ax.set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    recall_ax.legend(fontsize=8)
    for ax in (loss_ax, recall_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_time_breakdown(epoch: dict) -> dict[str, float]:
    """``{phase: fraction of the step time}`` of an epoch's metrics (empty for runs from before
    the breakdown was measured)."""
    return {name: epoch[f"step_{name}_fraction"] for name in PHASES if f"step_{name}_fraction" in epoch}


def _step_time_chart(history: list[dict], path: Path) -> Path:
    """A stacked bar per epoch: each phase's share of the step (labelled with the step's mean time)."""
    plt = _plt()
    epochs = [m for m in history if step_time_breakdown(m)]
    phases = list(step_time_breakdown(epochs[0]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(epochs) + 3), 3.6))
    positions = list(range(len(epochs)))
    bottom = [0.0] * len(epochs)
    colors = plt.get_cmap("tab10")
    for index, name in enumerate(phases):
        shares = [step_time_breakdown(m).get(name, 0.0) for m in epochs]
        ax.bar(positions, shares, bottom=bottom, label=name, color=colors(index % 10), width=0.7)
        bottom = [b + v for b, v in zip(bottom, shares)]
    ax.set_xticks(positions, [f"{m['epoch']}\n{m.get('step_time_s', 0) * 1000:.0f} ms" for m in epochs], fontsize=8)
    ax.set(title="step time by phase (share of the mean step)", xlabel="epoch, mean step time", ylim=(0, 1.0))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _recall_chart(metrics: dict[str, float], ks: Sequence[int], path: Path) -> Path:
    plt = _plt()
    series = [(f"{d}{level}", f"{name}{' class' if level else ''}")
              for level in ("", "_class") for d, name in (("i2t", "image→text"), ("t2i", "text→image"))
              if f"{d}{level}_r{ks[0]}" in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(series)
    for i, (prefix, label) in enumerate(series):
        ax.bar([x + i * width for x in range(len(ks))], [metrics[f"{prefix}_r{k}"] for k in ks], width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(ks))], [f"R@{k}" for k in ks])
    ax.set(ylim=(0, 1.05), title="recall@K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _spread(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n)``: deterministic example queries."""
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(min(count, n))})


def _text_query_sheets(model: RetrievalModel, embeddings: dict, folder: Path, examples: int, top_k: int) -> list[dict]:
    image_rows = distinct_images(embeddings["group"])
    scores = model.similarity(embeddings["text"].double(), embeddings["image"][image_rows].double())
    thumbnails, captions = embeddings["thumbnail"], embeddings["caption"]
    queries = []
    for n, row in enumerate(_spread(len(captions), examples)):
        best = torch.topk(scores[row], min(top_k, len(image_rows))).indices
        found = image_rows[best]
        hits = [bool(embeddings["label"][r] == embeddings["label"][row] if embeddings["label"][row] >= 0
                     else embeddings["group"][r] == embeddings["group"][row]) for r in found]
        sheet = contact_sheet([thumbnails[r] for r in found], [f"{i + 1}. {captions[r]}" for i, r in enumerate(found.tolist())],
                              title=f"query: {captions[row]}", hits=hits)
        path = folder / f"text_query_{n + 1}.png"
        sheet.save(path)
        queries.append({"query": captions[row], "image": path, "hits": sum(hits)})
    return queries


def _image_queries(model: RetrievalModel, embeddings: dict, folder: Path, examples: int, top_k: int) -> list[dict]:
    image_rows = distinct_images(embeddings["group"])
    scores = model.similarity(embeddings["image"][image_rows].double(), embeddings["text"].double())
    thumbnails, captions = embeddings["thumbnail"], embeddings["caption"]
    queries = []
    for n, index in enumerate(_spread(len(image_rows), examples)):
        row = int(image_rows[index])
        path = folder / f"image_query_{n + 1}.png"
        contact_sheet([thumbnails[row]], [captions[row]], title="query image").save(path)
        best = torch.topk(scores[index], min(top_k, len(captions))).indices.tolist()
        same = [bool(embeddings["group"][r] == embeddings["group"][row]) for r in best]
        queries.append({"image": path, "captions": [(captions[r], ok) for r, ok in zip(best, same)]})
    return queries


def _html(title: str, metrics: dict, figures: list, text_queries: list[dict], image_queries: list[dict], out: Path) -> str:
    def rel(path: Path) -> str:
        return html.escape(path.relative_to(out).as_posix(), quote=True)

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in metrics.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td{border:1px solid #ccc;padding:2px 8px}.hit{color:#2e9c43}.miss{color:#cf222e}img{max-width:100%}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<h2>Metrics</h2><table>{rows}</table>",
    ]
    parts += [f"<h2>{html.escape(name)}</h2><img src='{rel(path)}' alt='{html.escape(name)}'>" for name, path in figures]
    parts.append("<h2>Text → image: top results per caption</h2><p>Green: the right class (or image, when unlabeled).</p>")
    parts += [f"<img src='{rel(q['image'])}' alt='{html.escape(q['query'])}'>" for q in text_queries]
    parts.append("<h2>Image → text: top captions per image</h2><p>Green: a caption of this image.</p>")
    for q in image_queries:
        items = "".join(f"<li class='{'hit' if ok else 'miss'}'>{html.escape(c)}</li>" for c, ok in q["captions"])
        parts.append(f"<div><img src='{rel(q['image'])}' alt='query image'><ol>{items}</ol></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
