"""The numba backend's batched decode products on token panels (backends/numba/batch_gemm.py): every row against
float64 sums of the same bf16 weights, within 1e-5 of the output's size (the backend's products' tolerance; a panel
row is one float32 FMA chain over k, ~2e-6 of the size measured at K = 1024), and the same rows in any order."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from tinyqwen.backends.numba import batch_gemm, linear  # noqa: E402
from tinyqwen.backends.numba.weights import BF16Weight  # noqa: E402


@pytest.fixture(autouse=True)
def panels_on(monkeypatch):  # the panels are off by default (linear.BATCH_PANELS): these tests turn them on
    monkeypatch.setattr(linear, "BATCH_PANELS", True)


def _weight(rng, n: int, k: int) -> tuple[BF16Weight, np.ndarray]:
    bits = (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return BF16Weight(bits), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.abs(got - want).max() <= 1e-5 * np.abs(want).max())


@pytest.mark.parametrize("rows", [12, 16, 29, 32, 64])  # one panel part-full or full, two, four
def test_panel_products_equal_float64_per_row_in_any_row_order(rows):
    rng = np.random.default_rng(rows)
    K = 512  # a block of 96 widened rows: these weights span several blocks, and blocks span two weights
    ws = [_weight(rng, n, K) for n in (7, 130, 64, 203)]
    x = rng.standard_normal((rows, K)).astype(np.float32)
    assert linear._panelled(x)
    outs = linear.linears(x, tuple(w for w, _ in ws))
    for out, (_, w64) in zip(outs, ws, strict=True):
        assert _close(out, x.astype(np.float64) @ w64.T)
    again = linear.linears(
        x[::-1], tuple(w for w, _ in ws)
    )  # a row's sums: not its neighbours', nor its place
    assert all(np.array_equal(out[::-1], r) for out, r in zip(outs, again, strict=True))


@pytest.mark.parametrize("fused", [True, False])
def test_panel_swiglu_equals_float64(fused, monkeypatch):
    monkeypatch.setattr(linear, "FUSED_SWIGLU", fused)  # one call, or gate/up into panels then down
    rng = np.random.default_rng(7)
    K, F = 256, 200
    (g, g64), (u, u64), (d, d64) = _weight(rng, F, K), _weight(rng, F, K), _weight(rng, K, F)
    x = rng.standard_normal((16, K)).astype(np.float32)
    hg = x.astype(np.float64) @ g64.T
    want = (hg / (1 + np.exp(-hg)) * (x.astype(np.float64) @ u64.T)) @ d64.T
    assert _close(linear.swiglu(x, g, u, d), want)
    # bf16 inputs ("medium"): the same products on x and h rounded to bf16, as the one-row loops take them
    monkeypatch.setattr(linear, "BATCH_PANELS", False)
    tiles = linear.swiglu(x, g, u, d, bf16_inputs=True)
    monkeypatch.setattr(linear, "BATCH_PANELS", True)
    assert _close(linear.swiglu(x, g, u, d, bf16_inputs=True), tiles.astype(np.float64))


def test_panels_only_where_they_fit():
    # the micro-kernel steps k by UNROLL: other widths (and fewer rows, or mostly empty panels) take the tiles
    rng = np.random.default_rng(3)
    assert not linear._panelled(np.zeros((16, 50), np.float32))
    assert not linear._panelled(np.zeros((8, 64), np.float32))  # half a panel: the tiles waste nothing
    assert not linear._panelled(np.zeros((17, 64), np.float32))  # 17 of 32 rows
    assert not linear._panelled(np.zeros((16, 64), np.float32), 50)  # SwiGLU's down has an inner size of 50
    (w, w64) = _weight(rng, 33, 50)
    x = rng.standard_normal((16, 50)).astype(np.float32)
    assert _close(linear.linear(x, w), x.astype(np.float64) @ w64.T)


def test_panels_layout_round_trips():
    x = np.arange(20 * 8, dtype=np.float32).reshape(20, 8)
    xt = batch_gemm.panels(x)  # [2, 8, 16]: rows 16-31 of the second panel are zeros
    assert xt.shape == (2, 8, 16) and xt[1, :, 4:].max() == 0
    assert np.array_equal(xt[0, 3, 5], x[5, 3]) and np.array_equal(batch_gemm.unpanel(xt, 20), x)
