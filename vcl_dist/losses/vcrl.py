"""VCRL: the triplet hinge on raw projected embeddings, a norm regulariser, and a label tower.

With ``U``, ``V`` the projected, **not normalised** image and text embeddings of the global
batch (``WᵀX``, ``WᵀY`` in the original notation) and ``N`` its size::

    L = mean_anchors[ ½(triplet_i→t + triplet_t→i) ]                  # squared Euclidean
      + λ · (‖U‖²_F + ‖V‖²_F) / N                                      # keeps norms bounded
      + w_label · mean_anchors[ ½(triplet_i→class + triplet_t→class) ] # optional label tower

The hinge alone can grow every distance without bound; the regulariser is what keeps the
scale fixed. The label tower is one learned embedding per class: each labelled anchor is
pulled to its class embedding and pushed from the other classes' (unlabeled anchors add 0),
so the classes themselves live in the latent space and can be retrieved like captions.
The original text writes the objective as a maximisation with mixed signs; this is its
intent: minimise positive distances, maximise negative ones, penalise norms.
"""

from __future__ import annotations

import torch
from torch import nn

from .distances import squared_distances
from .hooks import PLAIN, StepHooks
from .memory import NegativeMemory
from .negatives import NEGATIVE_SELECTION
from .pool import build_pool, enqueue_batch
from .tiled import check_chunk_size
from .triplet import bidirectional_triplet, triplet_terms, violation_fraction


class VCRLLoss(nn.Module):
    """``forward(image_emb [n, D], text_emb [n, D], labels [n], groups [n]) -> scalar``.

    Args:
        margin: hinge margin on squared Euclidean distances (scale-dependent: with the
            regulariser holding norms near 1, margins of 0.1–1 are typical).
        reg_lambda: λ of the Frobenius-norm regulariser.
        negatives: ``hardest`` | ``semi_hard`` | ``all``, as for `TripletLoss`.
        gather: ``local`` | ``full``, as for `TripletLoss`.
        memory: an optional `NegativeMemory` of past global batches (extra negatives).
        num_classes: with ``embed_dim``, turns on the label tower: one learnt embedding per class.
        embed_dim: the size of the class embeddings (the model's shared space).
        label_weight: weight of the image→class and text→class terms.
        chunk_size: tile the pool as `TripletLoss` does (the label tower's ``[anchors × classes]``
            terms are small and stay dense).

    The class embeddings are parameters of this module: give them to the optimizer, and
    average their gradients over workers (they live outside the DDP-wrapped model).
    """

    def __init__(self, margin: float = 0.5, reg_lambda: float = 0.01, negatives: str = "semi_hard",
                 gather: str = "local", memory: NegativeMemory | None = None,
                 num_classes: int | None = None, embed_dim: int | None = None, label_weight: float = 1.0,
                 chunk_size: int | None = None):
        super().__init__()
        if negatives not in NEGATIVE_SELECTION:
            raise ValueError(f"negatives must be one of {sorted(NEGATIVE_SELECTION)}, got {negatives!r}")
        self.margin, self.reg_lambda, self.negatives, self.gather, self.memory = margin, reg_lambda, negatives, gather, memory
        self.label_weight, self.chunk_size = label_weight, check_chunk_size(chunk_size)
        self.class_embeddings = None
        if num_classes:
            if not embed_dim:
                raise ValueError("the VCRL label tower needs embed_dim")
            self.class_embeddings = nn.Parameter(torch.randn(num_classes, embed_dim) / embed_dim**0.5)

    def label_terms(self, anchors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-anchor ``[A]`` triplet term of each anchor against the class embeddings."""
        classes = self.class_embeddings.to(anchors.dtype)
        num_classes = classes.shape[0]
        if (labels >= num_classes).any():
            raise ValueError(f"a label is >= loss.num_classes ({num_classes})")
        labelled = labels >= 0
        positive = labels.clamp_min(0)
        valid = torch.arange(num_classes, device=labels.device).unsqueeze(0) != positive.unsqueeze(1)
        valid &= labelled.unsqueeze(1)  # unlabeled anchors have no class terms at all
        terms = triplet_terms(squared_distances(anchors, classes), positive, valid, self.margin, self.negatives)
        return terms * labelled

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                hooks: StepHooks = PLAIN) -> torch.Tensor:
        """The VCRL loss of the global batch: the hinge on raw squared distances, the norm penalty and the label
        tower's terms.

        Args:
            image_emb: ``[n, D]`` this worker's projected image embeddings ``U`` (not normalised).
            text_emb: ``[n, D]`` this worker's projected caption embeddings ``V``.
            labels: ``[n]`` class ids; negative for unlabelled rows.
            groups: ``[n]`` image ids: rows that share one are captions of one image.
            hooks: the step's timer and finiteness check (default: none).

        Returns:
            A scalar: this worker's share, whose mean over workers is the global batch's loss.
        """
        pool = build_pool(image_emb, text_emb, labels, groups, self.gather, self.memory, hooks)
        per_anchor = bidirectional_triplet(pool, self.margin, self.negatives, normalized=False, chunk_size=self.chunk_size)
        self.violations = violation_fraction(per_anchor)
        # λ(‖U‖² + ‖V‖²)/N is the anchors' mean of λ(|u_a|² + |v_a|²): reduced like the rest.
        per_anchor = per_anchor + self.reg_lambda * (pool.image_anchors.pow(2).sum(1) + pool.text_anchors.pow(2).sum(1))
        if self.class_embeddings is not None and self.label_weight:
            per_anchor = per_anchor + self.label_weight * 0.5 * (
                self.label_terms(pool.image_anchors, pool.anchor_labels)
                + self.label_terms(pool.text_anchors, pool.anchor_labels)
            )
        loss = pool.reduce(per_anchor)
        enqueue_batch(pool, self.memory)
        return loss

    def monitored(self) -> dict[str, torch.Tensor]:
        """What a tracker plots of this loss besides its value (tensors, read only when logged)."""
        return {"margin_violation_fraction": self.violations} if hasattr(self, "violations") else {}
