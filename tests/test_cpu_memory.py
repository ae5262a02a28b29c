"""The malloc tuning of CPU training workers takes effect (glibc) and changes no result."""

import torch

from vcl_dist.cpu_memory import keep_freed_memory_for_reuse
from vcl_dist.losses import InfoNCELoss


def test_malloc_thresholds_are_accepted_and_results_unchanged():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    labels, groups = torch.randint(0, 5, (64,), generator=g), torch.arange(64)
    before = InfoNCELoss()(image, text, labels, groups)
    assert keep_freed_memory_for_reuse() is True  # this machine's libc is glibc
    after = InfoNCELoss()(image, text, labels, groups)
    assert torch.equal(before, after)
