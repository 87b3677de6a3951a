"""Handing the memory a forward pass freed back to the system (glibc's `malloc_trim`).

A prefill allocates its temporaries layer by layer — the normed activations, q/k/v, the attention output, the
MLP's gate and up products: [T, 3072] float32 is 1.5 MiB at T = 128 — and frees them before the next layer.
NumPy (and Numba's runtime) take that memory from the C allocator. glibc serves a large request with its own
`mmap` and returns it to the system on free, but it also raises that threshold to the size of the largest block
freed so far (its "dynamic mmap threshold"): after the first few frees, the temporaries come from the heap, and
the heap is trimmed only when more than twice that threshold sits free at its top. So after a 128-token prefill
of the 0.6B model ~6.5 MiB of freed temporaries stay resident for the rest of the process — 1.7 % of a 378 MiB
Q4_K_M file — though nothing uses them (decode's temporaries are a few KiB).

`release_freed_memory()` asks glibc to hand those free pages back (`malloc_trim(0)`: the top of the heap is
returned, and the free pages inside it are `madvise`d away). It changes no live byte; it costs ~1 ms on a small
heap, and the next prefill faults the pages in again (~1,700 page faults for 6.5 MiB, a few ms beside a prefill
of ~1 s). Elsewhere (macOS, musl, Windows) there is no such call and it does nothing.

>>> release_freed_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's `int malloc_trim(size_t pad)`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system; True when some memory was released (glibc only)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
