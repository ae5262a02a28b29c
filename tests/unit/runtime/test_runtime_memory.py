"""The malloc tuning of CPU training workers (glibc): a freed large block stays in the heap for
the next step instead of going back to the OS, and results do not change."""

import subprocess
import sys

import torch

from vcl_dist.losses import InfoNCELoss
from vcl_dist.runtime.memory import keep_freed_memory_for_reuse

# In a fresh process: where does a 20 MiB malloc land, the heap (brk) or a mapping of its own?
WHERE_A_LARGE_BLOCK_LANDS = """
import ctypes, ctypes.util, sys
from vcl_dist.runtime.memory import keep_freed_memory_for_reuse
if sys.argv[1] == "tuned":
    assert keep_freed_memory_for_reuse()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(20 * 2**20)
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    low, high = (int(x, 16) for x in span.split("-"))
    if low <= address < high:
        print("heap" if line.rstrip().endswith("[heap]") else "own mapping")
"""


def where_a_large_block_lands(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", WHERE_A_LARGE_BLOCK_LANDS, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_large_block_is_served_from_the_heap_once_tuned():
    # glibc's default: above 128 KiB, a block of its own, unmapped on free (page faults again next step).
    assert where_a_large_block_lands("default") == "own mapping"
    assert where_a_large_block_lands("tuned") == "heap"


def test_the_tuning_changes_no_result():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    labels, groups = torch.randint(0, 5, (64,), generator=g), torch.arange(64)
    before = InfoNCELoss()(image, text, labels, groups)
    assert keep_freed_memory_for_reuse() is True  # this machine's libc is glibc
    after = InfoNCELoss()(image, text, labels, groups)
    assert torch.equal(before, after)
