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


def test_bf16_inputs_take_the_rounded_rows(
    monkeypatch,
):  # "medium" without oneDNN: the same products on x in bf16
    monkeypatch.setattr(linear.onednn, "available", lambda: False)
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
