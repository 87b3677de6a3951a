"""How many threads the OpenBLAS that NumPy loaded uses, read and set while the process runs.

`OPENBLAS_NUM_THREADS` is read once, when NumPy first loads OpenBLAS; after that only OpenBLAS's own
`openblas_set_num_threads` changes it. NumPy does not expose that function, so it is found in the library itself:
the process's memory maps (`/proc/self/maps`, Linux) name every loaded file, and the OpenBLAS among them is opened
with ctypes. Its symbols carry the wheel's prefix and suffix (`scipy_openblas_set_num_threads64_` in NumPy 2's
wheels, plain `openblas_set_num_threads` in a system build), so each spelling is tried.

Three users, each through `blas_threads` (a block with n threads, the count restored after): training (a tiny
model's ~100 × 100 matrices run faster on one thread, `tinyqwen.train`), the numba backend's prefill products split
over its own threads (one OpenBLAS thread each, `SPLIT_PREFILL_PRODUCTS`) and its quantized prefill
(`QUANT_PREFILL_BLAS_THREADS`, for a machine whose cores other processes keep busy).

    >>> before = limit_blas_threads(1)     # None where no OpenBLAS is loaded (another BLAS, macOS, Windows)
    >>> if before is not None:
    ...     _ = limit_blas_threads(before)  # leave the process's BLAS as it was
    >>> with blas_threads(1):              # the same, as a block
    ...     pass
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path


@cache
def openblas_thread_controls() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the number of threads of the OpenBLAS loaded in this process, or None where none is found."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for lib in sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}):
        handle = ctypes.CDLL(lib)
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                setter = getattr(handle, f"{prefix}set_num_threads{suffix}", None)
                getter = getattr(handle, f"{prefix}get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return getter, setter
    return None


def limit_blas_threads(n: int) -> int | None:
    """Ask the OpenBLAS that NumPy loaded to use `n` threads; returns how many it used before (None: not found).

    A tiny model's matrices are ~100 × 100: a multi-threaded BLAS spends more time waking and syncing threads than
    multiplying, and on a shared machine a thread that is descheduled stalls the others. Measured on this 2-core
    machine: one training step of the default model took 1.0 s with OpenBLAS' default threads, 0.18 s with one.
    (Setting OPENBLAS_NUM_THREADS only works before NumPy is imported; this works after.)
    """
    controls = openblas_thread_controls()
    if controls is None:
        return None
    get, set_ = controls
    before = int(get())
    set_(int(n))
    return before


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Within the block OpenBLAS uses `n` threads (None or 0: as it is); afterwards as many as before.

    Not for blocks that overlap in time on different threads: the last to leave sets the count it found.
    """
    before = limit_blas_threads(n) if n else None  # None: nothing changed (or no OpenBLAS found)
    try:
        yield
    finally:
        if before is not None:
            limit_blas_threads(before)  # leave the process's BLAS as we found it
