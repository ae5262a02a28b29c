"""What a run needs from its data before training: the dataset, the tokenizer, the class names
and the training split's read units — computed once on the driver, shared by Tune's trials."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config
from ..data.datasets import (
    DatasetSource,
    plan_train_units,
    read_class_names,
    resolve_source,
    resolve_train_sources,
    sample_captions,
)
from ..data.tokenizer import load_pretrained_tokenizer, train_wordpiece
from ..data.train_stream import TrainUnit
from ..models.open_clip_towers import is_open_clip, open_clip_tokenizer


def build_tokenizer(cfg: Config, source: DatasetSource | None):
    """The pretrained model's tokenizer (``model.init``'s, else the text tower's), or a WordPiece
    fitted to the training captions."""
    if is_open_clip(cfg.model.init):
        return open_clip_tokenizer(cfg.model.init)
    pretrained = cfg.model.init or cfg.model.text.pretrained
    if pretrained:
        return load_pretrained_tokenizer(pretrained)
    return train_wordpiece(sample_captions(source, source.train), cfg.model.text.vocab_size)


@dataclass
class RunInputs:
    """What a run needs from its data before training: computed once, shared by Tune's trials."""

    source: DatasetSource
    tokenizer: object
    class_names: list[str] | None
    train_units: list[TrainUnit]  # the training split's read units (data.train_stream)
    train_sources: list[DatasetSource] = field(default_factory=list)  # data.sources, each resolved


def prepare_inputs(cfg: Config, tokenizer=None) -> RunInputs:
    """Resolve (or generate) the dataset, fit or load the tokenizer (unless given: a resumed
    run's own), plan the training split's read units (which counts its rows: Parquet footers,
    tar sample counts; done once, also for all of Tune's trials).

    Raises:
        FileNotFoundError: shards or a bucket cannot be found or reached.
    """
    source = resolve_source(cfg.data, cfg.s3)
    sources = resolve_train_sources(cfg.data, cfg.s3)
    # The tokenizer is fitted to the (first) training source's captions.
    captions_from = sources[0] if sources else source
    return RunInputs(source, tokenizer or build_tokenizer(cfg, captions_from), read_class_names(source),
                     plan_train_units(source, source.train, sources), sources)


def label_space_size(cfg: Config, class_names: list[str] | None) -> int | None:
    """How many class ids the run can use: the lines of ``classes.txt`` and, with VCRL's label
    tower, ``loss.num_classes``; rows with a label outside it are bad rows (counted, skipped)
    rather than an index error inside a training step."""
    sizes = [len(class_names)] if class_names else []
    if cfg.loss.name == "vcrl" and cfg.loss.label_tower and cfg.loss.num_classes:
        sizes.append(cfg.loss.num_classes)
    return min(sizes) if sizes else None
