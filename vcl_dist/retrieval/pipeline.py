"""What ``jobs/embed.py`` and ``jobs/evaluate.py`` share: load a model, resolve a split, embed it with Ray Data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from ..config import Config, load_config
from ..data.datasets import DatasetSource, count_rows, read_class_names, resolve_source
from ..models.locate import model_files
from ..runtime.console import say
from .embed import embedding_dataset
from .model import RetrievalModel, load_model


def load_model_and_config(model_path: str, overrides: Sequence[str] = ()) -> tuple[RetrievalModel, Config]:
    """The model at ``model_path`` and its config with ``overrides`` applied (say, another
    ``data.val_path``). ``s3.*`` overrides also apply to fetching the model itself.

    Raises:
        ConfigError: a bad override. ModelNotFoundError: nothing at ``model_path``.
    """
    s3 = load_config(None, [o for o in overrides if o.strip().startswith("s3.")]).s3
    model = load_model(model_path, s3=s3)
    cfg = load_config(None, overrides, base=model.config)
    return model, cfg


@dataclass
class EmbeddingJob:
    """A planned embedding of a split: the lazy dataset of embedding rows and what it was planned from."""
    dataset: object  # the lazy ray.data.Dataset of embedding rows
    source: DatasetSource
    split_path: str
    input_rows: int
    class_names: list[str] | None
    use_gpu: bool


def test_split_path(source: DatasetSource) -> str:
    """The ``test`` split beside the val split (what the importer writes for a Karpathy file).

    Raises:
        FileNotFoundError: the data has no test split there (one line).
    """
    from ..storage import GLOB_CHARACTERS, exists

    if source.driver_local or any(c in source.val for c in GLOB_CHARACTERS):
        raise FileNotFoundError("--split test: the data has no test split (a Karpathy import writes one beside val/)")
    path = source.val.rstrip("/").rsplit("/", 1)[0] + "/test"
    if not exists(source.filesystem, path):
        raise FileNotFoundError(f"--split test: no test split at {path} (a Karpathy import writes one beside val/)")
    return path


def check_embedding_fits(resources: dict, gpu: bool) -> None:
    """An embedding needs a CPU for a model actor and one for the decoding tasks (and a GPU for a
    GPU actor): stop at once, in one line, on a cluster that can never give it them.

    Raises:
        ClusterTooSmallError: short, and no autoscaler can add nodes.
    """
    from ..ray_cluster import ClusterTooSmallError, autoscaler_can_add_nodes

    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if (cpus >= 2 and (gpus >= 1 or not gpu)) or autoscaler_can_add_nodes():
        return
    raise ClusterTooSmallError(f"embedding needs 2 CPUs{' and a GPU' if gpu else ''} (one for a model actor, one for "
                               f"decoding), and the Ray cluster has {cpus:g} CPUs{f' and {gpus:g} GPUs' if gpu else ''} "
                               "with no autoscaler to add nodes")


def plan_embedding(model_path: str, model: RetrievalModel, cfg: Config, split: Literal["train", "val", "test"], *,
                   use_gpu: bool | Literal["auto"] = "auto", actors: int | None = None, batch_size: int = 256,
                   thumbnail_size: int = 96) -> EmbeddingJob:
    """Connect to Ray and build the (lazy) embedding dataset of one split of ``cfg.data``."""
    import ray

    from ..ray_cluster import connect_ray

    say(f"{connect_ray(2)}")
    source = resolve_source(cfg.data, cfg.s3)
    if split == "train" and not source.train:
        raise ValueError("the training rows are in data.sources: embed a source by giving its path as data.val_path")
    path = {"val": source.val, "train": source.train}.get(split) or test_split_path(source)
    resources = ray.cluster_resources()
    gpu = resources.get("GPU", 0) >= 1 if use_gpu == "auto" else bool(use_gpu)
    check_embedding_fits(resources, gpu)
    if actors is None:
        # GPU: one actor per GPU. CPU: half the CPUs run the model, the rest decode.
        actors = int(resources.get("GPU", 1)) if gpu else max(1, int(resources.get("CPU", 2)) // 2)
    model_ref = ray.put(model_files(model_path, cfg.s3))
    class_names = read_class_names(source) or model.class_names
    dataset = embedding_dataset(source, path, model, model_ref, use_gpu=gpu, actors=actors, batch_size=batch_size,
                                thumbnail_size=thumbnail_size, num_classes=len(class_names) if class_names else None)
    return EmbeddingJob(dataset, source, path, count_rows(source, path), class_names, gpu)
