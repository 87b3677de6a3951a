"""phases.py: work in phases of chunks claimed through atomic counters, inside one parallel region.

The property that matters is that every wait ends whatever number of threads runs the region's iterations, and
that a phase sees everything the previous phase wrote: checked here on a chain of phases where each chunk reads
the whole previous phase, with more iterations than threads, exactly as many, and one thread.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit, prange

from tinyqwen.backends.numba.phases import LINE, claim, counters, finish, finished, wait_finished


@njit(cache=True)
def _run(ctr, chunks, out):  # one iteration's pass: chunk c of phase p = c + the sum of phase p - 1's results
    P = out.shape[0]
    for p in range(P):
        if p > 0:
            wait_finished(ctr, p - 1, chunks[p - 1])
        while True:
            c = claim(ctr, p)
            if c >= chunks[p]:
                break
            prev = np.float64(0.0)
            if p > 0:
                for j in range(chunks[p - 1]):
                    prev += out[p - 1, j]
            out[p, c] = prev + c
            finish(ctr, p)


@njit(parallel=True, cache=True)
def _region(ctr, chunks, out, workers):
    for _ in prange(workers):
        _run(ctr, chunks, out)


def _serial(chunks: np.ndarray) -> np.ndarray:
    out = np.zeros((len(chunks), chunks.max()))
    for p, n in enumerate(chunks):
        prev = out[p - 1, : chunks[p - 1]].sum() if p else 0.0
        out[p, :n] = prev + np.arange(n)
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_phases_finish_in_order_with_any_number_of_threads(threads, workers):
    chunks = np.array([1, 37, 1, 8, 64, 3], np.int64)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for _ in range(20):  # a race shows up now and then, not every time
            ctr = counters(len(chunks))
            out = np.zeros((len(chunks), chunks.max()))
            _region(ctr, chunks, out, workers)
            assert np.array_equal(out, _serial(chunks))
            assert [finished(ctr, p) for p in range(len(chunks))] == chunks.tolist()
            # every phase's chunks were claimed once by each worker past the last (the one that found none left)
            assert [ctr[2 * p * LINE] for p in range(len(chunks))] == (chunks + workers).tolist()
    finally:
        numba.set_num_threads(before)


def test_counters_sit_on_their_own_cache_lines():
    ctr = counters(3)
    assert ctr.shape == (2 * 3 * LINE,) and ctr.dtype == np.int64 and LINE * ctr.itemsize == 64
