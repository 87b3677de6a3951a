"""Decode's GEMV rows of quant.py (`_gemv_rows_int`, what one chunk of a decode phase runs: avx2.py's row intrinsics
where the CPU has AVX2) on one thread, beside a plain read of the same bytes: how close each block format's kernel
comes to the memory it streams.

Two cases per format, random blocks, x one Q8_0 / Q8_K row:

- "cached": 1024 rows of K = 1024 (144-210 KB, in L2) read 50 times over: the kernel's own speed, its arithmetic
  per block (no memory wait);
- "memory": one pass over a weight far larger than the caches (Q6_K: the 151936-row lm_head's shape, 127 MB): what
  a decode step's GEMVs see. The ceiling is the plain read; a kernel whose arithmetic and memory waits overlap
  gets near min(cached, read), one whose waits add up gets 1/(1/cached + 1/read).

    python benchmarks/bench_quant_rows.py [--repeat 5]

Best of R, interleaved (kernel, read, kernel, read, ...) in one process: on a shared machine read the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_quant_gemv import random_blocks
from numba import njit

from tinyqwen.backends.numba import quant

ROWS = {"q8_0": 100_000, "q4_k": 200_000, "q6_k": 151_936}  # the "memory" case: 100-127 MB each


@njit(cache=True)
def _rows(kinds, w, w8, acts, out, reps):  # every row of w · x's row 0, reps times, one thread
    starts = np.array([0, w.shape[0]], np.int64)
    for _ in range(reps):
        quant._gemv_rows_int(kinds, (w,), (w8,), (out,), starts, acts, 0, w.shape[0])


@njit(cache=True)
def _read(a, reps):  # every 8 bytes once per rep, summed: a plain streaming read
    total = np.uint64(0)
    for _ in range(reps):
        for i in range(a.shape[0]):
            total += a[i]
    return total


def _best(fns: dict, repeat: int) -> dict:
    best = dict.fromkeys(fns, np.inf)
    for _ in range(repeat):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    K = 1024
    x = rng.standard_normal((1, K)).astype(np.float32)
    acts = quant._quantize_acts(x, True, True)
    print(f"{'format':<6} {'case':<7} {'MB':>6} {'kernel GB/s':>11} {'read GB/s':>9} {'ratio':>6}")
    for qtype, rows in ROWS.items():
        for case, n, reps in (("cached", 1024, 50), ("memory", rows, 1)):
            w = random_blocks(rng, qtype, n, K)
            w.flags.writeable = False
            w8 = w.view(np.int8)
            flat = w.reshape(-1)[: w.size // 8 * 8].view(np.uint64)
            out = np.empty((1, n), np.float32)
            kind = np.array([quant.KINDS[qtype]], np.int64)
            _rows(kind, w, w8, acts, out, 1)
            _read(flat, 1)
            kernel = (kind, w, w8, acts, out, reps)
            best = _best(
                {"kernel": lambda a=kernel: _rows(*a), "read": lambda a=(flat, reps): _read(*a)}, args.repeat
            )
            gb = w.nbytes * reps / 1e9
            rate, ceiling = gb / best["kernel"], gb / best["read"]
            print(
                f"{qtype:<6} {case:<7} {w.nbytes / 1e6:6.1f} {rate:11.1f} {ceiling:9.1f} {rate / ceiling:6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
