"""A trained dual encoder outside of training: export it to a folder, load it anywhere, encode.

An export folder holds ``model.safetensors`` (the dual encoder's weights), ``config.yaml`` (the
run's resolved config: towers, image size, text length, loss), ``tokenizer/`` and, when the run
had them, ``history.json`` (per-epoch metrics) and ``classes.txt``. :func:`load_model` reads an
export folder, a training checkpoint folder or a run folder (its ``model/`` export, else its
newest checkpoint), local or ``s3://``, with no Ray involved: inference on a laptop or in a
serving process is one call.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from ..config import Config, S3Config, dump_config
from ..data.images import UnusableImageError, decode_image
from ..evaluate import similarity
from ..losses import normalizes_embeddings
from ..models import DualEncoder, build_dual_encoder
from ..precision import autocast
from ..storage import display_uri, filesystem_for
from ..train.checkpoint import CLASSES_FILE, CONFIG_FILE, HISTORY_FILE, MODEL_FILE, TOKENIZER_DIR

WEIGHTS_FILE = "model.safetensors"
EXPORT_DIR = "model"  # a run's export, beside its checkpoints


class ModelNotFoundError(FileNotFoundError):
    """No export, checkpoint or run at the given path (one-line message)."""


@dataclass
class RetrievalModel:
    """A dual encoder in eval mode with what it needs to turn raw inputs into embeddings.

    ``encode_texts`` / ``encode_images`` return float32 CPU tensors ``[N, D]`` in the model's
    latent space, not normalised; :meth:`similarity` ranks them the way the model was trained
    (cosine for triplet / InfoNCE, minus squared distance for VCRL).
    """

    model: DualEncoder
    tokenizer: object
    config: Config
    device: torch.device
    history: list[dict]
    class_names: list[str] | None

    @property
    def embed_dim(self) -> int:
        return self.config.model.embed_dim

    @property
    def normalized(self) -> bool:
        return normalizes_embeddings(self.config.loss.name)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(captions), padding="max_length", truncation=True,
                              max_length=self.config.data.max_text_length, return_tensors="pt")

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(captions)
        return self.encode_tokens(tokens["input_ids"], tokens["attention_mask"])

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.device.type == "cuda"):
            out = self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device))
        return out.float().cpu()

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [N, 3, S, S]`` (as the data pipeline makes them) -> ``[N, D]``."""
        with autocast(self.device, self.device.type == "cuda"):
            out = self.model.encode_image(images.to(self.device, non_blocking=True))
        return out.float().cpu()

    def encode_images(self, images: Sequence[bytes | str | Path | Image.Image]) -> torch.Tensor:
        """Encoded bytes, image files or PIL images -> ``[N, D]``, resized as in evaluation.

        Raises:
            ValueError: an input is no readable image (one line naming it).
        """
        pixels = np.stack([self._pixels(image) for image in images])
        return self.encode_pixels(torch.from_numpy(pixels))

    def _pixels(self, image) -> np.ndarray:
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            data, name = buffer.getvalue(), "a PIL image"
        elif isinstance(image, (str, Path)):
            name = str(image)
            try:
                data = Path(image).read_bytes()
            except OSError as err:
                raise ValueError(f"cannot read image {name}: {err.strerror or err}") from None
        else:
            data, name = bytes(image), "image bytes"
        try:
            return decode_image(data, self.image_size, rng=None)
        except UnusableImageError as err:
            raise ValueError(f"{name} is not an image this model can read: {err}") from None

    def similarity(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[Q, D] x [N, D] -> [Q, N]``, higher is closer."""
        return similarity(queries, items, self.normalized)


def export_model(source: str | Path, out_dir: str | Path, *, history: list[dict] | None = None,
                 class_names: Sequence[str] | None = None) -> Path:
    """Write ``source`` (a checkpoint or export folder, local) as an export folder ``out_dir``.

    The folder is assembled beside its destination and renamed into place, so a crash never
    leaves a half-written export under the final name.
    """
    from safetensors.torch import save_model

    source, out_dir = Path(source), Path(out_dir)
    loaded = load_model(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        # save_model (not save_file) copes with tied or shared tensors.
        save_model(loaded.model, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(dump_config(loaded.config))
        loaded.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        history = history if history is not None else loaded.history
        if history:
            (staging / HISTORY_FILE).write_text(json.dumps(history, indent=1))
        class_names = class_names if class_names is not None else loaded.class_names
        if class_names:
            (staging / CLASSES_FILE).write_text("".join(f"{name}\n" for name in class_names))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_model(path: str | Path, device: str | torch.device = "cpu", s3: S3Config | None = None) -> RetrievalModel:
    """Load an export folder, a checkpoint folder or a run folder (local or ``s3://``) for inference.

    Raises:
        ModelNotFoundError: nothing loadable at ``path`` (one line).
    """
    with local_model_folder(path, s3) as folder:
        return _load_local(folder, device)


@contextmanager
def local_model_folder(path: str | Path, s3: S3Config | None = None) -> Iterator[Path]:
    """The local folder holding the model at ``path``; an ``s3://`` model is downloaded for the
    duration of the ``with`` block."""
    path = str(path)
    if path.startswith("s3://"):
        filesystem, remote = filesystem_for(path, s3)
        folder = _model_folder(filesystem, remote, path)
        with tempfile.TemporaryDirectory() as local:
            pafs.copy_files(folder, local, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
            yield Path(local)
        return
    local = str(Path(path).expanduser().resolve())
    yield Path(_model_folder(pafs.LocalFileSystem(), local, path))


def model_files(path: str | Path, s3: S3Config | None = None) -> dict[str, bytes]:
    """Every file of the model at ``path`` by relative name: what Ray ships to inference actors
    on other nodes, which cannot read the driver's disk."""
    with local_model_folder(path, s3) as folder:
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def load_model_files(files: dict[str, bytes], device: str | torch.device = "cpu") -> RetrievalModel:
    """The inverse of :func:`model_files`."""
    with tempfile.TemporaryDirectory() as local:
        for name, data in files.items():
            target = Path(local) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return _load_local(Path(local), device)


def _model_folder(filesystem: pafs.FileSystem, path: str, shown: str) -> str:
    """The folder that holds the weights: ``path`` itself, a run's export, or its newest checkpoint."""
    def has(name: str, folder: str = path) -> bool:
        return filesystem.get_file_info(f"{folder}/{name}").type != pafs.FileType.NotFound

    try:
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.File:
            raise ModelNotFoundError(f"{shown} is a file: pass the model's folder (an export, a checkpoint or a run)")
        if has(WEIGHTS_FILE) or has(MODEL_FILE):
            return path
        if has(f"{EXPORT_DIR}/{WEIGHTS_FILE}"):
            return f"{path}/{EXPORT_DIR}"
        entries = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except ModelNotFoundError:
        raise
    except OSError as err:
        raise ModelNotFoundError(f"cannot reach {shown}: {' '.join(str(err).split())[:200]}") from None
    checkpoints = sorted(e.path for e in entries if e.type == pafs.FileType.Directory
                         and e.base_name.startswith("checkpoint_") and has(MODEL_FILE, e.path))
    if checkpoints:
        return checkpoints[-1]  # Ray Train names them checkpoint_<timestamp>: the last is the newest
    raise ModelNotFoundError(f"no model at {display_uri(shown, filesystem)}: expected an export ({WEIGHTS_FILE}), "
                             "a checkpoint (model.pt) or a run folder holding either")


def _load_local(folder: Path, device: str | torch.device) -> RetrievalModel:
    from transformers import AutoTokenizer

    from ..config import load_saved_config

    device = torch.device(device)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"no {CONFIG_FILE} in the model folder {folder}")
    cfg = load_saved_config((folder / CONFIG_FILE).read_text(), f"the model's {CONFIG_FILE}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id or 0)
    if (folder / WEIGHTS_FILE).exists():
        from safetensors.torch import load_model as load_safetensors

        load_safetensors(model, str(folder / WEIGHTS_FILE), device="cpu")
    else:  # a training checkpoint
        model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    history = json.loads((folder / HISTORY_FILE).read_text()) if (folder / HISTORY_FILE).exists() else []
    classes = (folder / CLASSES_FILE).read_text().split("\n") if (folder / CLASSES_FILE).exists() else []
    return RetrievalModel(model.to(device).eval(), tokenizer, cfg, device, history, [c for c in classes if c.strip()] or None)
