"""The numba backend's batched decode products on token panels (backends/numba/batch_gemm.py): every row against
float64 sums of the same bf16 weights, within 1e-5 of the output's size (the backend's products' tolerance; a panel
row is one float32 FMA chain over k, ~2e-6 of the size measured at K = 1024), and the same rows in any order."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from tinyqwen.backends.numba import batch_gemm, decode_tiles, linear  # noqa: E402
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


# ------------------------------------------------- "medium" on AVX512-BF16: the 4 x 6 tiles on vdpbf16ps
NO_BF16 = "the vdpbf16ps tiles need AVX-512 and AVX512-BF16 in Numba's target (the CPU or NUMBA_CPU_FEATURES lack it)"
needs_bf16 = pytest.mark.skipif(not decode_tiles.DPBF16_TILES, reason=NO_BF16)
U = 2.0**-24  # float32's unit roundoff


def _sum_bound(n: int, x_abs: np.ndarray, w_abs: np.ndarray) -> np.ndarray:  # [M, K], [N, K] -> [M, N]
    # n exact products (bf16 x bf16) summed in float32 in any order, each addition rounded once (vdpbf16ps: two
    # per pair of k, then the 16 lanes' partial sums added): |error| <= gamma_n * sum |product|, gamma_n =
    # n u / (1 - n u) (Higham). Flushed denormals add at most 2^-126 an addition: nothing at these magnitudes
    return n * U / (1 - n * U) * (x_abs @ w_abs.T)


@needs_bf16
@pytest.mark.parametrize("rows", [2, 5, 16, 29, 64])  # one tile part-full, several, the last one part-full
def test_dpbf16_tiles_equal_float64_sums_of_the_rounded_rows(rows, monkeypatch):
    monkeypatch.setattr(linear, "BATCH_PANELS", False)
    rng = np.random.default_rng(200 + rows)
    K = 512
    ws = [_weight(rng, n, K) for n in (7, 130, 64, 203)]  # no multiple of 6 rows: groups span two weights
    bits = tuple(w.bits for w, _ in ws)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    assert linear._tiled_dpbf16(x, *bits)
    outs = linear.linears(x, tuple(w for w, _ in ws), bf16_inputs=True)
    xbits, xr = linear.round_bf16(x)
    direct = tuple(np.empty((rows, b.shape[0]), np.float32) for b in bits)
    decode_tiles.gemm_dpbf16(xbits, bits, direct, linear._starts(tuple(b.shape[0] for b in bits)), 8)
    assert all(np.array_equal(a, b) for a, b in zip(outs, direct, strict=True))  # "medium" takes the tiles
    xr = xr.astype(np.float64)
    for out, (_, w64) in zip(outs, ws, strict=True):
        err = np.abs(out - xr @ w64.T)
        assert (err <= _sum_bound(K, np.abs(xr), np.abs(w64))).all()
        assert np.abs(out - x.astype(np.float64) @ w64.T).max() > 100 * err.max()  # it did round x
    assert np.array_equal(linear.linear(x, ws[1][0], bf16_inputs=True), outs[1])  # one weight alone: the same
    again = linear.linears(x[::-1], tuple(w for w, _ in ws), bf16_inputs=True)  # not its neighbours' sums
    assert all(np.array_equal(a[::-1], b) for a, b in zip(outs, again, strict=True))
    monkeypatch.setattr(linear, "BATCH_DPBF16", False)  # the other medium road: x rounded, the float32 tiles
    fma = linear.linears(x, tuple(w for w, _ in ws), bf16_inputs=True)
    for a, b, (_, w64) in zip(outs, fma, ws, strict=True):
        assert (np.abs(a - b) <= 2 * _sum_bound(K, np.abs(xr), np.abs(w64))).all()


@needs_bf16
@pytest.mark.parametrize("rows", [3, 16])
def test_dpbf16_swiglu_tiles_round_x_and_h_to_bf16(rows, monkeypatch):
    monkeypatch.setattr(linear, "BATCH_PANELS", False)
    rng = np.random.default_rng(9 + rows)
    K, F = 512, 224  # F: a multiple of 32, no multiple of the 6 gate/up rows a tile takes
    (g, g64), (u, u64), (d, d64) = _weight(rng, F, K), _weight(rng, F, K), _weight(rng, K, F)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    got = linear.swiglu(x, g, u, d, bf16_inputs=True)
    xbits, xr = linear.round_bf16(x)
    direct = decode_tiles.swiglu_dpbf16(xbits, g.bits, u.bits, d.bits, linear._starts((K,)), 8)
    assert np.array_equal(got, direct)  # "medium" takes the one-call tiles
    xr = xr.astype(np.float64)
    hg, hu = xr @ g64.T, xr @ u64.T
    h = hg / (1 + np.exp(-hg)) * hu
    hr = linear.round_bf16(h.astype(np.float32))[1].astype(np.float64)  # h rounded to bf16, as "medium" does
    # the kernel's h: float32 sums and SiLU, so next to a bf16 rounding boundary it may take the neighbouring bf16
    # (one step, <= 2^-7 |h|); those steps through |down|, plus the down sum's own rounding
    h_step = 2.0**-7 * np.abs(h) + 2 * _sum_bound(K, np.abs(xr), np.abs(np.vstack([g64, u64])))[:, :F]
    bound = h_step @ np.abs(d64).T + _sum_bound(F, np.abs(hr), np.abs(d64))
    assert (np.abs(got - hr @ d64.T) <= bound).all()
    assert np.abs(got - hr @ d64.T).max() < 0.02 * np.abs(hr @ d64.T).max()  # most h are the same bf16
    monkeypatch.setattr(linear, "BATCH_DPBF16", False)  # the other medium road (x and h rounded too)
    assert (np.abs(got - linear.swiglu(x, g, u, d, bf16_inputs=True)) <= 2 * bound).all()


def test_dpbf16_tiles_only_where_they_fit():
    # 16 pairs of k per vector: other widths keep the float32 tiles (x rounded), and so does one row
    assert not linear._tiled_dpbf16(np.zeros((16, 200), np.float32), np.zeros((8, 200), np.uint16))
    assert not linear._tiled_dpbf16(np.zeros((1, 256), np.float32), np.zeros((8, 256), np.uint16))
    assert not linear._tiled_dpbf16(np.zeros((4, 256), np.float32), np.zeros((8, 256), np.uint16),
                                    np.zeros((256, 48), np.uint16))  # fmt: skip
    assert linear._tiled_dpbf16(np.zeros((4, 256), np.float32), np.zeros((8, 256), np.uint16)) == (
        decode_tiles.DPBF16_TILES
    )
