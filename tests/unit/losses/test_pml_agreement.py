"""The triplet loss against pytorch-metric-learning (PML), where the two definitions coincide.

Where they agree: one direction of our loss (image anchors, text pool) with every pair its own
class is PML's ``TripletMarginLoss`` on ``embeddings=image, ref_emb=text`` with labels
``0..n-1``, squared Euclidean distance on normalised embeddings, and PML's ``MeanReducer``:
every anchor has one positive and the same n−1 negatives, so the mean over all triplets is
our mean over anchors of the mean over negatives (``all``). With ``BatchHardMiner`` PML keeps
the hardest negative per anchor, which is our ``hardest``. Our loss is the mean of the two
directions, so it equals the mean of PML on (image, text) and on (text, image).

Where they differ, by design: PML's defaults are margin 0.05 and ``AvgNonZeroReducer`` (the
mean over non-zero triplets only, which changes with the number of inactive triplets); PML
has no notion of two modalities or of image groups (other captions of one image are
negatives there unless labels say otherwise); and ``semi_hard`` has no exact PML twin
(``TripletMarginMiner(type_of_triplets="semihard")`` keeps all semi-hard triplets rather than
the closest one per anchor, and has no fall-back).
"""

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import MeanReducer

from vcl_dist.losses import TripletLoss


def pml_direction(anchors, pool, margin, hardest):
    labels = torch.arange(anchors.shape[0])
    # A distinct tensor: PML treats ``ref_labels is labels`` as "same set" and drops the
    # diagonal, which here is each anchor's positive.
    ref_labels = labels.clone()
    distance = LpDistance(normalize_embeddings=True, p=2, power=2)
    loss_fn = TripletMarginLoss(margin=margin, distance=distance, reducer=MeanReducer())
    if hardest:
        miner = BatchHardMiner(distance=distance)
        tuples = miner(anchors, labels, pool, ref_labels)
        return loss_fn(anchors, labels, tuples, ref_emb=pool, ref_labels=ref_labels)
    return loss_fn(anchors, labels, ref_emb=pool, ref_labels=ref_labels)


@pytest.mark.parametrize("negatives", ["all", "hardest"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_equals_pml_where_definitions_coincide(negatives, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    margin = 0.5
    ours = TripletLoss(margin, negatives)(image, text, torch.full((16,), -1), torch.arange(16))
    hardest = negatives == "hardest"
    theirs = 0.5 * (pml_direction(image, text, margin, hardest) + pml_direction(text, image, margin, hardest))
    assert theirs.item() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    for a, b in zip(torch.autograd.grad(ours, (image, text)), torch.autograd.grad(theirs, (image, text))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
