"""What the benchmarks share: a median timer, the process's peak resident memory, the machine's
description, and the markdown tables they print."""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Callable, Sequence


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """The median of ``repeats`` calls of ``fn``, each followed by ``sync()`` (a device
    synchronisation on a GPU), after one warm-up call (allocator, thread pool, kernels)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_resident_bytes() -> int:
    """This process's peak resident memory: the kernel's VmHWM (which can be reset: see
    ``pool_scale.reset_peak``), else getrusage's maximum."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Start the kernel's peak-resident-memory count (VmHWM) afresh; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def resident_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> str:
    """This machine in a few words: CPU model, cores, memory, GPU (figures differ by CPU as much
    as by core count, so every printed table names it)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB, {gpu}"


def table_header(columns: Sequence[str], right_aligned: Sequence[bool]) -> str:
    """A markdown table's two header lines (``---:`` for right-aligned columns)."""
    return ("| " + " | ".join(columns) + " |\n|" + "".join("---:|" if right else "---|" for right in right_aligned))


def table_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
