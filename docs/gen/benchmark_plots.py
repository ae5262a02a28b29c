"""Draw the benchmarks page's plots from the result files under ``benchmarks/results/``.

    python docs/gen/benchmark_plots.py            # write docs/images/benchmarks/*.png
    python docs/gen/benchmark_plots.py --check    # exit 1 when a plot was drawn from other figures

Each plot is drawn from the tables of one result file, the figures the page states in its
tables, and keeps a digest of those figures in its PNG text (``Source-Digest``): ``--check``
(run by ``tests/unit/test_docs.py``) reads the figures again and fails when a plot was drawn
from other ones, without comparing pixels (which differ between matplotlib releases).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generated_page import stale_exit  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "images" / "benchmarks"


def tables(path: Path) -> list[list[dict[str, str]]]:
    """The markdown tables of a result file, each a list of rows keyed by the header's cells."""
    found, header, rows = [], None, []
    for line in path.read_text().splitlines() + [""]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            if header is not None:
                found.append(rows)
            header, rows = None, []
        elif header is None:
            header = cells
        elif not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            rows.append(dict(zip(header, cells)))
    return found


def number(cell: str) -> float | None:
    """A table cell as a number (``1,476`` -> 1476.0); None for one that is not (``—``)."""
    match = re.fullmatch(r"\*{0,2}([-0-9.,]+)\*{0,2}( ?%)?", cell.strip())
    return float(match.group(1).replace(",", "")) if match else None


@dataclass(frozen=True)
class Plot:
    name: str  # docs/images/benchmarks/<name>.png
    source: str  # the result file under benchmarks/results/
    data: Callable[[list[list[dict[str, str]]]], dict]  # the figures drawn, from the file's tables
    draw: Callable[[dict, object], None]  # onto a matplotlib Axes
    grid: str  # the axis whose values the reader reads off: "x" for horizontal bars, "y" for the rest


def input_path_data(found):
    rows = found[0]
    return {"paths": [r["path"] for r in rows], "images_per_s": [number(r["images/s"]) for r in rows]}


def draw_input_path(data, ax):
    labels = [p.replace(" (one training worker's stream)", "").replace(": training's default", "\n(training's default)")
              for p in data["paths"]]
    bars = ax.barh(range(len(labels)), data["images_per_s"], color=["#999999", "#bbbbbb", "#7aa6d6", "#1f5fa8"])
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.bar_label(bars, fmt="%.0f", padding=3)
    ax.set_xlabel("images/s, 2 worker processes (256–512 px JPEGs to 224 px)")
    ax.set_title("The input path against a torch DataLoader")


def pool_scale_data(found):
    rows = [r for r in found[0] if number(r["anchors"]) == 4096]
    return {"pool": [number(r["pool"]) for r in rows], "dense": [number(r["dense peak GiB"]) for r in rows],
            "tiled": [number(r["tiled peak GiB"]) for r in rows]}


def draw_pool_scale(data, ax):
    ax.plot(data["pool"], data["dense"], "o-", label="dense (the whole score matrix)")
    ax.plot(data["pool"], data["tiled"], "s-", label="tiled (4,096-row tiles)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("negative pool (rows), 4,096 anchors, d = 128")
    ax.set_ylabel("peak memory above the inputs (GiB)")
    ax.set_title("Sigmoid loss, forward + backward: memory against pool size")
    ax.legend()


def loss_speed_data(found):
    rows = found[0]
    return {"losses": [r["loss"] for r in rows], "ms": [number(r["ms"]) for r in rows]}


def draw_loss_speed(data, ax):
    bars = ax.barh(range(len(data["losses"])), data["ms"], color="#1f5fa8")
    ax.set_yticks(range(len(data["losses"])), data["losses"])
    ax.invert_yaxis()
    ax.bar_label(bars, fmt="%.1f", padding=3)
    ax.set_xlabel("ms per forward + backward (B = 2048, d = 256, float32, 2 threads)")
    ax.set_title("Each loss against the matrix-product floor")
    ax.margins(x=0.12)


def chaos_data(found):
    rows = found[0]
    return {"fault": [r["fault"] for r in rows], "fired_s": [number(r["fired at (s)"]) for r in rows],
            "lost_s": [number(r["run time lost (s)"]) for r in rows],
            "survived": [float(r["survived"] == "yes") for r in rows]}


def draw_chaos(data, ax):
    kinds = sorted(set(data["fault"]))
    colours = dict(zip(kinds, ["#1f5fa8", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]))
    for kind in kinds:
        picked = [i for i, fault in enumerate(data["fault"]) if fault == kind]
        ax.bar([data["fired_s"][i] / 60 for i in picked], [data["lost_s"][i] for i in picked], width=0.8,
               color=colours[kind], label=kind)
    ax.set_xlabel("minutes into the soak (when the fault fired)")
    ax.set_ylabel("run time lost (s)")
    ax.set_title(f"The 60-minute chaos soak: {len(data['fault'])} faults, {sum(data['survived']):.0f} survived")
    ax.legend(ncol=2, fontsize="small")


PLOTS = (
    Plot("input_path", "data_speed-crawl_jpeg_224-2cores_amd_epyc.txt", input_path_data, draw_input_path, "x"),
    Plot("pool_scale", "pool_scale-sigmoid-2cores.txt", pool_scale_data, draw_pool_scale, "y"),
    Plot("loss_speed", "loss_speed-sigmoid-2cores.txt", loss_speed_data, draw_loss_speed, "x"),
    Plot("chaos_60min", "chaos-60min-2cores.txt", chaos_data, draw_chaos, "y"),
)


def digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def figures(plot: Plot) -> dict:
    """The figures a plot draws, read from its result file now.

    Raises:
        ValueError: the file has no table the plot can read, or a figure that is not a number.
    """
    path = RESULTS / plot.source
    try:
        data = plot.data(tables(path))
    except (IndexError, KeyError) as err:
        raise ValueError(f"{path.name}: no table with the figures of plot {plot.name} ({err!r})") from None
    if any(value is None for values in data.values() for value in values):
        raise ValueError(f"{path.name}: a figure of plot {plot.name} is not a number")
    return data


def draw(plot: Plot, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = figures(plot)
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=100)
    plot.draw(data, ax)
    ax.grid(axis=plot.grid, alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": None, "Source": f"benchmarks/results/{plot.source}",
                                             "Source-Digest": digest(data)})
    plt.close(fig)


def drawn_digest(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get("Source-Digest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a plot was drawn from other figures")
    parser.add_argument("--out", default=str(IMAGES), help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args(argv)
    stale = []
    for plot in PLOTS:
        path = Path(args.out) / f"{plot.name}.png"
        if args.check:
            if not path.exists() or drawn_digest(path) != digest(figures(plot)):
                stale.append(plot.name)
            continue
        draw(plot, path)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return stale_exit(stale, "plots drawn from other figures", "docs/gen/benchmark_plots.py")


if __name__ == "__main__":
    sys.exit(main())
