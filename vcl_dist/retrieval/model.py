"""A trained dual encoder outside of training: load it anywhere, turn raw inputs into embeddings.

`load_model` reads an export folder, a training checkpoint folder or a run folder (its
``model/`` export, else its newest checkpoint), local or ``s3://``, with no Ray involved:
inference on a laptop or in a serving process is one call. The files themselves are
`vcl_dist.models.export`'.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import Config, S3Config
from ..data.images import ImageGeometry, UnusableImageError, decode_image, to_rgb
from ..evaluate import similarity
from ..models import DualEncoder
from ..models.export import ModelFolder, ModelNotFoundError, read_model_folder
from ..models.locate import folder_of_files, local_model_folder
from ..runtime.precision import autocast

__all__ = ["ModelNotFoundError", "RetrievalModel", "load_model", "load_model_files"]


@dataclass
class RetrievalModel:
    """A dual encoder in eval mode with what it needs to turn raw inputs into embeddings.

    ``encode_texts`` / ``encode_images`` return float32 CPU tensors ``[N, D]`` in the model's
    latent space, not normalised; `similarity` ranks them the way the model was trained
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
        """The size ``D`` of the shared space."""
        return self.config.model.embed_dim

    @property
    def normalized(self) -> bool:
        """Whether the model ranks by cosine (else by minus squared distance): the model's own."""
        return self.model.similarity == "cosine"

    @property
    def image_size(self) -> int:
        """The side of the square pictures the image tower takes."""
        return self.config.data.image_size

    @property
    def image_geometry(self) -> ImageGeometry:
        """How pictures are prepared for this model: as in its training's evaluation."""
        return ImageGeometry.of(self.config.data)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``input_ids`` and ``attention_mask``, each ``[N, L]`` (padded to the model's text length)."""
        return self.tokenizer(list(captions), padding="max_length", truncation=True,
                              max_length=self.config.data.max_text_length, return_tensors="pt")

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> ``[N, D]`` float32 embeddings on the CPU (not normalised)."""
        tokens = self.tokenize(captions)
        return self.encode_tokens(tokens["input_ids"], tokens["attention_mask"])

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` token ids and attention mask -> ``[N, D]`` float32 embeddings on the CPU (not normalised)."""
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
            to_rgb(image).save(buffer, format="PNG")  # as the decoder shows files: alpha on white
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
            return decode_image(data, self.image_geometry, rng=None)
        except UnusableImageError as err:
            raise ValueError(f"{name} is not an image this model can read: {err}") from None

    def similarity(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[Q, D] x [N, D] -> [Q, N]``, higher is closer."""
        return similarity(queries, items, self.normalized)


def load_model(path: str | Path, device: str | torch.device = "cpu", s3: S3Config | None = None) -> RetrievalModel:
    """Load an export folder, a checkpoint folder or a run folder (local or ``s3://``) for inference.

    Raises:
        ModelNotFoundError: nothing loadable at ``path`` (one line).
    """
    with local_model_folder(path, s3) as folder:
        return _ready(read_model_folder(folder), device)


def load_model_files(files: dict[str, bytes], device: str | torch.device = "cpu") -> RetrievalModel:
    """A model from the files `vcl_dist.models.locate.model_files` collected."""
    with folder_of_files(files) as folder:
        return _ready(read_model_folder(folder), device)


def _ready(loaded: ModelFolder, device: str | torch.device) -> RetrievalModel:
    device = torch.device(device)
    return RetrievalModel(loaded.model.to(device).eval(), loaded.tokenizer, loaded.config, device, loaded.history,
                          loaded.class_names)
