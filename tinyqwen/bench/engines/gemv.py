"""The machine's streaming bandwidth as decode sees it: NumPy's fp32 BLAS GEMV `w @ x`, best of 5, in a child.

Its argv is the driver's (path, inputs, the .npz to write), then rows and cols; the path and inputs go unused.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main() -> None:
    rows, cols, out_file = int(sys.argv[4]), int(sys.argv[5]), sys.argv[3]
    w = np.full((rows, cols), 0.5, dtype=np.float32)  # written once, so every page is real memory
    x = np.ones(cols, dtype=np.float32)
    w @ x
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - start)
    np.savez(out_file, seconds=best, bytes=w.nbytes)
