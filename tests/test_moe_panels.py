"""Quantized prefill on prefill_gemm.py's panels: MoE prefill's experts (backends/numba/moe.py, _experts_mixed: an
expert's tokens in whole panels of 32 through the float32 micro-kernel, the rest on the int8 tiles), and the dense
q/k/v and MLP products in one launch each (quant_panels.panel_matmul_many / panel_swiglu)."""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from test_numba_quant import random_blocks  # noqa: E402

from tinyqwen.backends import get_backend  # noqa: E402
from tinyqwen.backends.numba import linear, moe, prefill_gemm, quant_panels  # noqa: E402
from tinyqwen.quantization import DEQUANTIZE, QuantizedTensor  # noqa: E402

pytestmark = pytest.mark.skipif(not prefill_gemm.available(), reason="the panels need AVX-512")

E, D, F = 6, 256, 512
# experts' token counts: a lone token, a short remainder, exactly one panel, one panel and a remainder, three
COUNTS = np.array([1, 5, 32, 40, 70, 9])


def stacks(rng, gate: str, down: str) -> tuple[list, list]:
    ws, dense = [], []
    for qtype, shape in ((gate, (E, F, D)), (gate, (E, F, D)), (down, (E, D, F))):
        data = random_blocks(rng, qtype, *shape)
        ws.append(get_backend("numba").prepare(QuantizedTensor(qtype, shape, data)))
        dense.append(DEQUANTIZE[qtype](data).astype(np.float64))
    return ws, dense


def routed(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # x [N, D], tokens [P] sorted by expert, groups
    N = 80
    x = rng.standard_normal((N, D)).astype(np.float32)
    tokens = np.concatenate([rng.choice(N, c, replace=False) for c in COUNTS]).astype(np.int64)
    return x, tokens, np.arange(E, dtype=np.int64)[::-1].copy()  # (experts in another order than their ids)


def reference(x, tokens, groups, dense) -> np.ndarray:  # float64 SwiGLU of the dequantized weights, per pair
    out = []
    for e, c0, c1 in zip(groups, np.cumsum(COUNTS) - COUNTS, np.cumsum(COUNTS), strict=True):
        xs = x[tokens[c0:c1]].astype(np.float64)
        a, b = xs @ dense[0][e].T, xs @ dense[1][e].T
        out.append((a / (1 + np.exp(-a)) * b) @ dense[2][e].T)
    return np.concatenate(out)


@pytest.mark.parametrize(("gate", "down"), [("q4_k", "q4_k"), ("q4_k", "q6_k"), ("q8_0", "q8_0")])
def test_every_token_on_the_panels_is_the_float_product(gate, down, monkeypatch):
    """Threshold 1: every token in panels (an expert's last panel padded with zero rows). Float32 products of the
    exact weights and x, summed in k order: within float32 rounding of the float64 sums (measured 1.3e-6 of the
    largest output; the int8 tiles are 5e-3 away, from x and h rounded to 8 bits)."""
    monkeypatch.setattr(moe, "PANEL_MIN_TOKENS", dict.fromkeys(moe.PANEL_MIN_TOKENS, 1))
    rng = np.random.default_rng(11)
    ws, dense = stacks(rng, gate, down)
    x, tokens, groups = routed(rng)
    got = moe._experts_mixed(x, tokens, *ws, groups, COUNTS)
    want = reference(x, tokens, groups, dense)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("threshold", [8, 24])
def test_panels_take_whole_panels_and_the_tiles_the_rest(threshold, monkeypatch):
    """An expert's first 32·q tokens on the panels, the rest on the tiles: the tiles' tokens are the bits of the
    tiles-only road (a token's tile products depend on no other token), the panels' within float32 rounding of
    the float64 reference."""
    rng = np.random.default_rng(12)
    ws, dense = stacks(rng, "q4_k", "q6_k")
    x, tokens, groups = routed(rng)
    monkeypatch.setattr(moe, "MOE_PREFILL_PANELS", False)
    tiles = moe._experts_mixed(x, tokens, *ws, groups, COUNTS)
    monkeypatch.setattr(moe, "MOE_PREFILL_PANELS", True)
    monkeypatch.setattr(moe, "PANEL_MIN_TOKENS", dict.fromkeys(moe.PANEL_MIN_TOKENS, threshold))
    got = moe._experts_mixed(x, tokens, *ws, groups, COUNTS)
    panels, rest = moe._panel_split(COUNTS, threshold)
    on_panels = np.concatenate(
        [np.arange(c0, c0 + c - r) for c0, c, r in zip(np.cumsum(COUNTS) - COUNTS, COUNTS, rest, strict=True)]
    )
    assert list(panels) == ([0, 0, 1, 1, 2, 0] if threshold == 24 else [0, 0, 1, 2, 2, 1])
    on_tiles = np.setdiff1d(np.arange(len(tokens)), on_panels)
    assert np.array_equal(got[on_tiles], tiles[on_tiles])
    want = reference(x, tokens, groups, dense)
    assert np.abs(got[on_panels] - want[on_panels]).max() <= 1e-5 * np.abs(want).max()


def test_mixed_jobs_cover_every_row_of_every_part_once():
    cost = np.array([3.0, 26.0, 8.0, 47.0])
    road = np.array([0, 1, 0, 1])
    expert = np.array([0, 0, 1, 2])
    for rows in (768, 2048, 13):
        jobs = moe.mixed_jobs(cost, road, expert, rows, 2)
        for r, e in zip(road, expert, strict=True):
            mine = jobs[(jobs[:, 0] == r) & (jobs[:, 1] == e)]
            covered = np.concatenate([np.arange(lo, hi) for lo, hi in mine[:, 2:]])
            assert np.array_equal(np.sort(covered), np.arange(rows))
            if r == 1:  # a panel part's pieces: whole micro-kernel calls but the last
                assert all((hi - lo) % moe.NR == 0 or hi == rows for lo, hi in mine[:, 2:])
        job_cost = (jobs[:, 3] - jobs[:, 2]) * cost[
            [np.nonzero((road == r) & (expert == e))[0][0] for r, e in jobs[:, :2]]
        ]
        assert np.all(np.diff(job_cost) <= 0)  # costliest first


def quantized_weight(rng, qtype: str, rows: int, cols: int):
    return get_backend("numba").prepare(
        QuantizedTensor(qtype, (rows, cols), random_blocks(rng, qtype, rows, cols))
    )


@pytest.mark.parametrize("M", [5, 37, 128])  # a short last panel, one panel and a bit, four whole ones
def test_qkv_in_one_launch_are_the_per_weight_products(M):
    """One launch over several weights' rows (mixed formats, row counts not multiples of 12): each output is the
    same FMA chain over the same dequantized row as matmul_quant's, one weight at a time: the same bits."""
    rng = np.random.default_rng(13)
    ws = (quantized_weight(rng, "q4_k", 520, 256), quantized_weight(rng, "q8_0", 100, 256),
          quantized_weight(rng, "q6_k", 64, 256))  # fmt: skip
    x = rng.standard_normal((M, 256)).astype(np.float32)
    got = quant_panels.panel_matmul_many(x, ws)
    for g, w in zip(got, ws, strict=True):
        assert np.array_equal(g, prefill_gemm.matmul_quant(x, w))


@pytest.mark.parametrize("M", [5, 128])
def test_mlp_in_one_launch_is_the_three_products(M):
    """gate/up/down in one launch against matmul_quant three times with linear._silu_mul between: the same
    products and the same SiLU (both compiled with the same fastmath flags): the same bits."""
    rng = np.random.default_rng(14)
    g, u = quantized_weight(rng, "q4_k", 512, 256), quantized_weight(rng, "q4_k", 512, 256)
    dn = quantized_weight(rng, "q6_k", 256, 512)
    x = rng.standard_normal((M, 256)).astype(np.float32)
    got = quant_panels.panel_swiglu(x, g, u, dn)
    want = prefill_gemm.matmul_quant(
        linear._silu_mul(prefill_gemm.matmul_quant(x, g), prefill_gemm.matmul_quant(x, u)), dn
    )
    assert np.array_equal(got, want)
    # and linear's prefill takes these launches for quantized weights
    assert linear._quant_panels(x, (g, u, dn), "int8") == (
        linear.QUANT_PREFILL_PANELS and not linear.INT8_PREFILL
    )
