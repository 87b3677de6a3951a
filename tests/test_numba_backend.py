"""The "numba" backend: each kernel against the NumPy reference, then the whole model against transformers.

Kernel tolerances, as `max |numba - numpy| / max(1, max |numpy|)` (the project's relative measure,
`tinyqwen.verify.tolerance`), on random inputs of realistic size:
- products (linear, swiglu, moe_block, decode attention): ≤ 1e-5 (`RTOL`). Both sides sum float32 products, in a
  different order: Numba vectorises each dot product into 8/16 partial sums, BLAS blocks its own way. Measured
  ≤ 1e-6 here. The bf16 weights are widened exactly, so the only difference is that summation order.
- rms_norm: ≤ 1e-6 (one sum of squares per row; measured ≤ 3e-7).
- apply_rope: exactly equal (the same two products and one sum per value, no reordering).
Whole model: `tolerance(ref)` = 1e-5 of the logits' size against transformers' stored float32 outputs, the same bar as
the NumPy model (tests/test_model.py), well inside the issue's 1e-4 (fp32) / 1e-3 (bf16 fixtures).
Greedy generations must equal transformers' token for token. No test here measures time.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from extras import unavailable
from numba_decode import assert_whole_step_is_bit_identical, greedy_logits, numba_threads

pytest.importorskip("numba")  # the `fast` extra (part of `course`, which CI installs)

from conftest import (
    assert_cached_decode_matches_reference,
    assert_greedy_matches_reference,
    assert_logits_match_reference,
)  # noqa: E402

import tinyqwen  # noqa: E402
from tinyqwen import attention as ref_attention  # noqa: E402
from tinyqwen import mlp, moe, norm, rope  # noqa: E402
from tinyqwen.backends import get_backend, onednn  # noqa: E402
from tinyqwen.backends.numba import (  # noqa: E402
    BF16Weight,  # noqa: E402
    intrinsics,
    linear,
)
from tinyqwen.backends.numba import attention as numba_attention  # noqa: E402
from tinyqwen.bf16 import bf16_to_float32, float32_to_bf16  # noqa: E402
from tinyqwen.errors import BackendError  # noqa: E402
from tinyqwen.safetensors import save_file  # noqa: E402
from tinyqwen.verify import RTOL, tolerance  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/reference.npz"))
NB = get_backend("numba")


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def bf16_weight(rng, *shape, scale=0.05) -> tuple[BF16Weight, np.ndarray]:
    """A random bf16 weight for the numba backend, and the same values widened for the NumPy reference."""
    bits = float32_to_bf16((rng.standard_normal(shape) * scale).astype(np.float32))
    return BF16Weight(bits), bf16_to_float32(bits)


# ------------------------------------------------------------------------------------------------ kernels


def test_docstring_examples():
    import doctest

    from tinyqwen.backends import numba

    for module in (
        numba,
        numba.weights,
        numba.intrinsics,
        numba.linear,
        numba.norm_rope,
        numba.attention,
        numba.moe,
    ):
        assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_bf16_embedding_lookup_widens_exactly():
    bits = np.array([[0x3F80, 0xC000], [0x3FC0, 0x7F80]], dtype=np.uint16)  # 1, -2, 1.5, inf by hand
    w = BF16Weight(bits)
    assert w.shape == (2, 2) and w.nbytes == 8
    embed = get_backend("numba").embed  # the model's lookup goes through the backend's kernel
    np.testing.assert_array_equal(embed(w, np.array([[1, 0]])), [[[1.5, np.inf], [1.0, -2.0]]])
    np.testing.assert_array_equal(np.asarray(w), [[1.0, -2.0], [1.5, np.inf]])


@pytest.mark.parametrize("rows", [1, 3, 9])  # GEMV (≤ 4 tokens) and the widen-a-block + BLAS path
def test_linear_bf16_equals_numpy(rows):
    rng = np.random.default_rng(rows)
    w, w32 = bf16_weight(rng, 300, 256)
    x = rng.standard_normal((1, rows, 256)).astype(np.float32)
    got = NB.linear(x, w)
    assert got.dtype == np.float32 and got.shape == (1, rows, 300)
    assert rel_err(got, mlp.linear(x, w32)) <= RTOL


def test_one_row_prefetch_is_chosen_per_cpu_model(monkeypatch):
    # the next-row prefetch is a hint (it never changes a result: the one-row kernels' equality tests cover both
    # settings on the CPUs that run them); which CPUs take it follows the CPU model Numba compiles for
    from tinyqwen.backends.numba import gemv_one_row, settings

    assert gemv_one_row.ROW_PREFETCH == gemv_one_row.row_prefetch(settings.host_cpu_name())
    # measured: it pays on Sapphire Rapids and Zen 5, costs on Zen 3 (the comment above ROW_PREFETCH)
    assert [gemv_one_row.row_prefetch(n) for n in ("sapphirerapids", "znver3", "znver5")] == [
        True,
        False,
        True,
    ]
    monkeypatch.setenv("NUMBA_CPU_NAME", "znver3")
    assert settings.host_cpu_name() == "znver3"
    monkeypatch.setenv("NUMBA_CPU_NAME", "host")
    assert settings.host_cpu_name() not in ("", "host")


def test_linear_bf16_blocks_cover_every_row(monkeypatch):
    # more rows than one scratch block holds (1 MiB / (4 B · 8192) = 32 rows): the block edges must not drop any
    monkeypatch.setattr(linear, "WIDEN_BLOCK_BYTES", 1 << 20)
    rng = np.random.default_rng(1)
    w, w32 = bf16_weight(rng, 300, 8192, scale=0.01)
    x = rng.standard_normal((6, 8192)).astype(np.float32)
    assert rel_err(NB.linear(x, w), x @ w32.T) <= RTOL


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_linear_bf16_prefill_parts_cover_every_row(monkeypatch, parts):
    # a prefill product (more than GEMV_MAX_ROWS tokens): the weight's rows split over the threads
    # (SPLIT_PREFILL_PRODUCTS), each part widened in blocks (1 MiB in all here: 32 rows of 8192 over `parts`); an
    # odd row count, so that parts and blocks end unevenly. Float32 BLAS against NumPy's float32 product of the
    # same widened weight: only the summation order differs (RTOL)
    monkeypatch.setattr(linear, "WIDEN_BLOCK_BYTES", 1 << 20)
    monkeypatch.setattr(linear, "_split_parts", lambda N: parts)
    rng = np.random.default_rng(7)
    w, w32 = bf16_weight(rng, 301, 8192, scale=0.01)
    x = rng.standard_normal((linear.GEMV_MAX_ROWS + 9, 8192)).astype(np.float32)
    got = NB.linear(x, w)
    assert got.shape == (linear.GEMV_MAX_ROWS + 9, 301) and rel_err(got, x @ w32.T) <= RTOL


def test_linear_float32_weights_equal_numpy():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 32)).astype(np.float32)
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    np.testing.assert_array_equal(NB.linear(x, w), mlp.linear(x, w))


@pytest.mark.parametrize("shape", [(2, 5, 64), (1, 1, 4, 32)])  # RMSNorm and QK-Norm (per head)
def test_rms_norm_equals_numpy(shape):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    weight = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    assert rel_err(NB.rms_norm(x, weight, 1e-6), norm.rms_norm(x, weight, 1e-6)) <= 1e-6


def test_rope_equals_numpy_on_a_transposed_view():
    rng = np.random.default_rng(4)
    B, T, H, d = 2, 5, 3, 32
    x = rng.standard_normal((B, T, H, d)).astype(np.float32).transpose(0, 2, 1, 3)  # as the model passes it
    positions = np.array([np.arange(T), np.arange(10, 10 + T)])
    cos, sin = rope.rope_cos_sin(positions, rope.default_inv_freq(d, 10000.0))
    before = x.copy()
    np.testing.assert_array_equal(NB.apply_rope(x, cos, sin), rope.apply_rope(x, cos, sin))
    np.testing.assert_array_equal(x, before)  # the input is left alone


@pytest.mark.parametrize("T", [1, 4])  # decode kernel (one query), prefill (NumPy's batched matmuls)
def test_attention_equals_numpy_with_gqa_and_padding(T):
    rng = np.random.default_rng(5)
    B, Hq, Hkv, S, d = 2, 4, 2, 9, 32
    q = rng.standard_normal((B, Hq, T, d)).astype(np.float32)
    cache = rng.standard_normal((2, B, Hkv, 16, d)).astype(np.float32)
    k, v = cache[0][:, :, :S], cache[1][:, :, :S]  # views of a longer KV cache, as the model passes them
    mask = ref_attention.causal_mask(T, S)[None] & np.ones((B, 1, S), bool)
    mask[0, :, :3] = False  # row 0 is left-padded
    got = NB.attention(q, k, v, mask)
    assert got.shape == (B, Hq, T, d)
    assert rel_err(got, ref_attention.attention(q, k, v, mask)) <= RTOL


def test_decode_attention_parallel_path_equals_numpy(monkeypatch):
    # long contexts spread the kv heads over threads: force that path on a small input
    monkeypatch.setattr(numba_attention, "PARALLEL_ATTENTION_BYTES", 0)
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 8, 1, 16)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, 4, 20, 16)).astype(np.float32)
    mask = np.ones((1, 1, 20), bool)
    assert rel_err(NB.attention(q, k, v, mask), ref_attention.attention(q, k, v, mask)) <= RTOL


def test_decode_attention_fully_masked_row_averages_like_numpy():
    # a padding row's query sees no key: the reference gives a uniform average (finfo.min, not -inf), not NaN
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, 2, 5, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 5), bool)
    got = NB.attention(q, k, v, mask)
    assert np.isfinite(got).all()
    assert rel_err(got, ref_attention.attention(q, k, v, mask)) <= RTOL


@pytest.mark.parametrize("rows", [1, 7])  # fused gate·up GEMV with SiLU·mul, and the BLAS path
def test_swiglu_bf16_equals_numpy(rows):
    rng = np.random.default_rng(7 + rows)
    (wg, g32), (wu, u32), (wd, d32) = (bf16_weight(rng, *s) for s in ((192, 128), (192, 128), (128, 192)))
    x = rng.standard_normal((rows, 128)).astype(np.float32)
    assert rel_err(NB.swiglu(x, wg, wu, wd), mlp.swiglu(x, g32, u32, d32)) <= RTOL


def test_fused_swiglu_is_bit_identical_to_two_launches(monkeypatch):
    # decode's SwiGLU as one call of two parallel loops (fewer thread wake-ups) runs the same serial kernels in the
    # same order as the two launches it replaced: the same bits
    rng = np.random.default_rng(9)
    (wg, _), (wu, _), (wd, _) = (bf16_weight(rng, *s) for s in ((192, 128), (192, 128), (128, 192)))
    x = rng.standard_normal((2, 128)).astype(np.float32)
    fused = NB.swiglu(x, wg, wu, wd)
    monkeypatch.setattr(linear, "FUSED_SWIGLU", False)
    assert np.array_equal(fused, NB.swiglu(x, wg, wu, wd))


@pytest.mark.parametrize("tokens", [1, 12])  # decode (few tokens per expert) and prefill (grouped by expert)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_block_bf16_equals_numpy(tokens, norm_topk_prob):
    rng = np.random.default_rng(tokens)
    E, f, d = 8, 48, 64
    router, r32 = bf16_weight(rng, E, d, scale=0.3)
    (wg, g32), (wu, u32), (wd, d32) = (bf16_weight(rng, E, *s, scale=0.2) for s in ((f, d), (f, d), (d, f)))
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    got, got_logits = NB.moe_block(x, router, wg, wu, wd, 2, norm_topk_prob)
    want, want_logits = moe.moe_block(x, r32, g32, u32, d32, 2, norm_topk_prob)
    assert rel_err(got_logits, want_logits) <= RTOL
    assert rel_err(got, want) <= RTOL


# ------------------------------------------------------------------------------------------------ loading


def test_numba_backend_keeps_the_checkpoints_dtype():
    bf16 = tinyqwen.load_model(FIXTURES / "dense-untied-bf16-sharded", backend="numba")
    q = bf16.weights.layers[0].attn.q_proj
    assert isinstance(q, BF16Weight) and q.bits.dtype == np.uint16
    # read into process memory (streamed faster than the file's mapping), one copy: the array owns its bytes
    assert q.bits.flags.writeable and q.bits.flags.owndata
    assert bf16.weights.layers[0].input_norm.dtype == np.float32  # vectors are widened (tiny)
    f32 = tinyqwen.load_model(FIXTURES / "dense-tied", backend="numba")
    q = f32.weights.layers[0].attn.q_proj
    assert q.dtype == np.float32 and not q.flags.writeable  # the read-only memory map, not a copy
    assert f32.weights.lm_head is f32.weights.embed
    # the numpy backend still widens (unchanged numerics)
    ref = tinyqwen.load_model(FIXTURES / "dense-untied-bf16-sharded")
    assert ref.weights.layers[0].attn.q_proj.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(bf16.weights.lm_head), ref.weights.lm_head)


def _write_bf16_checkpoint(path: Path, fixture: str = "dense-tied", **sizes) -> int:
    """A random bf16 checkpoint with `fixture`'s config and `sizes` (default: a dense one of ~6 MB, big enough that
    copies of its weights stand out); returns its bf16 bytes."""
    from tinyqwen.config import expected_tensors, load_config

    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    config.update(sizes or dict(hidden_size=256, intermediate_size=512, vocab_size=4096, head_dim=64))
    config.update(num_hidden_layers=2)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = expected_tensors(load_config(path))
    tensors = {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in shapes.items()}
    save_file(tensors, path / "model.safetensors", bf16=True)
    return sum(2 * t.size for t in tensors.values())


def test_loading_bf16_for_numba_allocates_one_bf16_copy_of_the_weights(tmp_path):
    bf16_bytes = _write_bf16_checkpoint(tmp_path / "ckpt")  # ~6 MB
    peaks = {}
    for name in ("numba", "numpy"):
        tracemalloc.start()  # NumPy reports its allocations to tracemalloc; the memory map is not allocated
        model = tinyqwen.load_model(tmp_path / "ckpt", backend=name)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del model
    assert peaks["numpy"] >= 2 * bf16_bytes  # the measure sees copies: numpy widens every weight to float32
    # numba reads each bf16 tensor into memory once (SafetensorsFile.read): the bf16 bytes plus a small constant,
    # never a widened or a second copy (the file is read, not mapped, so no mapped pages add to it either)
    assert 0.98 * bf16_bytes <= peaks["numba"] <= 1.02 * bf16_bytes + 200_000, (peaks, bf16_bytes)


def test_a_bf16_moe_checkpoint_loads_its_experts_once_and_runs_like_numpy(tmp_path):
    # the experts of a layer are read straight into one stacked bf16 array (no per-expert copy, no file pages)
    path = tmp_path / "moe-bf16"
    sizes = dict(hidden_size=256, moe_intermediate_size=256, vocab_size=2048, head_dim=64)
    bf16_bytes = _write_bf16_checkpoint(path, "moe-norm-topk", **sizes)  # ~6 MB, most of it experts
    tracemalloc.start()
    model = tinyqwen.load_model(path, backend="numba")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0.98 * bf16_bytes <= peak <= 1.02 * bf16_bytes + 200_000, (peak, bf16_bytes)
    gate = model.weights.layers[0].mlp.gate_proj
    assert isinstance(gate, BF16Weight) and gate.bits.flags.owndata and gate.bits.ndim == 3
    ref = tinyqwen.load_model(path)  # numpy: the same bf16 weights, widened
    ids = np.array([[1, 5, 9, 2, 7, 3]])
    assert rel_err(model(ids), ref(ids)) <= RTOL


def test_numba_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    with pytest.raises(BackendError, match="needs the numba package"):
        get_backend("numba")


# ------------------------------------------------------------------------------------------------ whole model


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    path = FIXTURES / request.param
    return tinyqwen.load_model(path, backend="numba"), dict(np.load(path / "reference.npz"))


def test_logits_router_logits_and_aux_loss_match_transformers(fixture):
    model, ref = fixture
    router_logits = assert_logits_match_reference(model, ref)
    if "router_logits" not in ref:
        assert router_logits == [] and not model.config.is_moe
        return
    c = model.config
    aux = tinyqwen.load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok)
    assert abs(aux - float(ref["aux_loss"])) <= tolerance(ref["aux_loss"])


def test_decode_steps_match_transformers(fixture):
    # one token at a time through the KV cache: the GEMV, fused SwiGLU and decode-attention kernels
    model, ref = fixture
    assert_cached_decode_matches_reference(model, ref)


def test_greedy_generations_equal_transformers(fixture):
    model, _ = fixture
    assert_greedy_matches_reference(model)


# ------------------------------------------------------------------------------ prefill attention, exp, bf16 inputs


@pytest.mark.parametrize("block", [3, 128])  # several query blocks (some fully past the padding), and one
def test_prefill_attention_blocks_equal_numpy_with_cache_padding_and_gqa(monkeypatch, block):
    # chunked prefill: T new queries after `past` cached positions, left padding on row 0, 3 queries per kv head
    monkeypatch.setattr(numba_attention, "ATTENTION_BLOCK", block)
    rng = np.random.default_rng(11)
    B, Hq, Hkv, T, past, d = 2, 6, 2, 10, 4, 16
    S = past + T
    q = rng.standard_normal((B, Hq, T, d)).astype(np.float32)
    k, v = rng.standard_normal((2, B, Hkv, S, d)).astype(np.float32)
    mask = ref_attention.causal_mask(T, S)[None] & np.ones((B, 1, S), bool)
    mask[0, :, :7] = False  # row 0: 7 padding keys, so its first 3 queries see nothing (uniform average)
    got = NB.attention(q, k, v, mask)
    assert np.isfinite(got).all()
    assert rel_err(got, ref_attention.attention(q, k, v, mask)) <= RTOL


def test_exp_kernel_is_accurate_and_zero_below_the_float32_range():
    # the vectorisable e^x behind softmax and SiLU: ≤ 2e-7 relative (float32's own np.exp is off by up to 2e-7)
    x = np.concatenate([np.linspace(-87, 88, 200_001), [-1e30, -3.4e38, -88.0]]).astype(np.float32)
    out = np.empty_like(x)
    intrinsics._exp_into(x, out)
    exact = np.exp(x.astype(np.float64))
    inside = x >= -87
    assert np.abs(out[inside] / exact[inside] - 1).max() <= 2e-7
    assert (out[~inside] == 0).all()  # masked scores: exp(MASKED - max) contributes exactly nothing


def test_round_bf16_equals_the_reference_rounding():
    rng = np.random.default_rng(12)
    x = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 100,
            np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -3.4e38, np.inf, -np.inf, 0.0, -0.0]),
            np.array([np.nan, -np.nan]),
        ]
    ).astype(np.float32)[None]
    bits, values = intrinsics.round_bf16(x)
    np.testing.assert_array_equal(bits, float32_to_bf16(x))  # ties to even, overflow to inf, NaN canonical
    np.testing.assert_array_equal(values, bf16_to_float32(bits))


@pytest.mark.parametrize("rows", [1, 9])  # decode GEMV and prefill GEMM (oneDNN when installed)
@pytest.mark.parametrize("with_onednn", [True, False])
def test_medium_precision_linear_is_bf16_inputs_times_bf16_weights(monkeypatch, rows, with_onednn):
    # "medium": the input is rounded to bf16 once; bf16 x bf16 products are exact in float32, so only the order of
    # the float32 sums differs from NumPy on the same rounded numbers: the usual RTOL
    if not with_onednn:
        monkeypatch.setattr(onednn, "available", lambda: False)
    elif onednn.cpu_status() is None:
        unavailable("oneDNN is not installed: pip install -e '.[onednn]' (x86-64 Linux)")
    elif (
        not onednn.available()
    ):  # installed, but this CPU has no bf16 GEMM (AVX2 only): the False case covers it
        pytest.skip(onednn.unavailable_reason())
    medium = get_backend("numba", matmul_precision="medium")
    rng = np.random.default_rng(13 + rows)
    w, w32 = bf16_weight(rng, 300, 256)
    x = rng.standard_normal((rows, 256)).astype(np.float32)
    rounded = bf16_to_float32(float32_to_bf16(x))
    got = medium.linear(x, w)
    assert rel_err(got, rounded @ w32.T) <= RTOL
    assert rel_err(got, x @ w32.T) > 1e-4  # it did round: plain float32 inputs give other numbers


def test_onednn_is_installed_with_the_onednn_extra_on_x86_64_linux():
    import platform

    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the onednn-cpu-gomp wheel exists for x86-64 Linux only")
    if onednn.library() is None:
        unavailable("oneDNN is not installed: pip install -e '.[onednn]' (onednn-cpu-gomp, libdnnl.so.3)")
    a = float32_to_bf16(np.arange(6, dtype=np.float32).reshape(2, 3))
    b = float32_to_bf16(np.arange(12, dtype=np.float32).reshape(4, 3) - 5)
    if onednn.cpu_status() == onednn.UNIMPLEMENTED:  # an AVX2-only CPU: said in one line, never a crash
        assert not onednn.available()
        with pytest.raises(RuntimeError, match="no bf16 GEMM for this CPU"):
            onednn.gemm_bf16(a, b)
        return
    want = bf16_to_float32(a) @ bf16_to_float32(b).T  # small integers: exact in every precision
    np.testing.assert_array_equal(onednn.gemm_bf16(a, b), want)


def test_medium_precision_model_stays_within_bf16_rounding_of_transformers():
    # bf16 fixtures: every activation entering a weight product is rounded to 8 significant bits (2^-9 relative),
    # so the logits move by ~1e-2 of their size on these tiny random models (measured 7.7e-3 and 8.7e-3; the
    # float32 path is at 1e-6). Bound: 3e-2. F32-weight fixtures are untouched by "medium": equal to "highest".
    for name in ("dense-untied-bf16-sharded", "dense-yarn", "dense-tied"):
        ref = np.load(FIXTURES / name / "reference.npz")
        high = tinyqwen.load_model(FIXTURES / name, backend="numba")
        medium = tinyqwen.load_model(FIXTURES / name, backend="numba", matmul_precision="medium")
        got = medium(ref["input_ids"])
        err = rel_err(got, ref["logits"].reshape(got.shape))
        if name == "dense-tied":  # float32 weights
            np.testing.assert_array_equal(got, high(ref["input_ids"]))
        else:
            assert 1e-4 < err <= 3e-2, f"{name}: {err:.2e}"


def test_medium_batched_steps_on_vdpbf16ps_stay_within_bf16_rounding_of_highest(monkeypatch):
    # a batch of 5 rows: the 8-token prompts (40 rows) and the decode steps after them go through the batched
    # products (2 to GEMV_MAX_ROWS rows), which "medium" runs on vdpbf16ps tiles where the CPU has AVX512-BF16
    from tinyqwen.backends.numba import decode_tiles

    if not decode_tiles.DPBF16_TILES:
        pytest.skip("the vdpbf16ps tiles need AVX-512 and AVX512-BF16 in Numba's target (the CPU lacks them)")
    monkeypatch.setattr(linear, "BATCH_PANELS", False)  # (off by default: the tiles)
    path = FIXTURES / "dense-untied-bf16-sharded"  # bf16 weights, hidden 64, ffn 128: K = 64 and 128 fit
    high = tinyqwen.load_model(path, backend="numba")
    medium = tinyqwen.load_model(path, backend="numba", matmul_precision="medium")
    rng = np.random.default_rng(21)
    prompt, fed = rng.integers(0, 512, (5, 8)), rng.integers(0, 512, (3, 5, 1))

    def run(model) -> np.ndarray:  # [4, 5, vocab]: the prompt's last logits, then each step's
        cache = model.new_cache(5, 16)
        out = [model.forward(prompt, cache=cache, last_only=True).logits[:, -1]]
        out += [model.forward(ids, cache=cache, last_only=True).logits[:, -1] for ids in fed]
        return np.asarray(out, np.float64)

    want, got = run(high), run(medium)
    monkeypatch.setattr(linear, "BATCH_DPBF16", False)  # medium's other road: x rounded, the float32 tiles
    other = run(medium)
    scale = np.abs(want).max()
    # inputs rounded to bf16: ~1e-2 of the logits' size (the bound of the test above: 3e-2); against the other
    # medium road: the float32 sums' order, and the h it moves to a neighbouring bf16 (measured 9.6e-3, 1.0e-3)
    assert 1e-4 < np.abs(got - want).max() <= 3e-2 * scale
    assert 0 < np.abs(got - other).max() <= 1e-2 * scale  # (not 0: another kernel ran)
    top2 = np.sort(want, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * 3e-2 * scale  # where the margin allows: the same arg-max
    assert clear.sum() >= 5 and (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_matmul_precision_errors_are_one_clear_line():
    with pytest.raises(BackendError, match="numpy backend is the float32 reference"):
        get_backend("numpy", matmul_precision="medium")
    with pytest.raises(BackendError, match="matmul_precision must be one of highest, medium"):
        get_backend("numba", matmul_precision="low")


def test_decode_attention_reads_the_whole_cache_without_copying_it():
    # the model passes cache[:, :, :S] views; the kernel gets the whole contiguous cache (no copy), same result
    rng = np.random.default_rng(14)
    keys, values = (
        rng.standard_normal((2, 4, 40, 16)).astype(np.float32) for _ in range(2)
    )  # as KVCache has
    k, v = keys[:, :, :25], values[:, :, :25]
    assert numba_attention._whole_cache(k) is keys
    q = rng.standard_normal((2, 8, 1, 16)).astype(np.float32)
    mask = np.ones((2, 1, 25), bool)
    mask[1, :, :5] = False
    assert rel_err(NB.attention(q, k, v, mask), ref_attention.attention(q, k, v, mask)) <= RTOL


@pytest.mark.parametrize("rows", [1, 6])  # one fused GEMV over q, k, v; more tokens: one product per weight
def test_linear_many_equals_one_product_per_weight(rows):
    rng = np.random.default_rng(15 + rows)
    (wq, q32), (wk, k32), (wv, v32) = (bf16_weight(rng, n, 64) for n in (96, 32, 32))
    x = rng.standard_normal((1, rows, 64)).astype(np.float32)
    got = NB.linear_many(x, (wq, wk, wv))
    for g, w32 in zip(got, (q32, k32, v32), strict=True):
        assert g.shape == (1, rows, w32.shape[0]) and rel_err(g, mlp.linear(x, w32)) <= RTOL
    numpy = get_backend("numpy")  # no fused kernel: linear_many falls back to its own linear, one at a time
    assert numpy.linears is None
    assert all(
        rel_err(a, b) == 0
        for a, b in zip(numpy.linear_many(x, (q32, k32)), (x @ q32.T, x @ k32.T), strict=True)
    )


@pytest.mark.parametrize("K", [256, 200])
def test_medium_decode_kernels_equal_bf16_rounded_products(K):
    # the medium decode GEMVs multiply bf16-rounded inputs by bf16 weights (exact products, float32 sums): the same
    # numbers as NumPy on the rounded input, up to summation order
    medium = get_backend("numba", matmul_precision="medium")
    rng = np.random.default_rng(16 + K)
    (wq, q32), (wk, k32), (wg, g32), (wu, u32), (wd, d32) = (
        bf16_weight(rng, *s) for s in ((96, K), (32, K), (64, K), (64, K), (K, 64))
    )
    x = rng.standard_normal((1, 1, K)).astype(np.float32)
    r = bf16_to_float32(float32_to_bf16(x))
    q, k = medium.linear_many(x, (wq, wk))
    assert rel_err(q, r @ q32.T) <= RTOL and rel_err(k, r @ k32.T) <= RTOL
    h = mlp.silu(r @ g32.T) * (r @ u32.T)
    want = bf16_to_float32(float32_to_bf16(h)) @ d32.T  # the hidden activations are rounded too
    assert rel_err(medium.swiglu(x, wg, wu, wd), want) <= RTOL


# ------------------------------------------------------------------------------------------ fused decode layer


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_decode_layer_is_bit_identical_to_kernel_by_kernel(tmp_path, kv_dtype, qk_norm):
    # decode steps of a bf16 model, one left-padded row, through the one-call layer and kernel by kernel:
    # the same serial kernels in the same order, so the logits and the cache contents are equal bit for bit
    from dataclasses import replace

    _write_bf16_checkpoint(tmp_path / "ckpt", num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                           vocab_size=4096, head_dim=64, qk_norm=qk_norm)  # fmt: skip
    fused = tinyqwen.load_model(tmp_path / "ckpt", backend="numba")
    assert fused.backend.decode_layer is not None and fused.config.qk_norm == qk_norm
    fused.backend = replace(fused.backend, decode_step=None)  # layer by layer (the whole step: its own test)
    plain = replace(fused, backend=replace(fused.backend, decode_layer=None))
    calls = []
    layer_fn = fused.backend.decode_layer
    fused.backend = replace(fused.backend, decode_layer=lambda *a: calls.append(layer_fn(*a)) or calls[-1])
    ids = np.array([[0, 0, 42, 7, 8]])
    mask = np.array([[0, 0, 1, 1, 1]])
    logits, caches = {}, {}
    for name, model in (("fused", fused), ("plain", plain)):
        cache = model.new_cache(1, 12, kv_dtype)
        steps = [model.forward(ids, cache=cache, attention_mask=mask, last_only=True).logits]
        for t in range(4):
            step_mask = np.concatenate([mask, np.ones((1, t + 1), int)], axis=1)
            nxt = steps[-1][:, -1].argmax(-1)[:, None]
            steps.append(model.forward(nxt, cache=cache, attention_mask=step_mask, last_only=True).logits)
        logits[name], caches[name] = np.stack(steps), cache
    assert sum(c is not None for c in calls) == 4 * 2  # every decode step's layers took the fused path
    assert calls[0] is None  # (the prompt's did not: T > 1)
    assert np.array_equal(logits["fused"], logits["plain"])
    f, p = caches["fused"], caches["plain"]
    for a, b in zip(f.keys + f.values, p.keys + p.values, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("threads, workers", [(1, 1), (2, 2), (2, 5), (1, 3)])
def test_one_region_decode_layer_equals_five_loops_with_any_thread_count(
    tmp_path, monkeypatch, threads, workers
):
    # the layer as ONE parallel region (threads claim chunks of each phase, decode_layer.ONE_REGION) against the
    # layer of five `prange` loops: the same serial kernels on the same rows, so equal bits; with more region
    # iterations than threads (a thread runs two in turn: no wait may depend on the other) and with one thread
    from tinyqwen.backends.numba import decode_layer, decode_step

    _write_bf16_checkpoint(tmp_path / "ckpt", num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                           vocab_size=4096, head_dim=64)  # fmt: skip
    model = tinyqwen.load_model(tmp_path / "ckpt", backend="numba")
    monkeypatch.setattr(decode_step, "WHOLE_STEP", False)  # layer by layer (the whole step: its own test)
    monkeypatch.setattr(decode_layer, "_workers", lambda: workers)
    logits = {}
    with numba_threads(threads):
        for region in (True, False):
            monkeypatch.setattr(decode_layer, "ONE_REGION", region)
            logits[region] = greedy_logits(model, np.array([[5, 9, 2]]), model.new_cache(1, 12, "bfloat16"))
    assert np.array_equal(logits[True], logits[False])


@pytest.mark.parametrize(
    "kv_dtype, threads, workers", [("bfloat16", 2, 2), ("float32", 1, 1), ("bfloat16", 2, 5)]
)
def test_whole_decode_step_is_bit_identical_to_layer_by_layer_and_kernel_by_kernel(
    tmp_path, monkeypatch, kv_dtype, threads, workers
):
    # the whole step in ONE parallel region (decode_step.py: every layer's phases, the final norm, the lm_head's
    # rows) against one call per layer and against kernel by kernel: the same serial kernels on the same rows, so
    # equal logits and caches, bit for bit; with one thread, and with more region iterations than threads
    _write_bf16_checkpoint(tmp_path / "ckpt", num_hidden_layers=3, hidden_size=256, intermediate_size=512,
                           vocab_size=4096, head_dim=64)  # fmt: skip
    model = tinyqwen.load_model(tmp_path / "ckpt", backend="numba")
    assert_whole_step_is_bit_identical(model, np.array([[5, 9, 2]]), monkeypatch, threads, workers, kv_dtype)


def test_whole_decode_step_declines_what_it_does_not_cover(tmp_path, monkeypatch):
    # a prompt, a batch, a float16 cache, no cache, the switches off: None (layer by layer)
    from tinyqwen.backends.numba import decode_layer, decode_step

    _write_bf16_checkpoint(tmp_path / "ckpt")
    model = tinyqwen.load_model(tmp_path / "ckpt", backend="numba")
    c, w = model.config, model.weights
    x = np.zeros((1, 1, c.hidden_size), np.float32)
    cos = sin = np.ones((1, 1, c.head_dim), np.float32)
    mask = np.ones((1, 1, 1), bool)
    f32 = model.new_cache(1, 4, "float32")
    step = decode_step.decode_step
    assert step(x, w, cos, sin, mask, model.new_cache(1, 4, "float16"), c) is None
    assert step(x, w, cos, sin, mask, None, c) is None
    # "medium" on a lone row: the same float32 step (memory-bound: bf16 products would buy nothing)
    want = step(x, w, cos, sin, mask, model.new_cache(1, 4, "float32"), c)
    np.testing.assert_array_equal(step(x, w, cos, sin, mask, f32, c, bf16_inputs=True), want)
    x2 = np.zeros((1, 2, c.hidden_size), np.float32)
    assert step(x2, w, cos, sin, np.ones((1, 2, 2), bool), f32, c) is None
    rows = np.zeros((2, 1, c.hidden_size), np.float32)
    assert step(rows, w, cos, sin, np.ones((2, 1, 1), bool), model.new_cache(2, 4, "float32"), c) is None
    assert step(x, w, cos, sin, mask, f32, c).shape == (1, 1, c.vocab_size)
    assert f32.length == 0  # the model advances the cache, not the step
    monkeypatch.setattr(decode_step, "WHOLE_STEP", False)
    assert step(x, w, cos, sin, mask, f32, c) is None
    monkeypatch.setattr(decode_step, "WHOLE_STEP", True)
    monkeypatch.setattr(decode_layer, "ONE_REGION", False)  # the A/B switch: five loops per layer
    assert step(x, w, cos, sin, mask, f32, c) is None


def test_whole_decode_step_sees_a_weight_swapped_in_place(tmp_path):
    # the step keeps its per-layer Lists between calls: a weight replaced in the model (a learner's own, a
    # chapter's experiment) must reach it, as the layer-by-layer path sees it
    from dataclasses import replace

    _write_bf16_checkpoint(tmp_path / "ckpt")
    model = tinyqwen.load_model(tmp_path / "ckpt", backend="numba")
    whole = model.backend

    def step_logits(backend):
        model.backend = backend
        cache = model.new_cache(1, 4, "bfloat16")
        model.forward(np.array([[5, 9]]), cache=cache)
        return model.forward(np.array([[3]]), cache=cache).logits

    before = step_logits(whole)
    mlp = model.weights.layers[1].mlp
    mlp.down_proj = BF16Weight(np.zeros_like(mlp.down_proj.bits))  # the layer's MLP now adds nothing
    after = step_logits(whole)
    assert not np.array_equal(before, after)
    assert np.array_equal(after, step_logits(replace(whole, decode_step=None)))


def test_a_bf16_gguf_and_its_safetensors_checkpoint_load_the_same_fast_layout(tmp_path):
    # the same bf16 weights from a safetensors checkpoint and from a bf16 GGUF file: the numba backend must hold
    # them alike (bf16 bits in memory, C-contiguous, one Numba type per kind, the lm_head the embedding when
    # tied), so both decode through the whole-step kernel; the logits are then equal bit for bit
    from tinyqwen.backends.numba import decode_step
    from tinyqwen.quantize import quantize_checkpoint

    _write_bf16_checkpoint(tmp_path / "ckpt")
    quantize_checkpoint(tmp_path / "ckpt", "bf16", tmp_path / "m-bf16.gguf")
    models = {
        "safetensors": tinyqwen.load_model(tmp_path / "ckpt", backend="numba"),
        "gguf": tinyqwen.load_model(tmp_path / "m-bf16.gguf", backend="numba"),
    }

    def layout(model):
        w = model.weights
        mats = [w.embed, w.lm_head] + [
            m
            for ly in w.layers
            for m in (
                ly.attn.q_proj,
                ly.attn.k_proj,
                ly.attn.v_proj,
                ly.attn.o_proj,
                ly.mlp.gate_proj,
                ly.mlp.up_proj,
                ly.mlp.down_proj,
            )  # fmt: skip
        ]
        assert all(isinstance(m, BF16Weight) and m.bits.flags.c_contiguous for m in mats)
        return [(m.bits.dtype, m.bits.shape, m.bits.flags.writeable) for m in mats], w.lm_head is w.embed

    assert layout(models["safetensors"]) == layout(models["gguf"])
    assert layout(models["gguf"])[1]  # tied: one array, read once per step as the lm_head
    logits = {}
    for name, model in models.items():
        assert decode_step._Plan(model.weights).ok, name  # the whole step applies to both
        logits[name] = greedy_logits(model, np.array([[3, 1, 4]]), model.new_cache(1, 8, "bfloat16"), steps=2)
    assert np.array_equal(logits["safetensors"], logits["gguf"])


def test_fused_decode_layer_declines_what_it_does_not_cover(tmp_path):
    # a prompt, a batch, a float16 cache, no cache, and medium precision: None, so the model runs kernel by kernel
    from tinyqwen.backends.numba import decode_layer

    _write_bf16_checkpoint(tmp_path / "ckpt")
    model = tinyqwen.load_model(tmp_path / "ckpt", backend="numba")
    c, layer = model.config, model.weights.layers[0]
    x = np.zeros((1, 1, c.hidden_size), np.float32)
    cos = sin = np.ones((1, 1, c.head_dim), np.float32)
    mask = np.ones((1, 1, 1), bool)
    f16 = model.new_cache(1, 4, "float16")
    f32 = model.new_cache(1, 4, "float32")
    assert decode_layer.decode_layer(x, layer, cos, sin, mask, f16, 0, c) is None
    assert decode_layer.decode_layer(x, layer, cos, sin, mask, None, 0, c) is None
    assert decode_layer.decode_layer(x, layer, cos, sin, mask, f32, 0, c, bf16_inputs=True) is None
    x2 = np.zeros((1, 2, c.hidden_size), np.float32)
    assert decode_layer.decode_layer(x2, layer, cos, sin, np.ones((1, 2, 2), bool), f32, 0, c) is None
    rows = np.zeros((2, 1, c.hidden_size), np.float32)  # a batch: linear.py's multi-row kernels
    batch_cache = model.new_cache(2, 4, "float32")
    assert (
        decode_layer.decode_layer(rows, layer, cos, sin, np.ones((2, 1, 1), bool), batch_cache, 0, c) is None
    )
    assert decode_layer.decode_layer(x, layer, cos, sin, mask, f32, 0, c).shape == (1, 1, c.hidden_size)
