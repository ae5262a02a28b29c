"""Training's JPEGs decoded on the training device (``data.decode=gpu``).

With ``data.decode=gpu`` the read tasks decode no JPEG: they read its header, draw its training
crop there (`vcl_dist.data.train_decode.training_crop`, from the same per-row random
stream as on the CPU) and hand on the encoded bytes, ``crop`` and EXIF ``orientation``;
pictures of other kinds come decoded as always. The training process then decodes the batch's
JPEGs in one call (TorchCodec's ``decode_jpeg``: nvJPEG on a GPU, libjpeg-turbo on a CPU
worker, the fallback), upright, then crops and resizes each with the same antialiased filter,
all on the device. The rows, their order and the checkpointed position are the same as with
CPU decoding; a JPEG whose body turns out corrupt is a bad row, counted like any other.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.images import ImageGeometry
from ..data.train_decode import resize_to_geometry
from .step import collate_rows


def _jpeg_decoder():
    """TorchCodec's JPEG decoder (nvJPEG on CUDA, libjpeg-turbo on the CPU), else torchvision's,
    which it supersedes; both show the picture upright (EXIF orientation applied)."""
    try:
        from torchcodec.decoders import decode_jpeg

        return lambda sources, device: decode_jpeg(sources, mode="RGB", device=device)
    except ImportError:
        from torchvision.io import ImageReadMode, decode_jpeg

        return lambda sources, device: decode_jpeg(sources, mode=ImageReadMode.RGB, device=device,
                                                   apply_exif_orientation=True)


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Upright ``uint8 [3, H, W]`` pictures of JPEG bytes on ``device``, in one call (one nvJPEG
    batch on a GPU); where that fails, one at a time, None for each that cannot be decoded."""
    decode = _jpeg_decoder()
    try:
        return list(decode(encoded, device))
    except RuntimeError:
        pictures = []
        for data in encoded:
            try:
                pictures.append(decode(data, device))
            except RuntimeError:
                pictures.append(None)
        return pictures


def collate_decoding_on_device(rows: dict[str, np.ndarray], geometry: ImageGeometry, device: torch.device,
                               pin_memory: bool = False) -> dict:
    """`.step.collate_rows`, with the batch's JPEGs decoded, cropped and resized on
    ``device``: ``image`` is then a ``uint8 [B, 3, S, S]`` tensor on the device; a JPEG that does
    not decode is a bad row (``valid`` 0, its shard in ``bad_shards``)."""
    batch = collate_rows(rows, pin_memory)
    images = batch["image"].to(device, non_blocking=True)
    waiting = np.flatnonzero(rows["orientation"] > 0)
    if len(waiting):
        encoded = [torch.frombuffer(bytearray(rows["jpeg"][i]), dtype=torch.uint8) for i in waiting]
        for i, picture in zip(waiting, decode_jpegs(encoded, device)):
            if picture is None:
                batch["valid"][i] = 0
                batch["bad_shards"].append(str(rows["shard"][i]))
                continue
            left, top, width, height, out_width, out_height = (int(v) for v in rows["crop"][i])
            picture = picture[:, top:top + height, left:left + width]
            images[i] = resize_to_geometry(picture, geometry, out_width, out_height)
    batch["image"] = images
    return batch
