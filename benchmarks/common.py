"""What the benchmarks share: a median timer, the process's peak resident memory, and the
markdown tables they print."""

from __future__ import annotations

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


def table_header(columns: Sequence[str], right_aligned: Sequence[bool]) -> str:
    """A markdown table's two header lines (``---:`` for right-aligned columns)."""
    return ("| " + " | ".join(columns) + " |\n|" + "".join("---:|" if right else "---|" for right in right_aligned))


def table_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
