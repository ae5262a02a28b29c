"""The losses every loss benchmark times, beside the matmul floor of the same shapes."""

from __future__ import annotations

import torch

from vcl_dist.losses import InfoNCELoss, SigmoidLoss, TripletLoss, VCRLLoss


def loss_candidates(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                    label_tower_classes: int | None = None) -> dict:
    """``{name: step}``: each step runs forward + backward once."""

    def floor():
        # The similarity matmul and its two backward matmuls: no loss can need less.
        scores = image @ text.T
        scores.backward(torch.ones_like(scores))

    losses = {}
    for negatives in ("hardest", "semi_hard", "all"):
        losses[f"triplet {negatives}"] = TripletLoss(0.2, negatives)
        losses[f"vcrl {negatives}"] = VCRLLoss(0.5, 0.01, negatives)
    if label_tower_classes:
        losses["vcrl hardest + label tower"] = VCRLLoss(0.5, 0.01, "hardest", num_classes=label_tower_classes,
                                                        embed_dim=image.shape[1]).to(image.device)
    losses["infonce"] = InfoNCELoss().to(image.device)
    losses["sigmoid"] = SigmoidLoss().to(image.device)
    losses["sigmoid tiled (512)"] = SigmoidLoss(chunk_size=512).to(image.device)

    def step_of(loss_fn):
        return lambda: loss_fn(image, text, labels, groups).backward()

    return {"matmul floor": floor} | {name: step_of(loss_fn) for name, loss_fn in losses.items()}
