"""Typed configuration: YAML files plus ``section.key=value`` overrides, validated up front.

OmegaConf reads the YAML and the dotted command-line overrides and merges them; pydantic
checks the merged tree against the sections below (unknown keys are errors, values are
range-checked). Every problem becomes one `ConfigError` with a one-line message that
names the offending key, raised before Ray starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .redaction import redact_values
from .runtime.console import one_line


class ConfigError(ValueError):
    """A config that cannot run; ``str(err)`` is a single line naming the key."""


class Section(BaseModel):
    # extra="forbid": a typo in a key must stop the run, not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShapesConfig(Section):
    """The built-in synthetic dataset (see `vcl_dist.data.shapes`)."""

    num_train: int = Field(6000, ge=16, description="training images")
    num_val: int = Field(600, ge=16, description="validation images")
    image_size: int = Field(64, ge=16, le=512, description="side of the generated square pictures")
    val_captions_per_image: int = Field(2, ge=1, le=10, description="captions of each validation image (an image_id group)")
    seed: int = Field(0, description="the generator's seed: another seed, another dataset")


class S3Config(Section):
    """Where S3 is; credentials come from the standard AWS chain, never from here."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:9000 for MinIO; default: AWS")
    region: str | None = Field(None, description="the bucket's region; default: the AWS chain's (AWS_REGION, ~/.aws/config)")
    anonymous: bool = Field(False, description="read public buckets without credentials")
    run_attempts: int = Field(8, ge=1, le=20, description="tries of each request to the run's storage while training "
                              "(checkpoints, Ray Train's records), backing off up to 20 s between tries: 8 rides out "
                              "about a minute of outage; checks before a run starts try 3 times")


def source_name(path: str) -> str:
    """A source's default name: its path's last part (without a glob or a trailing slash)."""
    parts = [p for p in path.rstrip("/").split("/") if p and not any(c in p for c in "*?[")]
    return (parts[-1] if parts else "source")[:64]


class TrainSourceConfig(Section):
    """One training source of a weighted mixture (``data.sources``; see `vcl_dist.data.mixture`)."""

    path: str = Field(description="its shards: a folder, a glob or an s3:// prefix")
    format: Literal["parquet", "webdataset"] | None = Field(None, description="default: data.source")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="its share of every epoch's rows, relative to the "
                          "other sources' weights")
    replacement: bool = Field(False, description="false: an epoch continues where the last one stopped and no row comes "
                              "back before the source is used up; true: its units drawn at random, with replacement")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="its name in reports; default: the "
                             "path's last part")


class DataConfig(Section):
    """Where the image–text pairs are and how they are read, decoded and augmented."""

    source: Literal["shapes", "parquet", "webdataset"] = Field(
        "shapes", description="shapes: the built-in synthetic data; parquet or webdataset: the shards at train_path and val_path")
    train_path: str | None = Field(None, description="the training shards: a folder, a glob or an s3:// prefix")
    sources: list[TrainSourceConfig] = Field(
        default_factory=list, max_length=64, description="training sources mixed by weight, instead of data.train_path "
        "(the validation split stays data.val_path)")
    epoch_rows: int | None = Field(None, ge=1, description="with data.sources: rows an epoch draws from them all; "
                                   "default: their rows together")
    val_path: str | None = Field(None, description="the validation shards: a folder, a glob or an s3:// prefix")
    classes_path: str | None = Field(None, description="default: classes.txt beside the val shards")
    cache_dir: str = Field("~/.cache/vcl-dist", description="where the built-in data is generated (once)")
    shapes: ShapesConfig = Field(default_factory=ShapesConfig, description="the built-in synthetic dataset")
    image_size: int = Field(48, ge=16, le=1024, description="side of the square image fed to the tower")
    augment: bool = Field(True, description="training pictures get a random resized crop and flip, seeded per row")
    max_text_length: int = Field(32, ge=4, le=512, description="tokens a caption is cut or padded to")
    preprocess_batch_size: int = Field(128, ge=1, description="rows a preprocessing task decodes and tokenises at once")
    preprocess_workers: int | None = Field(None, ge=1, description="most concurrent preprocessing tasks of each training "
                                           "worker's reads (and of evaluation); default: as CPUs allow")
    shuffle_buffer: int = Field(1024, ge=0, description="rows shuffled together: each epoch's read units, in a new "
                                "order, are taken into groups of at least this many rows, shuffled within a group")
    decode: Literal["cpu", "gpu", "pillow"] = Field(
        "cpu", description="how training decodes its pictures: cpu: JPEGs with libjpeg-turbo at a reduced scale where the "
        "crop allows, resized by torch's antialiased kernel (within a grey level or two of Pillow's); gpu: JPEGs travel "
        "encoded and are decoded, cropped and resized on the training device (nvJPEG; libjpeg on a CPU worker); "
        "pillow: exactly as evaluation and serving do")
    prefetch_batches: int = Field(2, ge=0, description="batches each worker's iterator prepares ahead")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="stop when more rows than this are undecodable")
    resize: Literal["squash", "shorter_side"] = Field(
        "squash", description="squash: the whole picture to image_size²; shorter_side: the shorter side to resize_side, "
        "then the centre image_size² (CLIP's preprocessing; set from model.init)")
    resize_side: int | None = Field(None, ge=16, le=2048, description="shorter_side: the side before the centre crop; "
                                    "default: image_size")
    interpolation: Literal["bilinear", "bicubic"] = Field("bilinear", description="the resize filter (set from model.init)")
    crop_offset: Literal["floor", "round"] = Field("floor", description="shorter_side: the centre crop's offset rounded "
                                                   "down (Hugging Face's processors) or to nearest (torchvision's, OpenCLIP)")
    features_path: str | None = Field(None, description="where a locked image tower's outputs are stored once computed "
                                      "(shared storage on a multi-node cluster); default: _features beside the training "
                                      "shards (the built-in data: in cache_dir)")

    @model_validator(mode="after")
    def _paths_for_parquet(self) -> "DataConfig":
        if self.source != "shapes":
            for key in ("val_path",) if self.sources else ("train_path", "val_path"):
                if not getattr(self, key):
                    raise ValueError(f"data.{key} is required when data.source is '{self.source}'")
        if self.sources:
            if self.source == "shapes" or self.train_path:
                raise ValueError("data.sources replaces data.train_path, and needs data.source parquet or webdataset "
                                 "(the format of data.val_path)")
            names = [s.name or source_name(s.path) for s in self.sources]
            if len(set(names)) != len(names):
                raise ValueError(f"data.sources: two sources are named alike ({', '.join(names)}): give them a name")
        elif self.epoch_rows is not None:
            raise ValueError("data.epoch_rows is for data.sources")
        if self.resize_side is not None and self.resize_side < self.image_size:
            raise ValueError(f"data.resize_side ({self.resize_side}) must be at least data.image_size ({self.image_size})")
        return self


class ImageTowerConfig(Section):
    """The image tower: a built-in small ResNet, a torchvision or timm backbone, pretrained or not."""

    arch: str = Field("small_resnet", description="'small_resnet', any torchvision.models name, or timm:<name>")
    width: int = Field(32, ge=4, le=512, description="small_resnet: channels of the first stage")
    blocks: list[int] = Field(default_factory=lambda: [1, 1, 1, 1], min_length=1, max_length=6,
                              description="small_resnet: residual blocks of each stage")
    small_input: bool = Field(True, description="torchvision ResNets: 3x3 stride-1 stem, no max-pool")
    weights: str | None = Field(None, description="torchvision weights name (e.g. DEFAULT), or a local file or folder "
                                "of weights (a torch state dict or safetensors; timm: also a hub folder)")
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406], min_length=3, max_length=3,
                              description="per-channel mean the pixels are normalised with (set from model.init)")
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225], min_length=3, max_length=3,
                             description="per-channel standard deviation the pixels are normalised with (set from model.init)")
    lock: bool = Field(False, description="freeze the tower (LiT): eval mode, no gradients, not in the optimizer")
    unlocked_groups: int = Field(0, ge=0, description="with lock: leave the last N layer groups trainable")
    patch_dropout: float = Field(0.0, ge=0, le=0.9, description="ViT towers: in training, drop this share of each "
                                 "picture's patches (FLIP): faster steps, evaluation sees every patch")

    @model_validator(mode="after")
    def _positive_std(self) -> "ImageTowerConfig":
        if min(self.std) <= 0:
            raise ValueError("model.image.std must be positive")
        return self


class TextTowerConfig(Section):
    """The text tower: a small transformer trained from scratch, or a pretrained transformers encoder."""

    pretrained: str | None = Field(None, description="transformers name or local folder")
    hidden_size: int = Field(128, ge=8, description="from scratch: width of the transformer")
    num_layers: int = Field(2, ge=1, le=48, description="from scratch: transformer layers")
    num_heads: int = Field(4, ge=1, description="from scratch: attention heads (hidden_size must be a multiple)")
    intermediate_size: int = Field(256, ge=8, description="from scratch: width of each feed-forward block")
    vocab_size: int = Field(4000, ge=64, description="size of the tokenizer trained on captions")
    pooling: Literal["auto", "mean", "cls"] = Field("auto", description="auto: as the pretrained model's "
                                                    "sentence-transformers pooling config says, else mean")
    lock: bool = Field(False, description="freeze the tower (LiT): eval mode, no gradients, not in the optimizer")
    unlocked_groups: int = Field(0, ge=0, description="with lock: leave the last N layer groups trainable")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TextTowerConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("model.text.hidden_size must be a multiple of model.text.num_heads")
        return self


class ModelConfig(Section):
    """The dual encoder: both towers and the shared space they project into."""

    init: str | None = Field(None, description="a Hugging Face CLIPModel (hub name or local folder), or open_clip:<name> "
                             "(an OpenCLIP architecture, or open_clip:local-dir:<folder>), to start both towers, the "
                             "projections, tokenizer, image preprocessing and logit scale from")
    init_weights: str | None = Field(None, description="open_clip:<architecture>: its weights (a local file or an "
                                     "OpenCLIP pretrained tag)")
    embed_dim: int = Field(128, ge=2, le=8192, description="size of the shared space (set from model.init)")
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig, description="the image tower")
    text: TextTowerConfig = Field(default_factory=TextTowerConfig, description="the text tower")


class LossConfig(Section):
    """The contrastive loss over the global pool, its negatives, and how the pool is exchanged and held."""

    name: Literal["triplet", "vcrl", "infonce", "sigmoid"] = Field(
        "triplet", description="the triplet hinge, VCRL (hinge on raw distances + norm penalty, optional label tower), "
        "InfoNCE (CLIP), or the pairwise sigmoid loss (SigLIP)")
    margin: float = Field(0.2, gt=0, description="hinge margin on squared distances")
    negatives: Literal["hardest", "semi_hard", "all"] = Field(
        "semi_hard", description="triplet, vcrl: the closest negative, the closest one beyond the positive, or all "
        "negatives averaged")
    gather: Literal["local", "full", "ring"] = Field(
        "local", description="local: this worker's anchors against the gathered pool; full: every anchor on every worker; "
        "ring (sigmoid only): caption blocks passed round the workers, no gathered pool")
    reg_lambda: float = Field(0.01, ge=0, description="vcrl: λ of λ(‖U‖²+‖V‖²)/N")
    label_tower: bool = Field(False, description="vcrl: learn one embedding per class")
    label_weight: float = Field(1.0, ge=0, description="vcrl: weight of the label-tower terms")
    num_classes: int | None = Field(None, ge=1, description="vcrl label tower; default: lines of classes.txt")
    init_temperature: float = Field(0.07, gt=0, le=1, description="infonce: initial temperature")
    max_logit_scale: float = Field(100.0, gt=1, description="infonce, sigmoid: clamp of the logit scale (1/temperature)")
    init_scale: float = Field(10.0, gt=0, description="sigmoid: initial logit scale s (SigLIP: 10)")
    init_bias: float = Field(-10.0, description="sigmoid: initial logit bias b (SigLIP: -10)")
    memory_size: int = Field(0, ge=0, description="rows of the negative memory; 0 = off")
    memory_warmup_steps: int = Field(0, ge=0, description="steps before the memory is used")
    memory_shard: bool = Field(False, description="each worker holds 1/W of the memory rows; the losses reduce over "
                               "each shard and combine with small collectives (same results as replicated)")
    chunk_size: int | None = Field(None, ge=1, description="tile the pool in chunks of this many rows: memory "
                                   "[anchors × chunk] instead of [anchors × pool]; null = dense")

    @model_validator(mode="after")
    def _exchange_fits_the_loss(self) -> "LossConfig":
        if self.gather == "ring" and self.name != "sigmoid":
            raise ValueError("loss.gather=ring passes caption blocks round the workers, which only loss.name=sigmoid can "
                             "use (the others need the whole pool at once): use local or full")
        if self.name == "sigmoid" and self.memory_size and (self.memory_shard or self.gather == "ring"):
            raise ValueError("loss.name=sigmoid takes a replicated negative memory with loss.gather local or full only: "
                             "unset loss.memory_shard, or loss.memory_size with gather=ring")
        return self


class TrainConfig(Section):
    """The Ray Train workers, the optimizer and schedule, checkpoints, restarts and the step's speed options."""

    num_workers: int = Field(2, ge=1, description="training workers (the most, when elastic)")
    min_workers: int | None = Field(None, ge=1, description="elastic: go on with as few as this; default: not elastic")
    elastic_resize_interval_s: float = Field(60.0, gt=0, description="elastic: how often a running group checks whether "
                                             "the cluster now fits more workers (it grows back toward num_workers)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how workers are placed on nodes (Ray placement group strategy)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each training worker holds")
    data_cpus: int = Field(1, ge=1, description="CPUs a job counts for its data tasks when it is admitted to a cluster "
                           "that other jobs share (the tasks use any free CPU; this many stay free for them)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each training worker also holds, e.g. "
        "{'accelerator_type:A10G': 0.001} or a node type's own resource; CPUs and GPUs have their own keys")
    use_gpu: bool | Literal["auto"] = Field("auto", description="a GPU per worker; auto: when the cluster has GPUs "
                                            "at the job's start (set true on a cluster scaled to zero)")
    epochs: int = Field(8, ge=1, description="passes over the training rows")
    batch_size: int = Field(128, ge=2, description="global batch at num_workers workers: the negative pool of every step")
    lr: float = Field(2e-3, gt=0, le=1, description="at num_workers workers; scaled with the world size when elastic")
    weight_decay: float = Field(0.05, ge=0, description="AdamW's decoupled weight decay")
    warmup_steps: int = Field(50, ge=0, description="steps of the planned global batch (the schedule counts samples)")
    min_lr_ratio: float = Field(0.02, ge=0, le=1, description="the cosine schedule ends at lr × this")
    grad_clip_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; null: no clipping")
    amp: bool | Literal["auto"] = Field("auto", description="bf16 autocast; auto = on GPU only")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="the weights, activations, losses and optimizer state; float64 (several times slower) "
        "to check exactness: a run across restarts at other world sizes then equals one that never changed to far "
        "below 1e-6, where float32 rounding grows through training")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="weights, data order and augmentation")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1 = unlimited")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint inside epochs; default: epoch ends only")
    checkpoint_every_minutes: float | None = Field(None, gt=0, description="also checkpoint inside epochs once this much "
                                                   "wall time has passed since the last checkpoint (spot instances)")
    max_steps: int | None = Field(None, ge=1, description="stop (with a checkpoint) after this many steps in all")
    cache_locked_features: bool = Field(True, description="with model.image.lock (no unlocked groups) and data.augment "
                                        "off: compute the image tower's outputs once (Ray Data) and train on them")
    micro_batch_size: int | None = Field(None, ge=1, description="run the towers in micro-batches of this many rows "
                                         "with cached embedding gradients (GradCache): activations of one micro-batch at "
                                         "a time, the same gradient; default: the whole local batch at once")
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        False, description="torch.compile the image and text towers (inductor) in every worker; true = mode 'default'. "
        "The first steps compile (a minute or more); what it gains depends on the towers (measured: none for "
        "ViT-B/32 on an H200)")
    channels_last: bool = Field(False, description="the image tower and the image batches in channels-last memory "
                                "format: faster convolutions on GPUs with tensor cores")
    activation_checkpointing: bool = Field(False, description="keep only each transformer block's or ResNet stage's "
                                           "inputs for the backward pass and recompute the rest there: less activation "
                                           "memory for about a third more compute")
    keep_global_batch: bool = Field(False, description="elastic: with fewer workers than train.num_workers, each also "
                                    "trains on the missing workers' shares of the batch, as cached-gradient micro-batches: "
                                    "the planned global batch and learning rate at any group size")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds both towers, their gradients and AdamW's state; fsdp: each of them "
        "sharded over the workers (FSDP2: every transformer block and ResNet stage, then the whole model), 1/W each")

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of "
                f"train.num_workers ({self.num_workers})"
            )
        if self.batch_size // self.num_workers < 2:
            raise ValueError("train.batch_size must give every worker at least 2 samples")
        for name, amount in self.resources_per_worker.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"train.resources_per_worker: {name} has its own key (train.cpus_per_worker, train.use_gpu)")
            if not amount > 0 or amount != amount or amount == float("inf"):
                raise ValueError(f"train.resources_per_worker: {name} must be a positive finite amount, got {amount}")
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"train.min_workers ({self.min_workers}) must not exceed train.num_workers ({self.num_workers})")
        if self.strategy == "fsdp" and self.keep_global_batch:
            raise ValueError("train.keep_global_batch with train.strategy=fsdp: a worker with more shares runs more "
                             "micro-batches, and sharded towers need every worker in each one; use train.strategy=ddp")
        if self.dtype == "float64" and self.amp is True:
            raise ValueError("train.dtype=float64 with train.amp=true: autocast computes in bf16; leave one of them out")
        if self.strategy == "fsdp" and self.compile:
            raise ValueError("train.strategy=fsdp does not combine with train.compile (the sharded blocks' hooks break the "
                             "compiled graphs): leave one of them out")
        return self


# CLIP's 80 ImageNet templates (Radford et al., 2021, the prompt ensemble of its ImageNet
# evaluation): ``eval.prompt_templates: imagenet``.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)


class EvalConfig(Section):
    """Evaluation after every epoch: recall@K both ways, class-level recall, zero-shot accuracy."""

    batch_size: int = Field(256, ge=1, description="rows embedded at once")
    recall_ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1, description="the K of recall@K")
    prompt_template: str = Field("a photo of a {}", description="zero-shot prompt; {} is the class name")
    prompt_templates: list[str] | Literal["imagenet"] | None = Field(
        None, description="zero-shot prompt ensemble: each class's prompt embeddings averaged (CLIP's ensembling); "
        "'imagenet' = CLIP's 80 ImageNet templates; default: prompt_template alone")

    @property
    def templates(self) -> list[str]:
        """The zero-shot prompt templates in use."""
        if self.prompt_templates == "imagenet":
            return list(IMAGENET_TEMPLATES)
        return list(self.prompt_templates) if self.prompt_templates else [self.prompt_template]

    @model_validator(mode="after")
    def _template_has_slot(self) -> "EvalConfig":
        if "{}" not in self.prompt_template:
            raise ValueError("eval.prompt_template must contain '{}' for the class name")
        templates = [self.prompt_template]
        if isinstance(self.prompt_templates, list):
            if not self.prompt_templates:
                raise ValueError("eval.prompt_templates must not be empty (null: eval.prompt_template alone)")
            slotless = next((t for t in self.prompt_templates if "{}" not in t), None)
            if slotless is not None:
                raise ValueError(f"eval.prompt_templates: {slotless!r} has no '{{}}' for the class name")
            templates += self.prompt_templates
        for template in templates:
            # Filled with str.format and one class name at every evaluation: a second slot or a
            # named one would fail there, after an epoch of training, instead of here.
            try:
                template.format("class")
            except (IndexError, KeyError, ValueError):
                raise ValueError(f"eval: the prompt template {template!r} must take exactly one '{{}}' "
                                 "(write a literal brace as '{{' or '}}')") from None
        if any(k < 1 for k in self.recall_ks):
            raise ValueError("eval.recall_ks must be positive")
        return self


class RunConfig(Section):
    """Where a run goes and what it records."""

    name: str | None = Field(None, description="default: vcl-<timestamp>")
    storage_path: str = Field("runs", description="local folder or s3:// URI")
    checkpoints_to_keep: int = Field(2, ge=1, description="the newest checkpoints Ray Train keeps; older ones are deleted")
    trained_rows_log: str | None = Field(None, description="a local folder: every worker writes the keys of the rows "
                                         "of every step it trains (an audit of what the model saw)")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="where the run's metrics go besides metrics.jsonl: TensorBoard "
        "event files in <run>/tensorboard, MLflow (mlflow.*), Weights & Biases (wandb.*)")
    log_every_steps: int = Field(20, ge=1, description="tracked step metrics (loss, lr, samples/s, data wait) every this "
                                 "many steps (one small all-reduce each)")
    progress_every_s: float = Field(30.0, gt=0, description="without a terminal (job logs): a progress line at most this often")

    @model_validator(mode="after")
    def _trackers_once(self) -> "RunConfig":
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"run.trackers: each tracker at most once (got {self.trackers})")
        return self


class MlflowConfig(Section):
    """Where ``run.trackers: [mlflow]`` logs (needs ``pip install 'vcl-dist[mlflow]'``)."""

    tracking_uri: str | None = Field(None, description="a server (http://host:5000) or a database URI; default: "
                                     "sqlite:///<run.storage_path>/mlflow.db (a local storage path; ./mlflow.db otherwise)")
    experiment: str = Field("vcl-dist", min_length=1, description="the MLflow experiment; a Tune search logs its trials "
                            "under the search's own name")


class WandbConfig(Section):
    """Where ``run.trackers: [wandb]`` logs (needs ``pip install 'vcl-dist[wandb]'``)."""

    project: str = Field("vcl-dist", min_length=1, description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user; default: the API key's")
    mode: Literal["auto", "online", "offline"] = Field("auto", description="auto: online with WANDB_API_KEY set, "
                                                       "else offline (a run folder to `wandb sync` later)")


class Distribution(Section):
    """One searched key: ``uniform`` / ``loguniform`` / ``randint`` over [low, high), or ``choice`` of values."""

    type: Literal["uniform", "loguniform", "randint", "choice"] = Field(description="how the key's values are drawn")
    low: float | None = Field(None, description="uniform, loguniform, randint: the lowest value (included)")
    high: float | None = Field(None, description="uniform, loguniform, randint: the highest value (excluded)")
    values: list[Any] | None = Field(None, description="choice: the values to choose from")

    @model_validator(mode="after")
    def _well_formed(self) -> "Distribution":
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' distribution needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a '{self.type}' distribution needs low < high")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("a 'loguniform' distribution needs low > 0")
        return self

    def example(self) -> Any:
        """A value of the distribution, to check it against the config before any trial."""
        if self.type == "choice":
            return self.values[0]
        return int(self.low) if self.type == "randint" else self.low


def _default_space() -> dict[str, Distribution]:
    return {
        "loss.margin": Distribution(type="uniform", low=0.05, high=0.8),
        "loss.reg_lambda": Distribution(type="loguniform", low=1e-4, high=0.1),
        "train.lr": Distribution(type="loguniform", low=5e-4, high=5e-3),
    }


class TuneConfig(Section):
    """``python jobs/tune.py``: each trial is one distributed training run with sampled values.

    ``space`` maps dotted config keys to distributions; on the command line, address a key
    with brackets: ``'tune.space[loss.margin].high=0.6'``; ``'tune.space[train.lr]=null'`` drops
    a key of the default space.
    """

    name: str | None = Field(None, description="default: tune-<timestamp>")
    storage_path: str | None = Field(None, description="default: run.storage_path")
    search: Literal["optuna", "random"] = Field("optuna", description="optuna: TPE, seeded by tune.seed; random: random search")
    num_samples: int = Field(8, ge=1, description="trials in all")
    metric: str = Field("val_rsum", description="a metric of the per-epoch report")
    mode: Literal["max", "min"] = Field("max", description="whether tune.metric is better high or low")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop unpromising trials early, on epochs; none: run every trial to the end")
    grace_period: int = Field(1, ge=1, description="asha: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2, gt=1, description="asha: 1/fraction of trials kept at each rung")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as the cluster's CPUs or GPUs allow")
    seed: int = Field(0, description="seeds the search algorithm")
    space: dict[str, Distribution | None] = Field(
        default_factory=_default_space, description="dotted config key → {type: uniform | loguniform | randint, low, high} "
        "or {type: choice, values: [...]}; null drops a key of the default space")

    @property
    def searched(self) -> dict[str, Distribution]:
        return {key: dist for key, dist in self.space.items() if dist is not None}


# How a model trained with each loss ranks: triplet and InfoNCE work on L2-normalised
# embeddings (cosine), VCRL on raw ones (squared Euclidean distance).
SIMILARITY_OF_LOSS: dict[str, Literal["cosine", "squared_distance"]] = {
    "triplet": "cosine", "infonce": "cosine", "sigmoid": "cosine", "vcrl": "squared_distance"}


class Config(Section):
    """A whole job's config: one section a room."""

    s3: S3Config = S3Config()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
    mlflow: MlflowConfig = MlflowConfig()
    wandb: WandbConfig = WandbConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """``train.log_every_steps`` is ``run.log_every_steps`` now: configs saved before (and
        overrides written for them) still load."""
        if isinstance(data, dict) and isinstance(data.get("train"), dict) and "log_every_steps" in data["train"]:
            train = dict(data["train"])
            run = dict(data.get("run") or {})
            run["log_every_steps"] = train.pop("log_every_steps")
            data = {**data, "train": train, "run": run}
        return data

    @property
    def similarity(self) -> Literal["cosine", "squared_distance"]:
        """The similarity the model ranks by, given to it when it is built (and recorded in its
        export): downstream code asks the model, never the losses package."""
        return SIMILARITY_OF_LOSS[self.loss.name]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # Keys with dots (the tune space's) are written as the command line addresses them.
    key = "".join(f"[{part}]" if "." in str(part) else f".{part}" for part in first["loc"]).lstrip(".")
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        # Our cross-field checks name the keys involved, except inside the tune space.
        return f"{key}: {message}" if key.startswith("tune.space") else message
    if "input" in first and key:
        return f"{key}: {message} (got {first['input']!r})"
    return f"{key}: {message}" if key else message


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: Config | None = None) -> Config:
    """Merge a YAML file with ``a.b=value`` overrides and validate the result.

    ``base``: a config to start from (say, a trained model's) instead of the defaults.

    Raises:
        ConfigError: a missing or unparsable file, a malformed override, an unknown key or a
            bad value; the message is one line.
    """
    try:
        tree = OmegaConf.create(base.model_dump(mode="json") if base is not None else {})
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            loaded = OmegaConf.load(path)
            if not isinstance(OmegaConf.to_container(loaded), dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
            tree = OmegaConf.merge(tree, loaded)
        if OmegaConf.select(tree, "tune.space") is None:
            # The default space is the base that overrides edit, unless the file sets its own.
            space = {key: dist.model_dump() for key, dist in _default_space().items()}
            OmegaConf.update(tree, "tune.space", space, force_add=True)
        for item in overrides:
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
        tree = OmegaConf.merge(tree, OmegaConf.from_dotlist(list(overrides)))
        raw: Any = OmegaConf.to_container(tree, resolve=True)
    except ConfigError:
        raise
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        detail = one_line(err)
        raise ConfigError(f"cannot read config: {detail.splitlines()[0][:200]}") from None
    try:
        cfg = Config.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
    return resolve_local_paths(cfg)


# Config keys that name local files or folders (or URIs, which stay as they are).
LOCAL_PATH_KEYS = ("data.train_path", "data.val_path", "data.classes_path", "data.cache_dir", "data.features_path",
                   "run.storage_path", "tune.storage_path")


def resolve_local_paths(cfg: Config, base_dir: str | Path | None = None) -> Config:
    """``cfg`` with every relative local path made absolute against ``base_dir`` (default: the
    working directory of this process) and ``~`` expanded; URIs (``s3://…``) stay as they are.

    Done once, on the driver, before anything reaches Ray: Ray Tune runs each trial in a
    working directory of its own, and a job's workers run elsewhere again, so a relative
    ``runs`` would land in a temporary session folder that vanishes with Ray. A relative
    ``model.text.pretrained``, ``model.init`` or ``model.image.weights`` is resolved only when
    it names an existing local file or folder (else it is a hub or weights name).
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def absolute(path: str) -> str:
        expanded = Path(os.path.expanduser(path))
        return str(expanded if expanded.is_absolute() else base / expanded)

    for key in LOCAL_PATH_KEYS:
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value and "://" not in value:
            setattr(getattr(cfg, section), leaf, absolute(value))
    # Pretrained names are local paths only when they name something that exists (else a hub name).
    for section, leaf in ((cfg.model.text, "pretrained"), (cfg.model, "init"), (cfg.model, "init_weights"),
                          (cfg.model.image, "weights")):
        value = getattr(section, leaf)
        if value and "://" not in value and Path(absolute(value)).exists():
            setattr(section, leaf, absolute(value))
    return cfg


def load_saved_config(text: str, where: str) -> Config:
    """The config saved with a model or checkpoint: untrusted input, read as plain data.

    No OmegaConf interpolation is resolved (a crafted ``${oc.env:AWS_SECRET_ACCESS_KEY}`` must
    not read the loader's environment into outputs), and a config that holds one is refused:
    configs that vcl-dist writes are resolved before they are saved, so they never do.

    Raises:
        ConfigError: unparsable, an interpolation, an unknown key or a bad value (one line,
            naming ``where``).
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: cannot read config: {one_line(err, 200)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    interpolation = _find_interpolation(raw)
    if interpolation:
        raise ConfigError(f"{where}: {interpolation} holds an interpolation ('${{…}}'), which a saved config never does; "
                          "refusing to load it")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{where}: {_format_validation_error(err)}") from None


def _find_interpolation(node, key: str = "") -> str | None:
    """The dotted key of the first string holding ``${``, or None."""
    if isinstance(node, dict):
        return next((found for k, v in node.items() if (found := _find_interpolation(v, f"{key}.{k}".lstrip(".")))), None)
    if isinstance(node, list):
        return next((found for i, v in enumerate(node) if (found := _find_interpolation(v, f"{key}[{i}]"))), None)
    return key if isinstance(node, str) and "${" in node else None


def override_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys set to values (sampled by Tune, say), validated like a file.

    Raises:
        ConfigError: a key that names no setting, or a value out of its range (one line).
    """
    tree = OmegaConf.create(cfg.model_dump(mode="json"))
    for key, value in values.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(tree, parent) if parent else tree
        if not parent or not OmegaConf.is_dict(node) or leaf not in node or OmegaConf.is_dict(node[leaf]):
            raise ConfigError(f"{key}: no such setting")
        OmegaConf.update(tree, key, value, merge=False)
    try:
        return Config.model_validate(OmegaConf.to_container(tree, resolve=True))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def config_record(cfg: Config) -> dict[str, Any]:
    """The resolved config as a JSON-ready tree for records (files, trackers, logs): credentials
    inside URIs are masked (`vcl_dist.redaction`)."""
    return redact_values(cfg.model_dump(mode="json"))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, ready to be passed back with ``--config`` (credentials inside
    URIs masked: give them through the environment)."""
    return yaml.safe_dump(config_record(cfg), sort_keys=False)
