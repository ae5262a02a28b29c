"""Check the GPU paths of the training step on a CUDA machine, without Ray, and measure it.

    python benchmarks/gpu_check.py [--out FILE] [--compile] [--profile FILE] [--only-throughput] [--quick] [--device cpu]

What it exercises, with the project's own code: a nccl process group (world size 1) under
the loss's gather and gradient averaging (gathered = local loss and gradients on the device);
pinned-memory collation and non-blocking copies; bf16 autocast of both towers with the loss in
float32 (bf16 loss and gradients against a float32 step of the same model); FSDP2-sharded
towers (bf16 parameters, float32 reduction, activation checkpointing, patch dropout) against
the bare model, and their gathered state; the phase clock's
device synchronisation; a few epochs of the default model on the built-in shapes data (the
loss must fall); bf16 evaluation; tiled losses against the dense ones on the device, a step
with tiled loss + cached-gradient micro-batches under autocast, and two more with a sharded
negative memory besides; forward + backward time of every loss beside the matmul floor on the
GPU (B = 2048 and 8192, d = 256); and the throughput of a CLIP ViT-B/32-sized training step
at 256 and 1024 samples per GPU (``step_throughput.py``: samples/s, TFLOP/s and model FLOPs
utilisation, the loss's share, and the data wait when the project's preprocessing feeds it
through a DataLoader), against these anchors: OpenCLIP ViT-B/32 ≈ 725–775 samples/s
per A100; target ≥ 1,100 samples/s per H100/H200 with data wait ≤ 5%.

What it needs on the GPU machine: torch, torchvision, transformers, tokenizers, safetensors,
pyarrow, numpy, pillow, pyyaml (a PyTorch image has them) and this repository (``vcl_dist`` on
``sys.path``: run it from the repository root, or ``pip install --no-deps -e .``), plus
``pydantic`` (with ``pydantic-core``, ``annotated-types``, ``typing-inspection``) and
``omegaconf`` (with ``antlr4-python3-runtime``) for the config, ``simplejpeg`` and ``torchcodec``
for the decoders. Not Ray. Carried as wheels for
a machine without a registry (Python 3.12 there)::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core annotated_types \
        typing_inspection omegaconf antlr4-python3-runtime simplejpeg torchcodec
    # there:
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. \
        python benchmarks/gpu_check.py --out gpu_check.txt

``--quick``: small sizes everywhere and a small stand-in for the ViT-B/32-sized model (the CPU dry
run the tests make; no timings of note).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from common import median_seconds
from loss_candidates import loss_candidates
from step_throughput import TABLE_HEADER, measure

from vcl_dist.class_names import CLASSES_FILE, parse_class_names
from vcl_dist.config import load_config
from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.data.shapes import ensure_shapes_dataset
from vcl_dist.data.shard_format import drop_bad_rows
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.evaluate import embed_batches, retrieval_metrics, zero_shot_accuracy
from vcl_dist.losses import InfoNCELoss, TripletLoss, VCRLLoss, build_loss
from vcl_dist.models import build_dual_encoder
from vcl_dist.runtime.console import one_line
from vcl_dist.runtime.precision import autocast
from vcl_dist.runtime.step_phases import PhaseClock
from vcl_dist.train.schedule import build_optimizer, build_scheduler
from vcl_dist.train.step import collate_rows, train_step


def preprocessed_batches(split_dir: Path, preprocessor: Preprocessor, batch_size: int, pin: bool):
    for file in sorted(split_dir.glob("*.parquet")):
        table = pq.read_table(file)
        for start in range(0, table.num_rows - batch_size + 1, batch_size):
            chunk = table.slice(start, batch_size)
            rows = {name: chunk[name].to_numpy(zero_copy_only=False) for name in chunk.column_names}
            batch, _, bad_shards = drop_bad_rows(collate_rows(preprocessor(rows), pin_memory=pin))
            assert not bad_shards, bad_shards
            yield batch


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, repeats=20) -> float:
    return 1000 * median_seconds(fn, repeats, synchronize)


def check_tiled_losses(device: torch.device, say) -> None:
    """Tiled = dense on this device, float32: the largest differences of values and gradients."""
    g = torch.Generator(device=device).manual_seed(1)
    image = torch.randn(600, 64, device=device, generator=g, requires_grad=True)
    text = torch.randn(600, 64, device=device, generator=g, requires_grad=True)
    labels = torch.randint(-1, 20, (600,), device=device, generator=g)
    groups = torch.arange(600, device=device) // 2
    losses = {f"triplet {mode}": lambda chunk, mode=mode: TripletLoss(0.2, mode, chunk_size=chunk)
              for mode in ("hardest", "semi_hard", "all")}
    losses["vcrl all"] = lambda chunk: VCRLLoss(1.0, 0.01, "all", chunk_size=chunk)
    losses["infonce"] = lambda chunk: InfoNCELoss(chunk_size=chunk)
    for name, make in losses.items():
        results = []
        for chunk in (None, 128):
            loss = make(chunk).to(device)(image, text, labels, groups)
            results.append((loss.detach(), *torch.autograd.grad(loss, (image, text))))
        worst = max(float((a - b).abs().max()) for a, b in zip(*results))
        say(f"tiled (chunk 128) vs dense on {device.type}, {name}: largest difference {worst:.2e}")


def check_gather_on_device(device: torch.device, say) -> None:
    """The gathered loss (``gather: full``: all-gather with gradient over the process group,
    here nccl with one rank) equals the local one, values and gradients, on the device."""
    g = torch.Generator(device=device).manual_seed(2)
    image = torch.randn(256, 64, device=device, generator=g, requires_grad=True)
    text = torch.randn(256, 64, device=device, generator=g, requires_grad=True)
    labels = torch.randint(0, 10, (256,), device=device, generator=g)
    groups = torch.arange(256, device=device)
    results = []
    for gather in ("local", "full"):
        loss = TripletLoss(0.2, "semi_hard", gather=gather).to(device)(image, text, labels, groups)
        results.append((loss.detach(), *torch.autograd.grad(loss, (image, text))))
    worst = max(float((a - b).abs().max()) for a, b in zip(*results))
    say(f"{dist.get_backend()} gather (world {dist.get_world_size()}) vs local loss on {device.type}: "
        f"largest difference of value and gradients {worst:.2e}")


def check_sharded_towers(device: torch.device, amp: bool, say, quick: bool = False) -> None:
    """``train.strategy=fsdp`` on the device (one rank of the process group): five steps of a
    small ViT + text tower sharded with FSDP2 (bf16 parameters and float32 gradient reduction
    under autocast), with activation checkpointing and patch dropout 0.5, against the same
    steps of the bare model; then its whole state, gathered, loaded into a bare model gives the
    same embeddings."""
    from vcl_dist.models import build_dual_encoder
    from vcl_dist.train.schedule import build_optimizer, build_scheduler
    from vcl_dist.train.sharding import bare_model, shard_model
    from vcl_dist.train.state_dicts import whole_state
    from vcl_dist.train.step import train_step
    from vcl_dist.train.tower_options import checkpoint_blocks

    # --quick: the built-in small towers at 32 px (no patches to drop), for the CPU dry run.
    towers = (["model.image.width=8", "model.text.num_layers=2"] if quick else
              ["model.image.arch=vit_b_32", "model.image.patch_dropout=0.5", "model.text.num_layers=2"])
    cfg = load_config(None, towers)
    g = torch.Generator().manual_seed(3)
    rows, steps, size = (4, 3, 32) if quick else (16, 5, 224)
    batches = [{"image": torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=g),
                "input_ids": torch.randint(1, 4000, (rows, 16), generator=g), "attention_mask": torch.ones(rows, 16, dtype=torch.long),
                "label": torch.full((rows,), -1), "group": torch.arange(rows)} for _ in range(steps)]
    losses, models = {}, {}
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = build_dual_encoder(cfg.model, 4000, 16)
        checkpoint_blocks(model)
        model = shard_model(model, strategy, device, 1, amp)
        criterion = InfoNCELoss().to(device)
        optimizer = build_optimizer([bare_model(model), criterion], 1e-4, 0.05)
        scheduler = build_scheduler(optimizer, 0, 10, 0.1)
        torch.manual_seed(1)  # the same patches dropped
        losses[strategy] = [float(train_step(model, criterion, optimizer, scheduler, batch, device, amp, 1.0)) for batch in batches]
        models[strategy] = (model, criterion)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["fsdp"], losses["ddp"]))
    dropout = ", patch dropout 0.5" if not quick else ""
    say(f"FSDP2 on {device.type} ({'bf16 parameters, float32 reduction' if amp else 'float32'}, activation checkpointing"
        f"{dropout}) vs the bare model, {steps} steps: losses {', '.join(f'{x:.4f}' for x in losses['fsdp'])}, "
        f"largest relative difference {worst:.2e}")
    state = whole_state(*models["fsdp"], None).model
    bare = build_dual_encoder(cfg.model, 4000, 16).to(device)
    bare.load_state_dict(state)
    sharded = models["fsdp"][0]
    sharded.eval(), bare.eval()
    with torch.no_grad():
        image = batches[0]["image"][:4].to(device)
        difference = float((sharded.encode_image(image) - bare.encode_image(image)).abs().max())
    say(f"FSDP2 whole state loaded into a bare model: largest embedding difference {difference:.2e}")


def check_device_decode(device: torch.device, say, quick: bool = False) -> None:
    """``data.decode=gpu``: a batch of crawl-like JPEGs (256–512 px a side) decoded, cropped and
    resized to 224 px on the device (TorchCodec's batched nvJPEG), against the CPU way in this
    process (one core): images/s each, so one GPU's decode in CPU cores, and the pictures' difference."""
    import numpy as np
    from data_speed import crawl_like
    from PIL import Image

    from vcl_dist.data.images import ImageGeometry
    from vcl_dist.train.device_decode import collate_decoding_on_device

    count = 16 if quick else 256
    rng = np.random.default_rng(0)
    images = [crawl_like(Image.new("RGB", (128, 128), tuple(int(c) for c in rng.integers(0, 255, 3))), rng)
              for _ in range(count)]
    rows = {"key": np.array([f"k{i}" for i in range(count)], dtype=object), "image": np.array(images, dtype=object),
            "caption": np.array(["a picture"] * count, dtype=object)}
    tokenizer = train_wordpiece(["a picture"], 50)
    geometry = ImageGeometry(224)
    try:
        shipped = Preprocessor(tokenizer, geometry, 8, augment=True, device_decode=True)(rows)
        on_cpu = Preprocessor(tokenizer, geometry, 8, augment=True, fast_decode=True)
        cpu_s = median_seconds(lambda: on_cpu(rows), 3)
        decode = lambda: collate_decoding_on_device(shipped, geometry, device, pin_memory=device.type == "cuda")  # noqa: E731
        device_s = median_seconds(decode, 5, synchronize)
        batch = decode()
        diff = (batch["image"].cpu().int() - torch.from_numpy(on_cpu(rows)["image"]).int()).abs().float()
        say(f"\ndata.decode=gpu, {count} JPEGs of 256–512 px to 224 px: {count / device_s:,.0f} images/s on the device, "
            f"{count / cpu_s:,.0f} images/s on one CPU core (data.decode=cpu): one device's decode ≈ "
            f"{cpu_s / device_s:.1f} cores; pictures against the CPU way: mean |Δ| {diff.mean():.2f}, "
            f"max {diff.max():.0f} grey levels, {int(batch['valid'].sum())}/{count} decoded")
    except Exception as err:  # one failed check must not cost the rest of the run
        say(f"FAILED: data.decode=gpu: {type(err).__name__}: {one_line(err, 300)}")


def check_bf16_against_fp32(model, criterion, batch: dict, device: torch.device, say) -> None:
    """The same model and batch, towers in bf16 autocast vs float32: the loss's relative
    difference and the cosine of the two gradients (what bf16 training changes per step)."""
    results = []
    on_device = {name: t.to(device) for name, t in batch.items() if isinstance(t, torch.Tensor)}
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with autocast(device, amp):
            u, v = model(on_device["image"], on_device["input_ids"], on_device["attention_mask"])
        loss = criterion(u.float(), v.float(), on_device["label"], on_device["group"])
        loss.backward()
        grads = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
        results.append((loss.item(), grads))
    model.zero_grad(set_to_none=True)
    (fp32, g32), (bf16, g16) = results
    cosine = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    say(f"bf16 autocast vs float32, same model and batch: loss {bf16:.5f} vs {fp32:.5f} "
        f"(relative difference {abs(bf16 - fp32) / abs(fp32):.2e}), gradient cosine {cosine:.5f}")


def check_training_paths(args, device: torch.device, work: Path, say) -> None:
    """The default model trained on the built-in data through the project's step, then the
    bf16, tiled, micro-batch and sharded-memory paths, then every loss against the matmul floor."""
    on_gpu = device.type == "cuda"
    shapes = ([f"data.shapes.num_train={512 if args.quick else 4096}", f"data.shapes.num_val={100 if args.quick else 300}"])
    cfg = load_config(Path(__file__).parent.parent / "jobs/configs/default.yaml", shapes)
    s = cfg.data.shapes
    root = ensure_shapes_dataset(work / "cache", s.num_train, s.num_val, s.image_size, s.val_captions_per_image, s.seed)
    captions = pq.read_table(sorted((root / "train").glob("*.parquet")), columns=["caption"]).column(0).to_pylist()
    tokenizer = train_wordpiece(captions, cfg.model.text.vocab_size)
    class_names = parse_class_names((root / CLASSES_FILE).read_text())
    train_pre = Preprocessor(tokenizer, cfg.data.image_size, cfg.data.max_text_length, augment=True)
    val_pre = Preprocessor(tokenizer, cfg.data.image_size, cfg.data.max_text_length, augment=False)
    train_batches = list(preprocessed_batches(root / "train", train_pre, cfg.train.batch_size, on_gpu))
    val_batches = list(preprocessed_batches(root / "val", val_pre, 100, on_gpu))
    if on_gpu:
        say(f"batches pinned: {all(t.is_pinned() for t in train_batches[0].values())}")

    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id).to(device)
    criterion = build_loss(cfg.loss, len(class_names), cfg.model.embed_dim).to(device)
    epochs = args.epochs
    optimizer = build_optimizer([model, criterion], cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, 20, epochs * len(train_batches), cfg.train.min_lr_ratio)
    with autocast(device, on_gpu):
        probe = train_batches[0]
        u, v = model(probe["image"].to(device), probe["input_ids"].to(device), probe["attention_mask"].to(device))
    say(f"tower output dtype under autocast: {u.dtype} / {v.dtype}")
    clock = PhaseClock(sync=synchronize)
    clock.begin_step()
    train_step(model, criterion, optimizer, scheduler, train_batches[0], device, on_gpu, cfg.train.grad_clip_norm)
    clock.end_step()
    timed = ", ".join(f"{name} {1000 * seconds:.2f}" for name, seconds in clock.seconds.items() if seconds)
    say(f"phase clock on {device.type} (synchronised): step {1000 * clock.step_seconds:.2f} ms = {timed} ms")

    for epoch in range(epochs):
        synchronize()
        start = time.perf_counter()
        losses = [train_step(model, criterion, optimizer, scheduler, b, device, on_gpu, cfg.train.grad_clip_norm) for b in train_batches]
        synchronize()
        elapsed = time.perf_counter() - start
        embeddings = embed_batches(model, val_batches, device, amp=on_gpu)
        metrics = retrieval_metrics(embeddings, cfg.eval.recall_ks)
        zero_shot = zero_shot_accuracy(model, tokenizer, class_names, cfg.eval.prompt_template, embeddings, device,
                                       cfg.data.max_text_length)
        say(f"epoch {epoch + 1}: loss {statistics.mean(losses):.4f} (first step {losses[0]:.4f}), "
            f"{len(train_batches) * cfg.train.batch_size / elapsed:.0f} samples/s, "
            f"t2i class R@1 {metrics['t2i_class_r1']:.3f}, zero-shot {zero_shot:.3f}")
    if on_gpu:
        say(f"peak GPU memory in training: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    # After training: at initialisation every pair sits near the margin, and which negative is
    # semi-hard flips with the last bit of a distance, so the gradients would compare noise.
    check_bf16_against_fp32(model, criterion, train_batches[0], device, say)
    check_tiled_losses(device, say)
    micro_cfg = cfg.loss.model_copy(update={"chunk_size": 40})
    tiled_criterion = build_loss(micro_cfg, len(class_names), cfg.model.embed_dim).to(device)
    tiled_loss = train_step(model, tiled_criterion, optimizer, scheduler, train_batches[0], device, on_gpu,
                            cfg.train.grad_clip_norm, micro_batch_size=32)
    say(f"a step with loss.chunk_size=40 and train.micro_batch_size=32 under autocast: loss {tiled_loss:.4f}")
    # All three together: tiles, micro-batches and a sharded memory (world 1 here: the shard is
    # the whole memory, the collectives run on the device's backend), two steps so the second
    # one draws on the memory.
    shard_cfg = micro_cfg.model_copy(update={"memory_size": 4 * cfg.train.batch_size, "memory_shard": True})
    shard_criterion = build_loss(shard_cfg, len(class_names), cfg.model.embed_dim).to(device)
    shard_losses = [train_step(model, shard_criterion, optimizer, scheduler, batch, device, on_gpu, cfg.train.grad_clip_norm,
                               micro_batch_size=32) for batch in train_batches[:2]]
    say(f"two steps with chunk 40, micro-batches of 32 and a sharded memory under autocast: losses "
        f"{shard_losses[0]:.4f}, {shard_losses[1]:.4f}; memory rows {shard_criterion.memory.filled} on "
        f"{shard_criterion.memory.image.device.type}")

    say("\n| B | loss | ms | x floor |\n|---:|---|---:|---:|")
    for batch in args.sizes:
        g = torch.Generator(device=device).manual_seed(0)
        image = torch.randn(batch, 256, device=device, generator=g, requires_grad=True)
        text = torch.randn(batch, 256, device=device, generator=g, requires_grad=True)
        labels = torch.randint(0, 100, (batch,), device=device, generator=g)
        groups = torch.arange(batch, device=device)

        timings = {name: median_ms(step) for name, step in loss_candidates(image, text, labels, groups).items()}
        for name, ms in timings.items():
            say(f"| {batch} | {name} | {ms:.2f} | {ms / timings['matmul floor']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (gloo, no timings of note)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--throughput-batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per throughput row")
    parser.add_argument("--loader-workers", type=int, default=12, help="DataLoader processes feeding the step")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd towers")
    parser.add_argument("--profile", default=None, help="a torch.profiler table of the first throughput row, to this file")
    parser.add_argument("--only-throughput", action="store_true", help="skip to the ViT-B/32-sized step's table")
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere: the CPU dry run")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.sizes, args.throughput_batches, args.steps, args.loader_workers = 1, [256], [4], 2, 1
    out = Path(args.out) if args.out else None
    if out:
        out.write_text("")

    def say(text: str) -> None:
        print(text, flush=True)
        if out:  # line by line: a run stopped at its time limit keeps what it measured
            with out.open("a") as file:
                file.write(text + "\n")

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        say(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        ms = median_ms(lambda: a @ b, repeats=10)
        say(f"bf16 8192³ matrix product: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s (the MFU below is against the data sheet)")
        del a, b
    work = Path(tempfile.mkdtemp())
    try:
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{work}/rendezvous", rank=0, world_size=1)
    except Exception as err:  # say it and measure the rest on gloo rather than losing the run
        say(f"FAILED: nccl process group: {type(err).__name__}: {one_line(err, 300)}")
        dist.init_process_group("gloo", init_method=f"file://{work}/rendezvous-gloo", rank=0, world_size=1)

    say(f"process group backend: {dist.get_backend()}")
    check_gather_on_device(device, say)
    check_sharded_towers(device, on_gpu, say, args.quick)
    check_device_decode(device, say, args.quick)

    if not args.only_throughput:
        check_training_paths(args, device, work, say)

    model = "a small stand-in model (--quick)" if args.quick else "CLIP ViT-B/32-sized training step"
    say(f"\n{model} ({'bf16 autocast' if on_gpu else 'float32'}; "
        f"{args.steps} timed steps back to back a row; fed: {args.loader_workers} DataLoader workers)")
    say(TABLE_HEADER)
    for batch in args.throughput_batches:
        measure(batch, device, args.steps, args.loader_workers, say,
                profile_to=args.profile if batch == args.throughput_batches[0] else None, stand_in=args.quick)
        if on_gpu:
            torch.cuda.empty_cache()
    if args.compile:
        for batch in args.throughput_batches:
            measure(batch, device, args.steps, 0, say, compile_towers=True, stand_in=args.quick)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
