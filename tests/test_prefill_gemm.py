"""The numba backend's prefill products on AVX-512 panels (backends/numba/prefill_gemm.py): every row against
float64 sums of the same bf16 weights, within 1e-5 of the output's size (the backend's products' tolerance; a
panel row is one float32 FMA chain over k, ~2e-6 of the size measured at K = 1024), the same rows in any order, and
the model's logits against the BLAS road's (and the NumPy backend's) within float32 rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from tinyqwen.backends import get_backend  # noqa: E402
from tinyqwen.backends.numba import linear, prefill_gemm  # noqa: E402
from tinyqwen.backends.numba.weights import BF16Weight  # noqa: E402
from tinyqwen.quantization import BLOCK_BYTES, BLOCK_VALUES, DEQUANTIZE, QuantizedTensor  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.skipif(not prefill_gemm.available(), reason="the panels need AVX-512")
NO_BF16 = (
    "the vdpbf16ps panels need AVX512-BF16 in Numba's target (this CPU, or NUMBA_CPU_FEATURES, lacks it)"
)
needs_bf16 = pytest.mark.skipif(not prefill_gemm.available_bf16(), reason=NO_BF16)


def _weight(rng, n: int, k: int) -> tuple[BF16Weight, np.ndarray]:
    bits = (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return BF16Weight(bits), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.abs(got - want).max() <= 1e-5 * np.abs(want).max())


@pytest.fixture
def small_blocks(monkeypatch):  # blocks of 36 widened rows at K = 512: weights span several, blocks span two
    monkeypatch.setattr(prefill_gemm, "BUF_BYTES", 36 * 4 * 512)


# 65: one row past a decode step's GEMV_MAX_ROWS, 3 panels (the last one row full); 96: three full panels;
# 272: a 256-token chunk with 16 decode rows
@pytest.mark.parametrize("rows", [65, 96, 272])
def test_panel_products_equal_float64_per_row_in_any_row_order(rows, small_blocks):
    rng = np.random.default_rng(rows)
    K = 512
    ws = [_weight(rng, n, K) for n in (7, 130, 64, 203)]  # row counts no multiple of 12
    x = rng.standard_normal((rows, K)).astype(np.float32)
    assert rows > linear.GEMV_MAX_ROWS and linear._prefill_panelled(tuple(w.bits for w, _ in ws))
    outs = linear.linears(x, tuple(w for w, _ in ws))
    for out, (_, w64) in zip(outs, ws, strict=True):
        assert _close(out, x.astype(np.float64) @ w64.T)
    again = linear.linears(
        x[::-1], tuple(w for w, _ in ws)
    )  # a row's sums: not its neighbours', nor its place
    assert all(np.array_equal(out[::-1], r) for out, r in zip(outs, again, strict=True))
    alone = linear.linear(x, ws[1][0])  # one weight alone: the same kernel, the same sums
    assert np.array_equal(alone, outs[1])


def test_panel_swiglu_equals_float64(small_blocks):
    rng = np.random.default_rng(7)
    K, F, M = 256, 200, 100
    (g, g64), (u, u64), (d, d64) = _weight(rng, F, K), _weight(rng, F, K), _weight(rng, K, F)
    x = rng.standard_normal((M, K)).astype(np.float32)
    hg = x.astype(np.float64) @ g64.T
    want = (hg / (1 + np.exp(-hg)) * (x.astype(np.float64) @ u64.T)) @ d64.T
    assert _close(linear.swiglu(x, g, u, d), want)


@pytest.mark.parametrize("dpbf16", [False, True])  # x rounded into the float32 panels; the vdpbf16ps panels
def test_bf16_inputs_take_the_rounded_rows(monkeypatch, dpbf16):  # "medium" without oneDNN: x in bf16
    if dpbf16 and not prefill_gemm.available_bf16():
        pytest.skip(NO_BF16)
    monkeypatch.setattr(linear.onednn, "available", lambda: False)
    monkeypatch.setattr(linear, "PREFILL_DPBF16", dpbf16)
    rng = np.random.default_rng(3)
    ws = [_weight(rng, n, 128) for n in (96, 32)]
    x = rng.standard_normal((80, 128)).astype(np.float32)
    rounded = linear.round_bf16(x)[1].astype(np.float64)
    outs = linear.linears(x, tuple(w for w, _ in ws), bf16_inputs=True)
    for out, (_, w64) in zip(outs, ws, strict=True):
        assert _close(out, rounded @ w64.T)


def test_prefill_logits_and_greedy_equal_the_blas_road_and_numpy(monkeypatch):
    import tinyqwen
    from tinyqwen.generation import generate

    path = FIXTURES / "dense-untied-bf16-sharded"  # bf16 weights, hidden 64, ffn 128
    ids = np.random.default_rng(0).integers(0, 512, (1, 100))  # past GEMV_MAX_ROWS: the prefill road
    model = tinyqwen.load_model(path, backend="numba")
    panels = np.asarray(model.forward(ids).logits, np.float64)
    greedy = generate(model, ids[0, :80].tolist(), max_new_tokens=8, eos_token_ids=())
    monkeypatch.setattr(linear, "PREFILL_PANELS", False)
    blas = np.asarray(model.forward(ids).logits, np.float64)
    ref_model = tinyqwen.load_model(path)  # numpy: the same bf16 weights, widened
    ref = np.asarray(ref_model.forward(ids).logits, np.float64)
    scale = np.abs(ref).max()
    # float32 sums in another order, through every layer: within 1e-5 of the logits' size (measured ~1e-6)
    assert np.abs(panels - blas).max() <= 1e-5 * scale
    assert np.abs(panels - ref).max() <= 1e-5 * scale
    assert greedy == generate(ref_model, ids[0, :80].tolist(), max_new_tokens=8, eos_token_ids=())


def _quantized(rng, qtype: str, n: int, k: int):  # random blocks (sane fp16 scales) -> weight, exact float64
    values, nbytes = BLOCK_VALUES[qtype], BLOCK_BYTES[qtype]
    blocks = rng.integers(0, 256, size=(n, k // values, nbytes), dtype=np.uint8)
    scales = {"q8_0": slice(0, 2), "q4_k": slice(0, 4), "q6_k": slice(208, 210)}[qtype]
    width = scales.stop - scales.start
    blocks[..., scales] = (
        rng.uniform(1e-3, 1e-2, (n, k // values, width // 2)).astype(np.float16).view(np.uint8)
    )
    data = blocks.reshape(n, -1)
    weight = get_backend("numba").prepare(QuantizedTensor(qtype, (n, k), data))
    return weight, DEQUANTIZE[qtype](data).astype(np.float64)


# the quantized prefill road off the int8 tiles ("float", or a format not in INT8_PREFILL): blocks dequantized into
# the panels' buffer. 203 rows: no multiple of 12, several blocks of 36 rows (small_blocks) over the two threads'
# chunks; 65 / 100 tokens: a last panel with 1 / 4 rows
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("rows", [65, 100])
def test_quantized_panel_products_equal_float64_of_the_dequantized_weights(
    qtype, rows, small_blocks, monkeypatch
):
    monkeypatch.setattr(linear, "INT8_PREFILL", ())
    rng = np.random.default_rng(rows)
    w, w64 = _quantized(rng, qtype, 203, 512)
    x = rng.standard_normal((rows, 512)).astype(np.float32)
    assert rows > linear.QUANT_GEMV_MAX_ROWS
    want = x.astype(np.float64) @ w64.T
    got = linear.linear(x, w)  # "int8", the format not on the tiles
    assert _close(got, want)
    assert np.array_equal(got, prefill_gemm.matmul_quant(x, w))  # the panels, not BLAS
    assert np.array_equal(linear.linear(x, w, quant_gemv="float"), got)
    assert np.array_equal(linear.linear(x[::-1], w)[::-1], got)  # a row's sums: not its place
    monkeypatch.setattr(linear, "QUANT_PREFILL_PANELS", False)
    assert _close(linear.linear(x, w), want)  # the BLAS road it replaces: the same bound


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k", "q6_k"])
def test_block_dequantization_equals_quant_py_bit_for_bit(qtype):  # (Q6_K: its own loop, scales hoisted)
    rng = np.random.default_rng(11)
    w, w64 = _quantized(rng, qtype, 9, 768)
    got = np.empty((6, 768), np.float32)
    prefill_gemm.dequantize_rows(w.kind, w.data, w.data8, 3, got)
    assert np.array_equal(got, w64[3:9].astype(np.float32))
    want = np.empty_like(got)
    linear.quant.dequantize_rows(w.kind, w.data, w.data8, np.arange(3, 9), want)
    assert np.array_equal(got, want)


# ------------------------------------------------------------ "medium" on AVX512-BF16: the vdpbf16ps panels
U = 2.0**-24  # float32's unit roundoff


def _sum_bound(n: int, x_abs: np.ndarray, w_abs: np.ndarray) -> np.ndarray:  # [M, K], [N, K] -> [M, N]
    # a sum of n exact products, each addition rounded once in float32 (vdpbf16ps: two additions per pair, each
    # rounded to nearest; an FMA chain: one per product), in any order: |error| <= gamma_n * sum |product|,
    # gamma_n = n u / (1 - n u) (Higham, recursive summation). Denormals flushed to zero add at most 2^-126 per
    # addition: far below this bound for these magnitudes
    return n * U / (1 - n * U) * (x_abs @ w_abs.T)


@pytest.fixture
def small_pair_blocks(monkeypatch):  # blocks of 36 rows of bf16 pairs at K = 512: weights span several
    monkeypatch.setattr(prefill_gemm, "BUF_BYTES", 36 * 2 * 512)


@needs_bf16
@pytest.mark.parametrize("rows", [65, 96, 272])
def test_dpbf16_panel_products_equal_float64_sums_of_the_rounded_rows(rows, small_pair_blocks, monkeypatch):
    monkeypatch.setattr(linear.onednn, "available", lambda: False)
    rng = np.random.default_rng(100 + rows)
    K = 512
    ws = [_weight(rng, n, K) for n in (7, 130, 64, 203)]
    bits = tuple(w.bits for w, _ in ws)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    assert linear._prefill_dpbf16(bits) and prefill_gemm.block_rows_bf16(K) == 36
    outs = prefill_gemm.matmul_bf16(x, bits)
    xr = linear.round_bf16(x)[1].astype(np.float64)  # the bf16 nearest each x (ties to even)
    for out, (_, w64) in zip(outs, ws, strict=True):
        err = np.abs(out - xr @ w64.T)
        assert (err <= _sum_bound(K, np.abs(xr), np.abs(w64))).all()
        assert np.abs(out - x.astype(np.float64) @ w64.T).max() > 100 * err.max()  # it did round x
    # "medium" takes them: linears (one launch) and linear (one weight) give these very numbers
    got = linear.linears(x, tuple(w for w, _ in ws), bf16_inputs=True)
    assert all(np.array_equal(a, b) for a, b in zip(got, outs, strict=True))
    assert np.array_equal(linear.linear(x, ws[1][0], bf16_inputs=True), outs[1])
    # against today's other medium road (x rounded, the float32 FMA panels): both within their bound of the sum
    monkeypatch.setattr(linear, "PREFILL_DPBF16", False)
    fma = linear.linears(x, tuple(w for w, _ in ws), bf16_inputs=True)
    for a, b, (_, w64) in zip(outs, fma, ws, strict=True):
        assert (np.abs(a - b) <= 2 * _sum_bound(K, np.abs(xr), np.abs(w64))).all()
    again = prefill_gemm.matmul_bf16(x[::-1], bits)  # a row's sums: not its neighbours', nor its place
    assert all(np.array_equal(a[::-1], b) for a, b in zip(outs, again, strict=True))


@needs_bf16
def test_dpbf16_swiglu_rounds_x_and_h_to_bf16(small_pair_blocks, monkeypatch):
    monkeypatch.setattr(linear.onednn, "available", lambda: False)
    rng = np.random.default_rng(8)
    K, F, M = 512, 200, 100  # F: no multiple of the 6 gate/up pairs a micro-kernel call takes (F / 2: of 4)
    (g, g64), (u, u64), (d, d64) = _weight(rng, F, K), _weight(rng, F, K), _weight(rng, K, F)
    x = rng.standard_normal((M, K)).astype(np.float32)
    got = linear.swiglu(x, g, u, d, bf16_inputs=True)
    assert np.array_equal(got, prefill_gemm.swiglu_bf16(x, g.bits, u.bits, d.bits))  # "medium" takes it
    xr = linear.round_bf16(x)[1].astype(np.float64)
    hg, hu = xr @ g64.T, xr @ u64.T
    h = hg / (1 + np.exp(-hg)) * hu
    hr = linear.round_bf16(h.astype(np.float32))[1].astype(np.float64)  # h rounded to bf16, as "medium" does
    want = hr @ d64.T
    # the kernel's h comes from float32 sums (within _sum_bound of hg, hu) and SiLU in float32, so where h lies
    # near a bf16 rounding boundary it rounds to the neighbouring bf16: one bf16 step (<= 2^-7 |h|) on those. The
    # bound: those steps through |down|, plus the down sum's own rounding
    h_step = 2.0**-7 * np.abs(h) + 2 * _sum_bound(K, np.abs(xr), np.abs(np.vstack([g64, u64])))[:, :F]
    bound = h_step @ np.abs(d64).T + _sum_bound(F, np.abs(hr), np.abs(d64))
    assert (np.abs(got - want) <= bound).all()
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()  # the bound above is loose: most h are equal
    monkeypatch.setattr(linear, "PREFILL_DPBF16", False)  # today's other medium road: x and h rounded too
    other = linear.swiglu(x, g, u, d, bf16_inputs=True)
    assert (np.abs(got - other) <= 2 * bound).all()


@needs_bf16
def test_medium_prefill_logits_stay_within_bf16_rounding_of_highest(monkeypatch):
    import tinyqwen
    from tinyqwen.generation import generate

    monkeypatch.setattr(linear.onednn, "available", lambda: False)
    path = FIXTURES / "dense-untied-bf16-sharded"  # bf16 weights, hidden 64, ffn 128
    ids = np.random.default_rng(0).integers(0, 512, (1, 100))  # past GEMV_MAX_ROWS: the prefill road
    high = tinyqwen.load_model(path, backend="numba")
    medium = tinyqwen.load_model(path, backend="numba", matmul_precision="medium")
    want = np.asarray(high.forward(ids).logits, np.float64)
    got = np.asarray(medium.forward(ids).logits, np.float64)
    monkeypatch.setattr(linear, "PREFILL_DPBF16", False)
    other = np.asarray(medium.forward(ids).logits, np.float64)  # medium on the float32 panels
    monkeypatch.setattr(linear, "PREFILL_DPBF16", True)
    scale = np.abs(want).max()
    # every activation entering a product rounded to bf16 (2^-9 relative): ~1e-2 of the logits' size
    # (tinyqwen.load_model's documented medium tolerance; the bound test_numba_backend.py uses: 3e-2)
    assert 1e-4 < np.abs(got - want).max() <= 3e-2 * scale
    # the two medium roads round the same inputs; they differ by float32 sums' order and the few h that round to
    # the neighbouring bf16 because of it, through every layer
    assert np.abs(got - other).max() <= 1e-2 * scale
    # arg-max at each position: where highest's two best logits lie further apart than twice the medium
    # tolerance, medium's pick must be the same (31 of the 100 positions here; measured: 97 of 100 agree)
    top2 = np.sort(want[0], -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * 3e-2 * scale
    assert clear.sum() >= 10
    assert (got[0].argmax(-1) == want[0].argmax(-1))[clear].all()
    # greedy from an 80-token prompt (the vdpbf16ps panels, then medium's decode GEMVs): the tokens of the other
    # medium road. (Against highest they part at the second token, where the margin is below the tolerance)
    prompt = ids[0, :80].tolist()
    medium_ids = generate(medium, prompt, max_new_tokens=8, eos_token_ids=())
    monkeypatch.setattr(linear, "PREFILL_DPBF16", False)
    assert medium_ids == generate(medium, prompt, max_new_tokens=8, eos_token_ids=())
    assert medium_ids[0] == generate(high, prompt, max_new_tokens=1, eos_token_ids=())[0]
