"""The numba backend's quantized kernels (backends/numba/quant.py), each run for real on random blocks of every
format, against dequantize-then-float32-matmul with `tinyqwen.quantization`'s NumPy dequantizers (llama.cpp's exact
values, checked there against the `gguf` package).

Tolerances, and where they come from:
- dequantization (prefill's blocks, the embedding lookup): bit-for-bit equal — the same float32 products in the
  same order as llama.cpp's dequantize_row_*.
- "float" GEMV (codes widened in registers, x as it is): the float32 rounding of a K-term sum in another order,
  bounded by γ_K · Σ|w·x| with γ_K = K·2⁻²⁴ (the textbook worst case; `_f32_bound`).
- "int8" GEMV (llama.cpp's scheme): (1) equal within the same float32 bound to x̃ Wᵀ, where x̃ is x quantized to
  Q8_0 / Q8_K blocks and dequantized (NumPy, written here from llama.cpp's definitions): the integer sums are exact,
  so only the float32 scaling differs. (2) Within the activation quantization's own bound of x Wᵀ: each x̃ₖ is
  off by at most half a step of its block (step = amax/127; Q8_0 also rounds its scale to fp16, 2⁻¹¹ relative, so
  |x̃ₖ − xₖ| ≤ step·(½ + 127·2⁻¹¹)), so |x̃Wᵀ − xWᵀ| ≤ Σₖ |wₖ|·errₖ.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from numba_decode import assert_whole_step_is_bit_identical, greedy_logits, numba_threads  # noqa: E402

from tinyqwen.backends import get_backend  # noqa: E402
from tinyqwen.backends.numba import QuantWeight, linear, moe, quant  # noqa: E402
from tinyqwen.moe import route  # noqa: E402
from tinyqwen.quantization import (  # noqa: E402
    BLOCK_BYTES,
    BLOCK_VALUES,
    DEQUANTIZE,
    QuantizedTensor,
    dequantize_q8_0,
    quantize_q8_0,
)

QTYPES = ("q8_0", "q4_k", "q6_k")
EPS32 = 2.0**-24


def random_blocks(rng, qtype: str, *shape: int) -> np.ndarray:
    """Random bytes for [..., rows, cols] of `qtype`, with sane fp16 scales (every code and 6-bit scale random)."""
    values, nbytes = BLOCK_VALUES[qtype], BLOCK_BYTES[qtype]
    *lead, cols = shape
    blocks = rng.integers(0, 256, size=(*lead, cols // values, nbytes), dtype=np.uint8)

    def f16(n):  # n random fp16 scales in [1e-3, 1e-2), as bytes
        return rng.uniform(1e-3, 1e-2, size=(*lead, cols // values, n)).astype(np.float16).view(np.uint8)

    if qtype == "q8_0":
        blocks[..., 0:2] = f16(1)
    elif qtype == "q4_k":
        blocks[..., 0:4] = f16(2)  # d and dmin
    else:
        blocks[..., 208:210] = f16(1)
    return blocks.reshape(*lead, cols // values * nbytes)


def quantized(rng, qtype: str, rows: int, cols: int) -> tuple[QuantWeight, np.ndarray]:
    """A random quantized weight for the backend, and its exact float32 values (tinyqwen.quantization's)."""
    data = random_blocks(rng, qtype, rows, cols)
    weight = get_backend("numba").prepare(QuantizedTensor(qtype, (rows, cols), data))
    return weight, DEQUANTIZE[qtype](data)


def _f32_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # [N, K], [M, K] -> [M, N]: γ_K · Σ|w·x|
    return w.shape[1] * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30


def q8_k_roundtrip(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] -> (x̃, step per value): llama.cpp's quantize_row_q8_K (scale = max/−127 of the value of largest
    magnitude, codes rounded half to even and capped at 127), dequantized."""
    b = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    idx = np.abs(b).argmax(-1)
    vmax = np.take_along_axis(b, idx[..., None], -1)
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, np.float32(0.0)).astype(np.float32)
    q = np.minimum(127, np.rint(iscale * b))
    d = np.where(vmax != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    return (q * d).reshape(x.shape), np.broadcast_to(np.abs(d), b.shape).reshape(x.shape)


def activation_roundtrip(x: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] -> (x̃ as the int8 kernels see it, the bound on |x̃ − x| per value)."""
    if qtype == "q8_0":
        xt = dequantize_q8_0(quantize_q8_0(x))
        step = np.abs(x.reshape(x.shape[0], -1, 32)).max(-1, keepdims=True) / 127
        err = step * (0.5 + 127 * 2.0**-11)
        return xt, np.broadcast_to(err, (*err.shape[:2], 32)).reshape(x.shape)
    xt, step = q8_k_roundtrip(x)
    return xt, step * 0.5


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_rows_is_bit_exact(qtype):
    rng = np.random.default_rng(0)
    w, exact = quantized(rng, qtype, 7, 512)
    rows = np.array([6, 0, 3, 3])
    out = w.rows(rows)
    assert out.tobytes() == exact[rows].tobytes()
    assert np.asarray(w).tobytes() == exact.tobytes()
    threaded = np.empty(
        (4, 512), np.float32
    )  # prefill's widening over the threads (rows 2..5): the same bits
    quant.dequantize_rows_parallel(w.kind, w.data, w.data8, 2, threaded)
    assert threaded.tobytes() == exact[2:6].tobytes()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 3])
def test_float_gemv_equals_dequantized_matmul(qtype, m):
    rng = np.random.default_rng(1)
    w, exact = quantized(rng, qtype, 67, 1024)  # 67 rows: chunks of unequal size over the threads
    x = rng.standard_normal((m, 1024)).astype(np.float32)
    got = linear.linear(x, w, quant_gemv="float")
    want = x.astype(np.float64) @ exact.T.astype(np.float64)
    assert np.all(np.abs(got - want) <= _f32_bound(exact, x))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 4])
def test_int8_gemv_equals_quantized_activation_matmul(qtype, m):
    rng = np.random.default_rng(2)
    w, exact = quantized(rng, qtype, 67, 1024)
    x = rng.standard_normal((m, 1024)).astype(np.float32)
    x[:, 5] = 40.0  # an outlier: its block's step is 40/127, far coarser than the others'
    got = linear.linear(x, w, quant_gemv="int8")
    xt, err = activation_roundtrip(x, qtype)
    # (1) the integer sums are exact: equal to x̃ Wᵀ up to float32 rounding
    want_t = xt.astype(np.float64) @ exact.T.astype(np.float64)
    assert np.all(np.abs(got - want_t) <= _f32_bound(exact, xt))
    # (2) and within the activation quantization's bound of x Wᵀ (and not equal to it: x really was quantized)
    want = x.astype(np.float64) @ exact.T.astype(np.float64)
    bound = err.astype(np.float64) @ np.abs(exact).T.astype(np.float64) + _f32_bound(exact, x)
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - want).max() > 1e-4 * np.abs(want).max()


def test_fused_gemv_over_mixed_formats():
    # q, k, v in one launch where v is q6_k and q, k q4_k (as in llama.cpp's Q4_K_M files)
    rng = np.random.default_rng(3)
    pairs = [quantized(rng, t, n, 512) for t, n in (("q4_k", 64), ("q4_k", 16), ("q6_k", 16))]
    x = rng.standard_normal((1, 512)).astype(np.float32)
    for mode in linear.QUANT_GEMV:
        outs = linear.linears(x, tuple(w for w, _ in pairs), quant_gemv=mode)
        for out, (w, _) in zip(outs, pairs, strict=True):
            assert np.array_equal(out, linear.linear(x, w, quant_gemv=mode))  # same kernel, same order


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("mode", ["float", "int8 off"])
@pytest.mark.parametrize("panels", [False, True])
def test_prefill_dequantizes_blocks_into_blas(qtype, mode, panels, monkeypatch):
    # "float" (and "int8" with INT8_PREFILL off): blocks of rows widened to float32 into BLAS, or on AVX-512 into
    # prefill_gemm.py's panels (QUANT_PREFILL_PANELS; tests/test_prefill_gemm.py checks them further)
    if panels and not linear.prefill_gemm.available():
        pytest.skip("the panels need AVX-512")
    monkeypatch.setattr(linear, "QUANT_PREFILL_PANELS", panels)
    monkeypatch.setattr(linear, "INT8_PREFILL", tuple(quant.KINDS) if mode == "float" else ())
    gemv = mode.split()[0]
    rng = np.random.default_rng(4)
    w, exact = quantized(rng, qtype, 40, 256)
    x = rng.standard_normal((9, 256)).astype(np.float32)  # more rows than QUANT_GEMV_MAX_ROWS: prefill
    want = x @ exact.T
    bound = float(_f32_bound(exact, x).max())
    assert np.allclose(linear.linear(x, w, quant_gemv=gemv), want, rtol=0, atol=bound)
    # blocks of 3 rows (the scratch buffer never holds the whole weight): the same numbers
    monkeypatch.setattr(linear, "QUANT_WIDEN_BLOCK_BYTES", 3 * 4 * 256)
    assert np.allclose(linear.linear(x, w, quant_gemv=gemv), want, rtol=0, atol=bound)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [5, 8, 71])  # a tile and one token, two tiles, 17 tiles and 3 tokens (row dots)
def test_int8_prefill_tiles_equal_the_row_dots(qtype, m, monkeypatch):
    """Prefill's int8 tiles (quant_matmul.py: four tokens per decoded weight row) do each (row, token) pair's
    float work exactly as decode's row dots, so the same bits token by token; and, as the GEMV, within float32
    rounding of x̃ Wᵀ and within the activation quantization's bound of x Wᵀ."""
    rng = np.random.default_rng(11)
    w, exact = quantized(rng, qtype, 67, 768)  # 3 blocks of 256: the tiles' block loop runs
    x = rng.standard_normal((m, 768)).astype(np.float32)
    x[:, 5] = 40.0  # an outlier in every token's first block
    monkeypatch.setattr(linear, "INT8_PREFILL", tuple(quant.KINDS))  # (q8_0 takes BLAS by default)
    got = linear.linear(x, w, quant_gemv="int8")
    rows = np.concatenate([linear.linear(x[i : i + 4], w, quant_gemv="int8") for i in range(0, m, 4)])
    assert got.tobytes() == rows.tobytes()  # decode's GEMV takes up to 4 tokens: the row dots
    xt, err = activation_roundtrip(x, qtype)
    want_t = xt.astype(np.float64) @ exact.T.astype(np.float64)
    assert np.all(np.abs(got - want_t) <= _f32_bound(exact, xt))
    want = x.astype(np.float64) @ exact.T.astype(np.float64)
    bound = err.astype(np.float64) @ np.abs(exact).T.astype(np.float64) + _f32_bound(exact, x)
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.skipif(not quant.avx2.HAS_AVX2, reason="this CPU has no AVX2: the tiles are the plain loops")
@pytest.mark.parametrize("qtype", QTYPES)
def test_avx2_tiles_equal_the_loops(qtype):
    # a CPU without AVX2 takes the tiles as four calls of the plain row loops: the same bits as the IR tiles
    from tinyqwen.backends.numba import quant_matmul

    rng = np.random.default_rng(12)
    data = random_blocks(rng, qtype, 16, 768)
    data8 = data.view(np.int8)
    x = rng.standard_normal((4, 768)).astype(np.float32)
    x[:, 7] = -30.0
    a0q, a0d, akq, akd, aks, akp = quant_matmul.quantize_acts(x, True, True, 2)
    acc = np.empty(8, np.float32)
    if qtype == "q8_0":
        args = [(data, data8, n, a0q, a0d, 0, acc) for n in range(16)]
    elif qtype == "q4_k":
        args = [(data, n, akq, akd, aks, 0, acc) for n in range(16)]
    else:
        args = [(data, data8, n, akq, akd, akp, 0, acc) for n in range(16)]
    loops, vector = (getattr(quant_matmul, f"_{qtype}_tile_{name}") for name in ("loops", "avx2"))
    got = np.array([vector(*a) for a in args], np.float32)
    assert got.tobytes() == np.array([loops(*a) for a in args], np.float32).tobytes()


@pytest.mark.skipif(not quant.avx2.HAS_AVX2, reason="this CPU has no AVX2: the tiles are the plain loops")
@pytest.mark.parametrize("qtype", ["q4_k", "q6_k"])
def test_avx2_tile8_equals_the_loops(qtype):
    # the 8-token tiles (one decoded block for 8 tokens) against 8 calls of the plain row loops: the same bits;
    # with fp16 scales above the subnormal limit and below it (the scales of small weights are subnormal halves)
    from tinyqwen.backends.numba import quant_matmul

    rng = np.random.default_rng(13)
    nbytes, at = {"q4_k": (144, slice(0, 4)), "q6_k": (210, slice(208, 210))}[qtype]
    data = random_blocks(rng, qtype, 16, 768).reshape(16, 3, nbytes)
    tiny = rng.uniform(1e-6, 6e-5, size=(8, 3, (at.stop - at.start) // 2)).astype(np.float16)
    data[8:, :, at] = tiny.view(np.uint8)  # subnormal halves
    data = data.reshape(16, -1)
    data8 = data.view(np.int8)
    x = rng.standard_normal((8, 768)).astype(np.float32)
    x[:, 7] = -30.0
    a0q, a0d, akq, akd, aks, akp = quant_matmul.quantize_acts(x, True, True, 2)
    acc = np.empty(8, np.float32)
    if qtype == "q4_k":
        args = [(data, n, akq, akd, aks, 0, acc) for n in range(16)]
    else:
        args = [(data, data8, n, akq, akd, akp, 0, acc) for n in range(16)]
    loops, vector = (getattr(quant_matmul, f"_{qtype}_tile8_{name}") for name in ("loops", "avx2"))
    got = np.array([vector(*a) for a in args], np.float32)
    assert got.tobytes() == np.array([loops(*a) for a in args], np.float32).tobytes()


def test_tile_fp16_scales_equal_the_hardware_conversion():
    # the tiles read fp16 scales with integer instructions (quant_matmul._half): every finite fp16 value,
    # subnormals, zeros and signs included, against NumPy's conversion, through a Q8_0 tile with w = x = 1
    from tinyqwen.backends.numba import quant_matmul

    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = halves[np.isfinite(halves.view(np.float16))]
    rows = np.zeros((halves.size, 34), np.uint8)
    rows[:, 0:2] = halves.view(np.uint8).reshape(-1, 2)
    rows[:, 2:] = 1
    w = QuantWeight("q8_0", rows)
    xq = np.ones((4, 32), np.int8)
    xd = np.ones((4, 1), np.float32)
    got = quant_matmul.tile_values(
        w.kind,
        w.data,
        w.data8,
        (xq, xd, xq[:, :0], xd[:, :0], xd[:, :0].view(np.int32), np.empty((4, 0), np.int16)),
    )
    want = halves.view(np.float16).astype(np.float32) * np.float32(32)
    # equal values (bits but for −0 scales: the lanes start at +0, and +0 + −0 = +0, as in the row dots)
    assert np.array_equal(got, np.repeat(want[:, None], 4, 1))


def test_embedding_lookup_widens_only_the_rows_read():
    rng = np.random.default_rng(5)
    w, exact = quantized(rng, "q6_k", 50, 256)
    ids = np.array([[3, 49], [0, 3]])
    assert np.array_equal(get_backend("numba").embed(w, ids), exact[ids])


@pytest.mark.parametrize("mode", linear.QUANT_GEMV)
@pytest.mark.parametrize(
    "n", [1, 6, 40]
)  # decode's fused kernel, prefill's expert groups (40: 10 per expert)
def test_moe_block_with_stacked_quantized_experts(mode, n):
    rng = np.random.default_rng(6)
    E, d, f, k = 8, 256, 512, 2
    stacks = {}
    for name, qtype, shape in (("g", "q4_k", (E, f, d)), ("u", "q4_k", (E, f, d)), ("dn", "q6_k", (E, d, f))):
        data = random_blocks(rng, qtype, *shape)
        stacks[name] = (
            get_backend("numba").prepare(QuantizedTensor(qtype, shape, data)),
            DEQUANTIZE[qtype](data),
        )
    router = (rng.standard_normal((E, d)) * 0.1).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    out, logits = moe.moe_block(
        x, router, stacks["g"][0], stacks["u"][0], stacks["dn"][0], k, True, quant_gemv=mode
    )
    weights, experts = route(x @ router.T, k, True)
    g, u, dn = (stacks[s][1].astype(np.float64) for s in ("g", "u", "dn"))
    want = np.zeros((n, d))
    for t in range(n):
        for s in range(k):
            e = experts[t, s]
            # "int8" quantizes x and h to Q8_K (decode and prefill alike); "float" multiplies them as they are
            int8 = mode == "int8"
            xs = q8_k_roundtrip(x[t : t + 1])[0][0] if int8 else x[t]
            a, b = xs @ g[e].T, xs @ u[e].T
            with np.errstate(over="ignore"):
                h = (a / (1 + np.exp(-a)) * b).astype(np.float32)[None]
            want[t] += weights[t, s] * ((q8_k_roundtrip(h)[0] if int8 else h)[0] @ dn[e].T)
    # float32 rounding only, once x and h are quantized as the kernels quantize them (a value of h near a
    # rounding boundary may round the other way from float32 noise: one step of 1/127 of its block in one term)
    assert np.abs(out - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("mode", linear.QUANT_GEMV)
@pytest.mark.parametrize("blas", [False, True])
def test_moe_prefill_groups_equal_the_decode_kernel(mode, blas, monkeypatch):
    """Prefill's kernels (the pairs grouped by expert) and decode's (every pair over the threads) take the same
    dot products and sum each token's experts in slot order: the same bits, token by token. Experts with many
    tokens widened into BLAS instead: float32 rounding apart, within int8 activation rounding for "int8"."""
    monkeypatch.setitem(moe.BLAS_MIN_TOKENS, mode, 1 if blas else 10**9)  # every expert, or none
    rng = np.random.default_rng(7)
    E, d, f, k = 6, 256, 256, 3
    stacks = [
        get_backend("numba").prepare(QuantizedTensor(qtype, shape, random_blocks(rng, qtype, *shape)))
        for qtype, shape in (("q4_k", (E, f, d)), ("q8_0", (E, f, d)), ("q6_k", (E, d, f)))
    ]
    x = rng.standard_normal((12, d)).astype(np.float32)
    weights, experts = route(rng.standard_normal((12, E)).astype(np.float32), k, True)
    whole = moe._moe_prefill_quant(x, experts, weights, *stacks, mode == "int8")
    for t in range(x.shape[0]):
        one = moe._moe_decode_quant(
            x[t : t + 1], experts[t : t + 1], weights[t : t + 1], *stacks, mode == "int8"
        )
        if not blas:
            assert np.array_equal(one[0], whole[t])
        else:  # float32 sums in BLAS's order; for "int8", decode's x and h rounded to 8 bits: each term moves by
            # ~1/256 of its size, and these outputs are sums of large cancelling terms (measured 2.8e-2 of the
            # largest output; a wrong expert or weight would be off by its whole size)
            bound = 5e-2 if mode == "int8" else 1e-5
            assert np.abs(one[0] - whole[t]).max() <= bound * np.abs(whole[t]).max()


@pytest.mark.parametrize("down", ["q4_k", "q6_k", "q8_0"])
def test_moe_decode_pair_jobs_equal_the_two_launches(down, monkeypatch):
    """Decode's pairs as whole jobs of one launch (gate/up rows, h quantized, down rows on one thread) take the
    same row dots and row quantizers as the two launches: the same bits, for one token and a few."""
    rng = np.random.default_rng(11)
    E, d, f, k = 6, 256, 512, 4
    stacks = [
        get_backend("numba").prepare(QuantizedTensor(qtype, shape, random_blocks(rng, qtype, *shape)))
        for qtype, shape in (("q4_k", (E, f, d)), ("q8_0", (E, f, d)), (down, (E, d, f)))
    ]
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, threads))  # (pair jobs need as many pairs as threads: k = 4 on any machine)
    try:
        for n in (1, 3):
            x = rng.standard_normal((n, d)).astype(np.float32)
            weights, experts = route(rng.standard_normal((n, E)).astype(np.float32), k, True)
            monkeypatch.setattr(moe, "MOE_PAIR_JOBS", False)
            two = moe._moe_decode_quant(x, experts, weights, *stacks, True)
            monkeypatch.setattr(moe, "MOE_PAIR_JOBS", True)
            one = moe._moe_decode_quant(x, experts, weights, *stacks, True)
            assert np.array_equal(one, two) and np.abs(one).max() > 0
    finally:
        numba.set_num_threads(threads)


def test_bad_block_data_is_one_clear_line():
    with pytest.raises(ValueError, match="q4_k data must be uint8"):
        QuantWeight("q4_k", np.zeros((2, 145), np.uint8))
    with pytest.raises(TypeError, match="unsupported block format 'q5_k'"):
        QuantWeight("q5_k", np.zeros((2, 176), np.uint8))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny dense Qwen3 whose rows are whole Q4_K super-blocks, written as q8_0 and q4_k_m GGUF files."""
    from tinyqwen.quantize import quantize_checkpoint
    from tinyqwen.testing import write_tiny_qwen3

    tmp = tmp_path_factory.mktemp("gguf")
    folder = write_tiny_qwen3(
        tmp / "dense", seed=1, scale=0.3, with_tokenizer=False, hidden_size=256, intermediate_size=512,
        head_dim=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, bos_token_id=None,
        eos_token_id=511,
    )  # fmt: skip
    paths = {}
    for target in ("q8_0", "q4_k_m"):
        paths[target] = tmp / f"m-{target}.gguf"
        quantize_checkpoint(folder, target, paths[target])
    return paths


@pytest.mark.parametrize("target", ["q8_0", "q4_k_m"])
def test_tiny_gguf_model_logits_match_the_numpy_reference(tiny_gguf, target, monkeypatch):
    import tinyqwen
    from tinyqwen.backends.numba import backend as numba_backend

    path = tiny_gguf[target]
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = tinyqwen.load_model(path)(ids)  # numpy: widens each matrix's blocks, multiplies in float32
    scale = np.abs(want).max()
    model = tinyqwen.load_model(path, backend="numba")
    layer = model.weights.layers[0]
    assert isinstance(layer.attn.q_proj, QuantWeight) and isinstance(layer.mlp.down_proj, QuantWeight)
    assert isinstance(model.weights.lm_head, QuantWeight)  # the tied head stays in blocks too
    # prefill (8 tokens) with "float": blocks dequantized into BLAS, float32 rounding only
    model.backend = numba_backend(quant_gemv="float")
    assert np.abs(model(ids) - want).max() <= 1e-5 * scale
    # decode, token by token through the cache. "float": float32 rounding only. "int8": every activation entering
    # a product is rounded to 8 bits (steps of amax/127 per block); these 0.3-scale random weights amplify any
    # change through the layers (Q8_0 *weights* move these logits by 0.028 of their size, tests/test_gguf.py), so
    # the bound is of that order: measured 0.023 (q8_0) and 0.037 (q4_k_m); float 1.1e-6 and 1.8e-6
    errors = {}
    for mode, bound in (("float", 2e-5), ("int8", 0.06)):
        model.backend = numba_backend(quant_gemv=mode)
        cache = model.new_cache(1, ids.shape[1])
        got = np.concatenate(
            [model.forward(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], 1
        )
        errors[mode] = float(np.abs(got - want).max() / scale)
        assert errors[mode] <= bound, (mode, errors)
    assert errors["int8"] > 10 * errors["float"]  # the activations really were quantized
    # "int8" prefill (quant_matmul's tiles): the activations rounded as decode rounds them, so the same bound
    # (measured 0.023 / 0.034 of the largest logit here)
    model.backend = numba_backend(quant_gemv="int8")
    default = float(
        np.abs(model(ids) - want).max() / scale
    )  # q8_0 (every format on AVX-512) takes the dequantized blocks by default (linear.INT8_PREFILL)
    monkeypatch.setattr(linear, "INT8_PREFILL", tuple(quant.KINDS))  # every format on the tiles
    prefill = float(np.abs(model(ids) - want).max() / scale)
    assert 10 * errors["float"] < prefill <= 0.06, (prefill, errors)
    if target == "q8_0" or linear.prefill_gemm.available():  # BLAS's or the panels': float32 rounding only
        assert default <= 1e-5
    else:  # q4_k / q6_k matrices on the tiles by default
        assert 10 * errors["float"] < default <= 0.06, (default, errors)


@pytest.mark.skipif(not quant.avx2.HAS_AVX2, reason="this CPU has no AVX2: the GEMVs use the plain loops")
@pytest.mark.parametrize("qtype", QTYPES)
def test_avx2_block_dots_equal_the_loops(qtype):
    # the integer sums are exact both ways, and the float scaling is the same expression: equal bits
    from numba import njit

    rng = np.random.default_rng(8)
    data = random_blocks(rng, qtype, 16, 512)
    data8 = data.view(np.int8)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    x[0, 7] = -30.0  # an outlier, so codes reach -127 and +127
    kind = quant.KINDS[qtype]
    acts = quant.activations(x, {kind}, True)
    a = tuple(v[0] for v in acts[1:6])  # Q8_0 codes, scales; Q8_K codes, scales, sums

    def rows(dot):
        if qtype == "q4_k":
            run = njit(lambda b, b8, a: dot(b, a[2], a[3], a[4], 32))
        elif qtype == "q8_0":
            run = njit(lambda b, b8, a: dot(b, b8, a[0], a[1], 32))
        else:
            run = njit(lambda b, b8, a: dot(b, b8, a[2], a[3], 32))
        return np.array([run(data[n], data8[n], a) for n in range(16)])

    loops, vector = (getattr(quant, f"_dot_{qtype}_int_{name}") for name in ("loops", "avx2"))
    assert rows(vector).tobytes() == rows(loops).tobytes()


@pytest.mark.parametrize("target", ["q8_0", "q4_k_m"])
def test_tiny_moe_gguf_logits_match_the_numpy_reference(tmp_path, target):
    """A small MoE GGUF file (expert stacks in Q4_K / Q6_K, or Q8_0): the numba backend's prefill (the pairs grouped
    by expert) and decode (every pair in one launch) against the numpy reference, which widens the blocks."""
    from test_gguf import moe_k_quants

    import tinyqwen
    from tinyqwen.backends.numba import backend as numba_backend
    from tinyqwen.quantize import quantize_checkpoint

    path = tmp_path / f"moe-{target}.gguf"
    quantize_checkpoint(moe_k_quants(tmp_path), target, path)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    want = tinyqwen.load_model(path)(ids)
    scale = np.abs(want).max()
    model = tinyqwen.load_model(path, backend="numba")
    assert isinstance(model.weights.layers[0].mlp.gate_proj, QuantWeight)
    errors = {}
    for mode, bound in (("float", 2e-5), ("int8", 0.06)):  # the bounds of the dense test above, same reasons
        model.backend = numba_backend(quant_gemv=mode)
        prefill = model(ids)  # 12 tokens over 4 experts: grouped int8 dots ("int8"), BLAS ("float")
        cache = model.new_cache(1, ids.shape[1])
        decode = np.concatenate(
            [model.forward(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], 1
        )
        errors[mode] = [float(np.abs(got - want).max() / scale) for got in (prefill, decode)]
        assert max(errors[mode]) <= bound, (mode, errors)
    assert errors["int8"][0] > 10 * errors["float"][0]  # prefill's activations really were quantized


@pytest.mark.skipif(not quant.avx2.HAS_AVX2, reason="this CPU has no AVX2: the GEMVs use the plain loops")
@pytest.mark.parametrize("qtype", QTYPES)
def test_avx2_row_dots_equal_the_loops(qtype):
    # the dense GEMV's row dots: eight float lanes kept across the blocks, summed in order; the loops do the same
    # fmul/fadd on the same lanes without fast-math, so equal bits (over 3 blocks of 256: the block loop runs)
    from numba import njit

    rng = np.random.default_rng(9)
    data = random_blocks(rng, qtype, 16, 768)
    data8 = data.view(np.int8)
    x = rng.standard_normal((1, 768)).astype(np.float32)
    x[0, 7] = -30.0  # an outlier, so codes reach -127 and +127
    acts = quant._quantize_acts(x, True, True)
    a0q, a0d, akq, akd, aks = acts
    acc = np.empty(8, np.float32)
    if qtype == "q8_0":
        args = [(data, data8, n, a0q, a0d, 0, acc) for n in range(16)]
    elif qtype == "q4_k":
        args = [(data, n, akq, akd, aks, 0, acc) for n in range(16)]
    else:
        args = [(data, data8, n, akq, akd, 0, acc) for n in range(16)]
    loops, vector = (getattr(quant, f"_row_{qtype}_{name}") for name in ("loops", "avx2"))
    got = np.array([vector(*a) for a in args], np.float32)
    assert got.tobytes() == np.array([loops(*a) for a in args], np.float32).tobytes()
    a0q, a0d, akq, akd, aks = (a[0] for a in acts)
    # and the block dots' value up to float32 rounding of the scaled sums (their order differs)
    if qtype == "q4_k":
        block = njit(lambda b, q, d, s: quant._dot_q4_k_int_loops(b, q, d, s, 32))
        old = [block(data[n], akq, akd, aks) for n in range(16)]
    else:
        dot = getattr(quant, f"_dot_{qtype}_int_loops")
        block = njit(lambda b, b8, q, d: dot(b, b8, q, d, 32))
        old = [block(data[n], data8[n], *((a0q, a0d) if qtype == "q8_0" else (akq, akd))) for n in range(16)]
    assert np.allclose(got, old, rtol=1e-5, atol=1e-5 * np.abs(old).max())


@pytest.mark.skipif(not quant.avx2.HAS_VNNI, reason="this CPU has no VNNI: Q8_0 rows use vpmaddubsw")
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("cols", [768, 800])  # 24 blocks, and 25: the 512-bit row's last block alone
def test_vnni_q8_0_rows_equal_the_loops(wide, cols):
    # vpdpbusd's four-product lanes are vpmaddwd(vpmaddubsw)'s (Q8_0's pairs never saturate int16), scaled and
    # added in the same order: equal bits, including w = -128 (|w| = 128 as u8) and x codes at ±127
    if wide and not quant.avx2.HAS_VNNI_512:
        pytest.skip("this CPU has no 512-bit VNNI")
    rng = np.random.default_rng(11)
    data = random_blocks(rng, "q8_0", 16, cols)
    data[3, 2:34] = 0x80  # a block of -128 codes
    data[4, 36 + 2 : 36 + 34] = 0  # and one of zeros
    data8 = data.view(np.int8)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    x[0, 7], x[0, 40] = -30.0, 30.0
    a0q, a0d, *_ = quant._quantize_acts(x, True, True)
    acc = np.empty(8, np.float32)
    vector = quant._row_q8_0_vnni512 if wide else quant._row_q8_0_vnni
    got = np.array([vector(data, data8, n, a0q, a0d, 0, acc) for n in range(16)], np.float32)
    want = np.array([quant._row_q8_0_loops(data, data8, n, a0q, a0d, 0, acc) for n in range(16)], np.float32)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("m", [1, 3])
def test_fused_quant_swiglu_equals_its_parts(m, monkeypatch):
    # decode's one-call SwiGLU ("int8") against gate/up and down as separate int8 GEMVs: the same row dots on the
    # same quantized activations, so equal bits (Q4_K_M's mix: gate/up q4_k, down q6_k)
    rng = np.random.default_rng(10)
    g, u = (quantized(rng, "q4_k", 768, 512)[0] for _ in range(2))  # [F, K]
    d = quantized(rng, "q6_k", 512, 768)[0]  # [K, F]
    x = rng.standard_normal((m, 512)).astype(np.float32)
    monkeypatch.setattr(linear, "FUSED_QUANT_SWIGLU", True)
    got = linear.swiglu(x, g, u, d, quant_gemv="int8")
    monkeypatch.setattr(linear, "FUSED_QUANT_SWIGLU", False)
    gv, uv = linear.linears(x, (g, u), quant_gemv="int8")
    want = linear.linear(linear._silu_mul(gv, uv), d, quant_gemv="int8")
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("target", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("threads, workers", [(2, 2), (2, 5), (1, 3)])
def test_one_region_quantized_layer_equals_five_loops(tiny_gguf, monkeypatch, target, threads, workers):
    # the quantized layer as ONE parallel region against its five-`prange` form: equal bits, with any number of
    # region iterations per thread (see phases.py)
    import tinyqwen
    from tinyqwen.backends.numba import decode_layer, decode_step

    model = tinyqwen.load_model(tiny_gguf[target], backend="numba")
    monkeypatch.setattr(decode_layer, "_workers", lambda: workers)
    monkeypatch.setattr(decode_step, "QUANT_STEP", False)  # layer by layer (the whole step: its own test)
    logits = {}
    with numba_threads(threads):
        for region in (True, False):
            monkeypatch.setattr(decode_layer, "ONE_REGION", region)
            logits[region] = greedy_logits(model, np.array([[3, 1, 4]]), model.new_cache(1, 12))
    assert np.array_equal(logits[True], logits[False])


@pytest.mark.parametrize("target", ["q8_0", "q4_k_m"])
def test_fused_quantized_decode_layer_is_bit_identical_to_kernel_by_kernel(tiny_gguf, target):
    # decode steps through the one-call quantized layer ("int8") and kernel by kernel: the same activation
    # quantizations and row dots in the same order, so the logits and the cache contents are equal bit for bit.
    # q4_k_m mixes formats within a layer (q4_k and q6_k), so the kernel's per-matrix dispatch is exercised too
    from dataclasses import replace

    import tinyqwen

    fused = tinyqwen.load_model(tiny_gguf[target], backend="numba")
    kinds = {
        w.qtype
        for layer in fused.weights.layers
        for w in vars(layer.attn).values()
        if isinstance(w, QuantWeight)
    }
    kinds |= {
        w.qtype
        for layer in fused.weights.layers
        for w in vars(layer.mlp).values()
        if isinstance(w, QuantWeight)
    }
    assert kinds == ({"q8_0"} if target == "q8_0" else {"q4_k", "q6_k"})
    plain = replace(fused, backend=replace(fused.backend, decode_step=None, decode_layer=None))
    calls = []
    layer_fn = fused.backend.decode_layer
    fused.backend = replace(  # layer by layer (the whole step: its own test)
        fused.backend, decode_step=None, decode_layer=lambda *a: calls.append(layer_fn(*a)) or calls[-1]
    )
    ids = np.array([[3, 1, 4, 1, 5]])
    logits, caches = {}, {}
    for name, model in (("fused", fused), ("plain", plain)):
        caches[name] = model.new_cache(1, 12)
        logits[name] = greedy_logits(model, ids, caches[name])
    layers = fused.config.num_hidden_layers
    assert sum(c is not None for c in calls) == 4 * layers  # every decode step's layers took the fused path
    assert np.array_equal(logits["fused"], logits["plain"])
    f, p = caches["fused"], caches["plain"]
    for a, b in zip(f.keys + f.values, p.keys + p.values, strict=True):
        assert np.array_equal(a, b)
    # "float" mode: kernel by kernel (None)
    from tinyqwen.backends.numba import backend as numba_backend

    float_fn = numba_backend(quant_gemv="float").decode_layer
    c, layer = fused.config, fused.weights.layers[0]
    x = np.zeros((1, 1, c.hidden_size), np.float32)
    cos = sin = np.ones((1, 1, c.head_dim), np.float32)
    cache = fused.new_cache(1, 4)
    assert float_fn(x, layer, cos, sin, np.ones((1, 1, 1), bool), cache, 0, c) is None
    assert layer_fn(x, layer, cos, sin, np.ones((1, 1, 1), bool), cache, 0, c).shape == x.shape


@pytest.mark.parametrize("target", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("threads, workers", [(2, 2), (1, 1), (2, 5)])
def test_whole_quantized_decode_step_is_bit_identical_to_layer_by_layer(
    tiny_gguf, monkeypatch, target, threads, workers
):
    # the quantized step in ONE parallel region (decode_step.py: every layer's 11 phases, the final norm quantized,
    # the lm_head's rows) against one call per layer and kernel by kernel ("int8"): the same activation
    # quantizations and row dots, so equal logits and caches bit for bit; one thread, and more region iterations
    # than threads. q4_k_m mixes formats across layers (and its lm_head is q6_k): each layer's row of kinds
    import tinyqwen

    model = tinyqwen.load_model(tiny_gguf[target], backend="numba")
    assert_whole_step_is_bit_identical(model, np.array([[3, 1, 4]]), monkeypatch, threads, workers)
    # "float" mode: no whole step (kernel by kernel)
    from tinyqwen.backends.numba import backend as numba_backend

    c = model.config
    x = np.zeros((1, 1, c.hidden_size), np.float32)
    cos = sin = np.ones((1, 1, c.head_dim), np.float32)
    float_step = numba_backend(quant_gemv="float").decode_step
    assert float_step(x, model.weights, cos, sin, np.ones((1, 1, 1), bool), model.new_cache(1, 4), c) is None
