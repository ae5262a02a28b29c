"""Training-step throughput of a CLIP ViT-B/32-sized dual encoder, with the project's own model,
loss, optimizer and step (``vcl_dist.train.step.train_step``): samples/s, model FLOPs
utilisation, the loss's share of the step, and the share spent waiting for data when the
batches come from the project's preprocessing (JPEG decode, augmentation, tokenisation) in a
torch ``DataLoader`` with pinned memory — Ray Data is not needed here, so this runs on a bare
GPU machine. Used by ``gpu_check.py``; ``--device cpu`` is a dry run with a few small steps.

The model: ``model.image.arch=vit_b_32`` at 224 px (torchvision's ViT-B/32, 88 M parameters)
and a 12-layer, 512-wide, 8-head text transformer over 77 tokens with a 49,408-word vocabulary
(CLIP's text tower), 512-d embeddings, the default triplet loss (semi-hard negatives) in float32,
bf16 autocast for the towers on a GPU.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from common import median_seconds

from vcl_dist.config import TrainConfig, load_config
from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.losses import build_loss
from vcl_dist.models import build_dual_encoder
from vcl_dist.runtime.precision import autocast
from vcl_dist.runtime.step_phases import PhaseClock, phase
from vcl_dist.train.schedule import build_optimizer
from vcl_dist.train.step import collate_rows, train_step
from vcl_dist.train.tower_options import prepare_towers

CLIP_TEXT_VOCAB = 49_408
CLIP_TEXT_LENGTH = 77
# Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def clip_sized_config(batch_size: int, stand_in: bool = False):
    """The ViT-B/32-sized model's config; ``stand_in``: the default small ResNet and a 2-layer,
    64-wide text tower on the same inputs (a dry run's model: the same code paths, ~1/100 the work)."""
    towers = (["model.image.arch=small_resnet", "model.embed_dim=64", "model.text.hidden_size=64", "model.text.num_layers=2",
               "model.text.intermediate_size=128"] if stand_in else
              ["model.image.arch=vit_b_32", "model.embed_dim=512", "model.text.hidden_size=512", "model.text.num_layers=12",
               "model.text.num_heads=8", "model.text.intermediate_size=2048"])
    return load_config(Path(__file__).parent.parent / "jobs/configs/default.yaml", [
        *towers, "data.image_size=224", f"model.text.vocab_size={CLIP_TEXT_VOCAB}",
        f"data.max_text_length={CLIP_TEXT_LENGTH}", f"train.batch_size={batch_size}"])


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def synthetic_batch(batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A model-ready batch: uint8 pictures, captions of 8-77 tokens, 100 classes."""
    lengths = torch.randint(8, CLIP_TEXT_LENGTH + 1, (batch_size,), generator=generator)
    mask = (torch.arange(CLIP_TEXT_LENGTH)[None] < lengths[:, None]).long()
    return {"image": torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, generator=generator),
            "input_ids": torch.randint(1, CLIP_TEXT_VOCAB, (batch_size, CLIP_TEXT_LENGTH), generator=generator) * mask,
            "attention_mask": mask, "label": torch.randint(0, 100, (batch_size,), generator=generator),
            "group": torch.arange(batch_size)}


class WordTokenizer:
    """A stand-in for the trained WordPiece tokenizer with CLIP's vocabulary size: one id per
    word, hashed (the model's cost depends on the lengths, not on which ids)."""

    pad_token_id = 0

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = np.zeros((len(texts), max_length), dtype=np.int64)
        for row, text in enumerate(texts):
            words = [1 + hash(w) % (CLIP_TEXT_VOCAB - 1) for w in text.split()][:max_length]
            ids[row, :len(words)] = words
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}


def jpeg_rows(count: int, side: int = 256, seed: int = 0) -> list[dict]:
    """Distinct JPEG pictures (smooth colour fields with a bright square, quality 90, about the
    size of a photo of that side) and captions of 6-40 words, as shard rows."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
        x, y = rng.integers(0, side // 2, 2)
        picture.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (int(x), int(y), int(x) + side // 3, int(y) + side // 3))
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=90)
        words = " ".join(f"w{w}" for w in rng.integers(0, 5000, rng.integers(6, 41)))
        rows.append({"key": f"r{index}", "image": buffer.getvalue(), "caption": words, "label": int(index % 100)})
    return rows


class PreprocessedBatches(torch.utils.data.Dataset):
    """Batch ``i``: ``batch_size`` rows (cycling over ``rows``) through the project's
    `Preprocessor` (decode, random-resized-crop augmentation, tokenise) and collation."""

    def __init__(self, rows: list[dict], batch_size: int, steps: int):
        self.rows, self.batch_size, self.steps = rows, batch_size, steps
        self.preprocessor = Preprocessor(WordTokenizer(), 224, CLIP_TEXT_LENGTH, augment=True)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        picks = [self.rows[(step * self.batch_size + i) % len(self.rows)] for i in range(self.batch_size)]
        columns = {name: [row[name] for row in picks] for name in ("key", "image", "caption", "label")}
        columns["key"] = [f"{key}-{step}" for key in columns["key"]]  # a fresh augmentation each pass
        tensors = collate_rows(self.preprocessor(columns))
        tensors.pop("bad_shards")
        return tensors


def step_flops(model, criterion, batch: dict[str, torch.Tensor], device: torch.device, use_amp: bool) -> float:
    """FLOPs of one step's forward and backward (matmuls, convolutions, attention), counted by
    ``torch.utils.flop_counter`` on a real step (no optimizer step is taken)."""
    from torch.utils.flop_counter import FlopCounterMode

    on_device = {name: t.to(device) for name, t in batch.items()}
    with FlopCounterMode(display=False) as counter:
        with autocast(device, use_amp):
            image_emb, text_emb = model(on_device["image"], on_device["input_ids"], on_device["attention_mask"])
        criterion(image_emb.float(), text_emb.float(), on_device["label"], on_device["group"]).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def seconds_per_call(fn, repeats: int, sync) -> float:
    """Wall time per call of ``repeats`` calls back to back, one device synchronisation at the end
    (a step that does not wait for the device lets the host queue the next one meanwhile)."""
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


def write_profile(step, path: str, on_gpu: bool) -> None:
    """``torch.profiler`` over 5 steps: the operators by device time, then by host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=25),
              averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    Path(path).write_text("\n\n".join(tables))


def measure(batch_size: int, device: torch.device, steps: int, loader_workers: int, say,
            compile_towers: bool = False, profile_to: str | None = None, stand_in: bool = False) -> dict:
    """One row of the table: the step on batches already on the device, then the same step fed by
    the preprocessing ``DataLoader`` (phases timed on every step, synchronised)."""
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cfg = clip_sized_config(batch_size, stand_in)
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model, CLIP_TEXT_VOCAB, CLIP_TEXT_LENGTH, 0).to(device)
    if compile_towers:
        prepare_towers(model, TrainConfig(compile=True))  # as train.compile does it
    criterion = build_loss(cfg.loss, 100, cfg.model.embed_dim).to(device)
    optimizer = build_optimizer([model, criterion], cfg.train.lr, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(batch_size)
    resident = {name: t.to(device) for name, t in synthetic_batch(batch_size, generator).items()}

    def step() -> None:
        train_step(model, criterion, optimizer, scheduler, resident, device, on_gpu, cfg.train.grad_clip_norm)

    def step_with_verdict_on_device() -> None:
        """``train_step`` as GPU runs take it: the loss and gradient norm are judged on the
        device, and a non-finite step is skipped there by fused AdamW's ``found_inf``, so the
        host never waits for the device inside the step (``vcl_dist.runtime.step_verdict``)."""
        train_step(model, criterion, optimizer, scheduler, resident, device, on_gpu, cfg.train.grad_clip_norm,
                   verdict_on_device=bool(optimizer.defaults.get("fused")))

    # Warm-up: the allocator, cuDNN/cuBLAS choices, compilation (one step in a dry run of a few steps).
    warm = 1 if steps < 5 else 6 if compile_towers else 3
    for _ in range(warm):
        step()
    step_s = seconds_per_call(step, steps, sync)
    no_sync_s = seconds_per_call(step_with_verdict_on_device, steps, sync)
    optimizer.__dict__.pop("found_inf", None)  # the verdict judged at once from here on
    if profile_to:
        write_profile(step, profile_to, on_gpu)

    embed = cfg.model.embed_dim
    g = torch.Generator(device=device).manual_seed(1)
    u = torch.randn(batch_size, embed, device=device, generator=g, requires_grad=True)
    v = torch.randn(batch_size, embed, device=device, generator=g, requires_grad=True)
    loss_s = median_seconds(lambda: criterion(u, v, resident["label"], resident["group"]).backward(), steps, sync)

    # Counted after the timings: the counter's module hooks must not be around while they run.
    flops = step_flops(model, criterion, resident, device, on_gpu)
    row = {"batch": batch_size, "compiled": compile_towers, "step_s": step_s, "samples_per_s": batch_size / step_s,
           "no_host_sync_samples_per_s": batch_size / no_sync_s,
           "tflops": flops / step_s / 1e12, "loss_share": loss_s / step_s, "flops_per_sample": flops / batch_size}
    peak = peak_tflops()
    row["mfu"] = row["tflops"] / peak if peak else None
    if loader_workers:
        rows = jpeg_rows(max(2 * batch_size, 512 if steps >= 5 else 16))
        loader = torch.utils.data.DataLoader(
            PreprocessedBatches(rows, batch_size, steps + warm), batch_size=None, shuffle=False, num_workers=loader_workers,
            pin_memory=on_gpu, prefetch_factor=4, persistent_workers=False)
        clock = PhaseClock(sync=sync)
        batches = iter(loader)
        started = None
        for index in range(steps + warm):
            if index == warm:  # the loader's workers are up and ahead: time from here
                clock = PhaseClock(sync=sync)
                started = time.perf_counter()
            clock.begin_step()
            with phase("data_wait"):
                batch = next(batches)
            train_step(model, criterion, optimizer, scheduler, batch, device, on_gpu, cfg.train.grad_clip_norm)
            clock.end_step()
        elapsed = time.perf_counter() - started
        row["fed_samples_per_s"] = steps * batch_size / elapsed
        row["fed_phases"] = {name: seconds / clock.step_seconds for name, seconds in clock.seconds.items() if seconds}
    say(format_row(row))
    return row


TABLE_HEADER = ("| batch | towers | step ms | samples/s | TFLOP/s | MFU | loss share | samples/s, no host sync | "
                "fed by the DataLoader: samples/s, data wait, phases |\n|---:|---|---:|---:|---:|---:|---:|---:|---|")


def format_row(row: dict) -> str:
    mfu = f"{100 * row['mfu']:.0f}%" if row.get("mfu") is not None else "-"
    fed = "-"
    if "fed_samples_per_s" in row:
        phases = ", ".join(f"{name} {100 * share:.0f}%" for name, share in
                           sorted(row["fed_phases"].items(), key=lambda item: -item[1]) if share >= 0.01)
        fed = f"{row['fed_samples_per_s']:.0f}, data wait {100 * row['fed_phases'].get('data_wait', 0):.1f}% ({phases})"
    return (f"| {row['batch']} | {'compiled' if row['compiled'] else 'eager'} | {1000 * row['step_s']:.1f} | "
            f"{row['samples_per_s']:.0f} | {row['tflops']:.3g} | {mfu} | {100 * row['loss_share']:.1f}% | "
            f"{row['no_host_sync_samples_per_s']:.0f} | {fed} |")
