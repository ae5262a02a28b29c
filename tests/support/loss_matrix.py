"""The loss equivalence matrix: every loss, held against its dense float64 definition
(`vcl_dist.losses.definitions`) in every way it can run, on 1, 2 and 3 workers.

A loss is a row (``LOSSES``), a way of running it a column (``VARIANTS``), each tried with every
exchange (``GATHERS``). A combination the config refuses is a refused cell, with the config's
one-line reason; every other cell must give, on every worker, the definition's value (the mean
over workers) and every gradient (the towers' after DDP, the loss's own parameters' after
averaging), on two steps of a global batch of 12 rows with repeated labels, unlabelled rows and
an image with two captions, split unequally over the workers. The memory variants hold the
first step's rows as negatives in the second.

A new loss is proven by adding one row. ``python tests/support/loss_matrix.py --write``
regenerates the documentation's table (``docs/concepts/loss-equivalence.md``);
``tests/unit/losses/test_loss_matrix.py`` runs the matrix and fails when the page differs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from distributed_steps import make_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vcl_dist.config import ConfigError, load_config
from vcl_dist.losses import InfoNCELoss, NegativeMemory, SigmoidLoss, TripletLoss, VCRLLoss
from vcl_dist.losses.definitions import infonce_loss, sigmoid_loss, triplet_loss, vcrl_loss
from vcl_dist.losses.gather import average_gradients
from vcl_dist.train.grad_cache import cached_gradient_backward

PAGE = Path(__file__).resolve().parents[2] / "docs" / "concepts" / "loss-equivalence.md"
GLOBAL_BATCH, MEMORY_ROWS, CHUNK, MICRO_BATCH, NUM_CLASSES = 12, 9, 4, 2, 3
LOCAL_SIZES = {1: [12], 2: [7, 5], 3: [5, 4, 3]}
GATHERS = ("local", "full", "ring")
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}  # rtol, atol


@dataclass(frozen=True)
class LossRow:
    """A loss: its config, its module (``build(gather, memory, chunk_size)``) and its definition
    (``definition(module, image, text, labels, groups, memory)``, the module's own parameters
    taken from ``module``)."""

    name: str
    config: tuple[str, ...]
    build: Callable[..., nn.Module]
    definition: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """A way of running a loss."""

    name: str
    what: str
    config: tuple[str, ...] = ()
    chunk_size: int | None = None
    memory: str | None = None  # "replicated" | "sharded"
    micro_batch: int | None = None
    dtype: torch.dtype = field(default=torch.float64)


def triplet_row(negatives: str) -> LossRow:
    return LossRow(
        f"triplet ({negatives})", ("loss.name=triplet", f"loss.negatives={negatives}", "loss.margin=1.0"),
        lambda **kw: TripletLoss(1.0, negatives, **kw),
        lambda loss, *batch, memory: triplet_loss(*batch, 1.0, negatives, memory=memory))


def vcrl_row(negatives: str) -> LossRow:
    return LossRow(
        f"VCRL ({negatives}, label tower)",
        ("loss.name=vcrl", f"loss.negatives={negatives}", "loss.margin=2.0", "loss.reg_lambda=0.05",
         "loss.label_tower=true", f"loss.num_classes={NUM_CLASSES}", "loss.label_weight=0.5"),
        lambda **kw: VCRLLoss(2.0, 0.05, negatives, num_classes=NUM_CLASSES, embed_dim=5, label_weight=0.5, **kw),
        lambda loss, *batch, memory: vcrl_loss(*batch, 2.0, 0.05, negatives, loss.class_embeddings, 0.5, memory=memory))


LOSSES = [
    *(triplet_row(negatives) for negatives in ("hardest", "semi_hard", "all")),
    *(vcrl_row(negatives) for negatives in ("hardest", "semi_hard", "all")),
    LossRow("InfoNCE", ("loss.name=infonce", "loss.init_temperature=0.3"),
            lambda **kw: InfoNCELoss(init_temperature=0.3, **kw),
            lambda loss, *batch, memory: infonce_loss(*batch, loss.scale(), memory=memory)),
    LossRow("sigmoid (SigLIP)", ("loss.name=sigmoid", "loss.init_scale=3.0", "loss.init_bias=-1.5"),
            lambda **kw: SigmoidLoss(init_scale=3.0, init_bias=-1.5, **kw),
            lambda loss, *batch, memory: sigmoid_loss(*batch, loss.scale(), loss.logit_bias, memory=memory)),
]

VARIANTS = [
    Variant("dense", "the whole score matrix of the local anchors against the pool"),
    Variant("tiled", f"score tiles of {CHUNK} pool rows (a size that divides no pool here)",
            (f"loss.chunk_size={CHUNK}",), chunk_size=CHUNK),
    Variant("micro-batched", f"towers run in micro-batches of {MICRO_BATCH} rows with cached embedding gradients",
            (f"train.micro_batch_size={MICRO_BATCH}",), micro_batch=MICRO_BATCH),
    Variant("replicated memory", f"a negative memory of {MEMORY_ROWS} rows, whole on every worker",
            (f"loss.memory_size={MEMORY_ROWS}",), memory="replicated"),
    Variant("sharded memory", "the same memory, 1/W of its rows on each worker",
            (f"loss.memory_size={MEMORY_ROWS}", "loss.memory_shard=true"), memory="sharded"),
    Variant("float32", "dense, towers and loss in float32 (against the float64 definition)", dtype=torch.float32),
]


def refusal(row: LossRow, variant: Variant, gather: str) -> str | None:
    """The config's one-line reason to refuse this cell, or None."""
    try:
        load_config(None, [*row.config, *variant.config, f"loss.gather={gather}"])
    except ConfigError as err:
        return str(err)
    return None


def cells() -> list[tuple[LossRow, Variant, str]]:
    """Every cell the config accepts."""
    return [(row, variant, gather) for row in LOSSES for variant in VARIANTS for gather in GATHERS
            if refusal(row, variant, gather) is None]


def cell_id(row: LossRow, variant: Variant, gather: str) -> str:
    return f"{row.name} / {variant.name} / {gather}"


def make_loss(row: LossRow, variant: Variant, gather: str) -> nn.Module:
    torch.manual_seed(11)  # the same loss parameters in every worker and in the reference
    memory = NegativeMemory(MEMORY_ROWS, shard=variant.memory == "sharded") if variant.memory else None
    return row.build(gather=gather, memory=memory, chunk_size=variant.chunk_size)


def global_batches() -> list[tuple[torch.Tensor, ...]]:
    """Two global batches ``(x [12, 7], y [12, 4], labels, groups)``, float64."""
    g = torch.Generator().manual_seed(123)
    batches = []
    for step in range(2):
        x = torch.randn(GLOBAL_BATCH, 7, generator=g, dtype=torch.float64)
        y = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64)
        labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)
        labels[::5] = -1
        groups = torch.arange(GLOBAL_BATCH) + 100 * step
        groups[3] = groups[2]
        batches.append((x, y, labels, groups))
    return batches


class StepTowers(nn.Module):
    """The tiny towers with the signature the training step calls them with."""

    def __init__(self, towers: nn.Module):
        super().__init__()
        self.towers = towers

    def forward(self, image, input_ids, attention_mask):
        return self.towers(image, input_ids)


def run_cell(row: LossRow, variant: Variant, gather: str, part: slice, world: int):
    """``[(loss averaged over workers, {parameter: gradient})]`` of the two steps on this worker."""
    towers = make_model().to(variant.dtype)
    model = StepTowers(towers)
    if world > 1:
        model = DistributedDataParallel(model)
    criterion = make_loss(row, variant, gather).to(variant.dtype)
    steps = []
    for x, y, labels, groups in global_batches():
        model.zero_grad()
        criterion.zero_grad()
        x, y = x[part].to(variant.dtype), y[part].to(variant.dtype)
        if variant.micro_batch:
            batch = {"image": x, "input_ids": y, "attention_mask": y, "label": labels[part], "group": groups[part]}
            loss = cached_gradient_backward(model, criterion, batch, torch.device("cpu"), False, variant.micro_batch)
        else:
            loss = criterion(*model(x, y, None), labels[part], groups[part])
            loss.backward()
        average_gradients(criterion.parameters())
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        grads = {f"model.{k}": p.grad.detach().clone() for k, p in towers.named_parameters()}
        grads |= {f"loss.{k}": p.grad.detach().clone() for k, p in criterion.named_parameters()}
        steps.append((loss / world, grads))
    return steps


def reference(row: LossRow, variant: Variant, gather: str):
    """The definition's value and gradients on the whole batch, in float64, from the cell's own
    starting values (rounded to its dtype)."""
    towers = make_model().to(variant.dtype).double()
    criterion = make_loss(row, variant, gather).to(variant.dtype).double()
    steps, memory = [], None
    for x, y, labels, groups in global_batches():
        towers.zero_grad()
        criterion.zero_grad()
        image, text = towers(x.to(variant.dtype).double(), y.to(variant.dtype).double())
        loss = row.definition(criterion, image, text, labels, groups, memory=memory)
        loss.backward()
        grads = {f"model.{k}": p.grad.detach().clone() for k, p in towers.named_parameters()}
        grads |= {f"loss.{k}": p.grad.detach().clone() for k, p in criterion.named_parameters()}
        steps.append((loss.detach(), grads))
        if variant.memory:  # the newest rows of this batch are the next step's memory
            memory = image[-MEMORY_ROWS:].detach(), text[-MEMORY_ROWS:].detach(), labels[-MEMORY_ROWS:], groups[-MEMORY_ROWS:]
    return steps


def mismatches(got, want, dtype: torch.dtype) -> list[str]:
    """What differs between a cell's steps and the reference's, beyond the dtype's tolerance."""
    rtol, atol = TOLERANCE[dtype]
    found = []
    for step, ((got_loss, got_grads), (want_loss, want_grads)) in enumerate(zip(got, want)):
        pairs = [("value", got_loss, want_loss)] + [(name, got_grads.get(name), grad) for name, grad in want_grads.items()]
        for name, value, expected in pairs:
            if name != "value" and not expected.abs().sum() > 0:
                found.append(f"step {step} {name}: the reference gradient is zero")
            elif value is None or not torch.allclose(value.double(), expected, rtol=rtol, atol=atol):
                error = None if value is None else (value.double() - expected).abs().max().item()
                found.append(f"step {step} {name}: max error {error}")
    return found


def matrix_worker(rank: int, world: int, out_dir: str) -> None:
    """One gloo worker: every accepted cell on its slice of the batches, saved to ``rank{rank}.pt``."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sizes = LOCAL_SIZES[world]
    lo = sum(sizes[:rank])
    part = slice(lo, lo + sizes[rank])
    results = {cell_id(*cell): run_cell(*cell, part, world) for cell in cells()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def page() -> str:
    """The documentation's table of the matrix."""
    reasons: dict[str, int] = {}
    lines = [
        "# Loss equivalence",
        "",
        "<!-- Generated by `python tests/support/loss_matrix.py --write`; edit that file, not this page. -->",
        "",
        "Every loss is held against its dense float64 definition (`vcl_dist/losses/definitions.py`) in every way it",
        "can run, by one parametrised test (`tests/unit/losses/test_loss_matrix.py`): on 1, 2 and 3 gloo workers",
        f"(local batches {', '.join('+'.join(map(str, LOCAL_SIZES[w])) for w in (1, 2, 3))} of one global batch of",
        f"{GLOBAL_BATCH} rows, with repeated labels, unlabelled rows and an image with two captions), two steps each,",
        "the value (the mean over workers) and every gradient (the towers' after DDP, the loss's own parameters' after",
        f"averaging) must equal the definition's on the whole batch: within a relative {TOLERANCE[torch.float64][0]:g}",
        f"in float64 and {TOLERANCE[torch.float32][0]:g} in float32.",
        "",
        "Columns (each with the exchanges `local`, `full` and `ring`):",
        "",
        *[f"- **{variant.name}**: {variant.what}." for variant in VARIANTS],
        "",
        "A cell lists the exchanges proven on 1, 2 and 3 workers (✓) and those the configuration refuses (✗, with",
        "the error a run meets, below the table).",
        "",
        "| loss | " + " | ".join(variant.name for variant in VARIANTS) + " |",
        "|---" * (len(VARIANTS) + 1) + "|",
    ]
    for row in LOSSES:
        entries = []
        for variant in VARIANTS:
            proven, refused = [], []
            for gather in GATHERS:
                reason = refusal(row, variant, gather)
                if reason is None:
                    proven.append(f"`{gather}`")
                else:
                    refused.append(f"`{gather}` [{reasons.setdefault(reason, len(reasons) + 1)}]")
            entries.append(" · ".join(part for part in (
                "✓ " + " ".join(proven) if proven else "", "✗ " + " ".join(refused) if refused else "") if part))
        lines.append(f"| {row.name} | " + " | ".join(entries) + " |")
    lines += ["", "Refusals, as the configuration check words them:", ""]
    lines += [f"{number}. {reason}" for reason, number in reasons.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="print, or --write, the documentation's loss equivalence table")
    parser.add_argument("--write", action="store_true", help=f"write it to {PAGE.relative_to(PAGE.parents[2])}")
    args = parser.parse_args()
    if args.write:
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        PAGE.write_text(page())
    else:
        print(page(), end="")


if __name__ == "__main__":
    main()
