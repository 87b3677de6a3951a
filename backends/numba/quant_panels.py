"""Quantized prefill on AVX-512: several quantized weights through prefill_gemm.py's panels in one launch.

linear.py sends a quantized model's prefill products here where prefill_gemm.py's panels apply (AVX-512 hosts,
`panels_usable`): q, k and v in one launch (`panel_matmul_many`), the MLP's gate, up, SiLU·mul and down in one
(`panel_swiglu`); moe.py's crowded experts call `gate_up_panels` inside their own jobs. The blocks are
dequantized into prefill_gemm.py's float32 panels a few rows at a time (never the whole matrix) and multiplied
by float32 x, so these products are the same bits as prefill_gemm.matmul_quant's, weight by weight.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from tinyqwen.backends.numba import phases, prefill_gemm
from tinyqwen.backends.numba.intrinsics import FAST, _silu
from tinyqwen.backends.numba.prefill_gemm import NR, PANEL, _mk12x32

# ---- prefill on AVX-512: several quantized weights through prefill_gemm.py's panels in one launch --------------
# linear.QUANT_PREFILL_PANELS sends each quantized prefill product to prefill_gemm.matmul_quant: q, k and v were
# three launches and three packings of x's panels, gate and up two more, SiLU·mul a NumPy pass and down a sixth.
# Here, as the bf16 panels do (prefill_gemm.matmul_many / swiglu_panels): x packed once, q/k/v's rows as one list
# of jobs in one launch; gate and up dequantized side by side, SiLU(g)·u written straight into the hidden panels,
# and down from them in the same launch (phases.py: the down jobs start once every gate/up job has finished).
# The same dequantized blocks and micro-kernel as matmul_quant, each output the same FMA chain over k, the same
# SiLU as linear._silu_mul: the same bits as matmul_quant weight by weight (tests/test_moe_panels.py).


@njit(cache=True, fastmath=FAST, error_model="numpy")
def gate_up_panels(kg, ku, g, g8, u, u8, base, xt, p0, p1, hp, lo, hi, R):
    # rows base + lo..hi of gate and up ([rows, bytes]) over the panels p0..p1 of xt [Q, K, 32] -> hp[p0:p1, lo:hi]
    # = SiLU(x·g)·(x·u): R gate rows dequantized into buf[:R], the same up rows into buf[R:] (R a multiple of NR).
    # The buffer is allocated here, not passed in: the micro-kernel on a buffer that came in as an argument ran
    # 1.3-1.4x slower (768 rows x 2048, one panel, one thread: 0.72 against 0.53 ms; gate and up of one expert of
    # the 2-layer Qwen3-30B-A3B shapes 1.69 against 1.00 ms). fastmath as linear._silu_mul's (the inlined SiLU
    # takes this function's flags): without it h differed in the last bit, and a 128-token prompt of Qwen3-0.6B
    # Q4_K_M kept its greedy ids for 10 of 16 tokens; with it, the bits of the three launches
    K = xt.shape[1]
    buf = np.empty((2 * R, K), np.float32)
    accg, accu = np.empty((NR, PANEL), np.float32), np.empty((NR, PANEL), np.float32)
    for s in range(lo, hi, R):
        n = min(hi, s + R) - s
        prefill_gemm.dequantize_rows(kg, g, g8, base + s, buf[:n])
        prefill_gemm.dequantize_rows(ku, u, u8, base + s, buf[R : R + n])
        for p in range(p0, p1):
            for r in range(0, n, NR):
                _mk12x32(xt, p, buf, r, accg)
                _mk12x32(xt, p, buf, R + r, accu)
                for t in range(min(NR, n - r)):
                    for m in range(PANEL):  # (a padding column: SiLU(0)·0 = 0)
                        hp[p, s + r + t, m] = _silu(accg[t, m]) * accu[t, m]


@njit(parallel=True, cache=True, nogil=True)
def _panels_many(xt, M, kinds, ws, ws8, outs, jobs, workers, R):
    # xt [P, K, 32] panels of x [M, K]; n quantized weights [N_k, bytes]; jobs [J, 3] (weight k, rows lo..hi) ->
    # outs[k] [M, N_k]. The jobs claimed in turn by the threads (phases.claim)
    ctr = np.zeros(2 * phases.LINE, np.int64)  # (phases.counters(1))
    for _ in prange(workers):
        i = phases.claim(ctr, 0)
        while i < jobs.shape[0]:
            k = jobs[i, 0]
            prefill_gemm._quant_rows_into(xt, M, kinds[k], ws[k], ws8[k], outs[k], jobs[i, 1], jobs[i, 2], R)
            i = phases.claim(ctr, 0)


@njit(parallel=True, cache=True, nogil=True)
def _panels_swiglu(
    xt, M, kg, ku, kd, g, g8, u, u8, dw, dw8, hp, out, up_jobs, down_jobs, workers, R_up, R_down
):
    # the MLP in one launch: phase 0, gate/up rows lo..hi (up_jobs [J, 2]) -> hp [P, F, 32]; phase 1, once every
    # gate/up job is done, the down rows lo..hi (down_jobs [J, 2]) from hp -> out [M, d]
    P = xt.shape[0]
    ctr = np.zeros(4 * phases.LINE, np.int64)  # (phases.counters(2))
    for _ in prange(workers):
        i = phases.claim(ctr, 0)
        while i < up_jobs.shape[0]:
            gate_up_panels(kg, ku, g, g8, u, u8, 0, xt, 0, P, hp, up_jobs[i, 0], up_jobs[i, 1], R_up)
            phases.finish(ctr, 0)
            i = phases.claim(ctr, 0)
        phases.wait_finished(ctr, 0, up_jobs.shape[0])
        i = phases.claim(ctr, 1)
        while i < down_jobs.shape[0]:
            prefill_gemm._quant_rows_into(hp, M, kd, dw, dw8, out, down_jobs[i, 0], down_jobs[i, 1], R_down)
            i = phases.claim(ctr, 1)


def _row_jobs(rows: np.ndarray, chunks: int) -> np.ndarray:  # rows [n] per weight -> [J, 3] (k, lo, hi)
    # pieces of about total / chunks rows, a multiple of NR (whole micro-kernel calls), never across two weights
    size = prefill_gemm._chunk_rows(int(rows.sum()), chunks, NR)
    n = -(-rows // size)
    k = np.repeat(np.arange(len(rows)), n)
    lo = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) * size
    return np.stack((k, lo, np.minimum(rows[k], lo + size)), axis=1).astype(np.int64)


def panels_usable(ws: tuple) -> bool:  # quantized weights prefill_gemm's panels take in one launch
    return (
        prefill_gemm.available()
        and prefill_gemm.fits(*(w.shape[1] for w in ws))
        and len({w.data.flags.writeable for w in ws}) == 1  # one Numba type for the tuple indexed at run time
        and all(w.data.ndim == 2 for w in ws)
    )


def panel_matmul_many(x2: np.ndarray, ws: tuple) -> tuple:
    """x2 [M, K] float32 · each 2-D QuantWeight [N_k, K]ᵀ -> a tuple of [M, N_k] float32, in one launch: x packed
    into panels once, every weight's rows in jobs of whole micro-kernel calls (prefill_gemm.matmul_quant's
    products, the same bits)."""
    M, K = x2.shape
    outs = tuple(np.empty((M, w.shape[0]), np.float32) for w in ws)
    jobs = _row_jobs(np.array([w.shape[0] for w in ws], np.int64), prefill_gemm._chunks())
    kinds = np.array([w.kind for w in ws], np.int64)
    _panels_many(
        prefill_gemm.panels(np.ascontiguousarray(x2, np.float32)), M, kinds, tuple(w.data for w in ws),
        tuple(w.data8 for w in ws), outs, jobs, numba.get_num_threads(), prefill_gemm.block_rows(K),
    )  # fmt: skip
    return outs


def panel_swiglu(x2: np.ndarray, w_gate, w_up, w_down) -> np.ndarray:
    """The MLP with quantized weights, x2 [M, d] float32 -> [M, d] float32, in one launch (_panels_swiglu)."""
    M, d = x2.shape
    F = w_gate.shape[0]
    xt = prefill_gemm.panels(np.ascontiguousarray(x2, np.float32))
    hp = np.empty((xt.shape[0], F, PANEL), np.float32)
    out = np.empty((M, d), np.float32)
    chunks = prefill_gemm._chunks()
    _panels_swiglu(
        xt, M, w_gate.kind, w_up.kind, w_down.kind, w_gate.data, w_gate.data8, w_up.data, w_up.data8, w_down.data,
        w_down.data8, hp, out, _row_jobs(np.array([F]), chunks)[:, 1:].copy(),
        _row_jobs(np.array([d]), chunks)[:, 1:].copy(), numba.get_num_threads(), prefill_gemm.block_rows(2 * d),
        prefill_gemm.block_rows(F),
    )  # fmt: skip
    return out
