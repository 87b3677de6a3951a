"""The cupy backend with every CUDA kernel run for real, on the CPU executor (tests/cuda_executor): no GPU needed.

`CudaKernels(xp=device, module=RawModule)`: the backend's own launch code, the kernels' C sources compiled by g++
against cuda_cpu.h, device arrays that refuse to mix with host arrays. Checked here:
- the whole model on every fixture against transformers' stored logits (prefill, cached decode, greedy
  generations), a long prompt through the blockwise path (tests/data/long-yarn), every KV cache dtype;
- the seven bugs this executor found, each with the test that failed before its fix;
- NaN inputs and shapes at the kernels' edges (rows not a multiple of the block, partial warps, M > 8 for the GEMV,
  Qwen's 151,936-id vocabulary), in forward, reverse and seeded random thread orders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_cached_decode_matches_reference,
    assert_greedy_matches_reference,
    assert_logits_match_reference,
)
from cuda_executor import device, executor_kernels

import tinyqwen
from tinyqwen import moe
from tinyqwen.backends import cupy as cupy_backend
from tinyqwen.backends.cupy import NumpyTwins, make_backend
from tinyqwen.checkpoint import Checkpoint
from tinyqwen.config import load_config, load_generation_config
from tinyqwen.model import Qwen3, load_weights

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
NAMES = ["dense-tied", "dense-untied-bf16-sharded", "dense-yarn", "moe-norm-topk", "moe-sparse-step"]
TWINS = NumpyTwins()
OPS = executor_kernels()  # one compile of each source per process (and cached across runs by content hash)


def load(path: Path, ops=OPS) -> Qwen3:
    backend = make_backend(ops, name="cupy-executor")
    config = load_config(path)
    with Checkpoint(path) as checkpoint:
        weights = load_weights(checkpoint, config, backend.prepare, keep_bf16=backend.options.keep_bf16)
    return Qwen3(config, weights, backend, load_generation_config(path), path)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


# ------------------------------------------------------------------------------------------ the whole model


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    path = FIXTURES / request.param
    return load(path), dict(np.load(path / "reference.npz"))


def test_logits_and_router_logits_match_transformers(fixture):
    model, ref = fixture
    assert_logits_match_reference(model, ref)


def test_cached_decode_matches_transformers(fixture):
    model, ref = fixture
    assert_cached_decode_matches_reference(model, ref)


def test_greedy_generations_equal_transformers(fixture):
    model, _ = fixture
    assert_greedy_matches_reference(model)


# ------------------------------------------------------------------------------------------ the seven bugs


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "float16"])
def test_every_kv_cache_dtype_gives_the_numpy_backends_tokens(kv_dtype):
    # bug 1: the attention kernels' strides assumed 4-byte items and prefill multiplied raw bf16 bits; fp16 gave
    # [426, 417, 417, 199, ...] and bf16 [436, 472, ...] where the numpy backend gives [426, 426, 73, 73, ...]
    model = load(FIXTURES / "dense-tied")
    want = tinyqwen.generate(tinyqwen.load_model(FIXTURES / "dense-tied"), [5, 6, 7, 8], 8, kv_dtype=kv_dtype)
    assert tinyqwen.generate(model, [5, 6, 7, 8], 8, kv_dtype=kv_dtype) == want


@pytest.mark.slow
def test_a_long_prompt_takes_the_blockwise_path_on_the_device():
    # bug 2: prompt x keys >= 1,048,576 made the model call the NumPy blockwise_attention on device arrays (TypeError)
    path = REPO / "tests" / "data" / "long-yarn"
    ref = np.load(path / "reference.npz")
    ids = ref["input_ids"][:1100]
    at = ref["positions"][ref["positions"] < 1100]
    got = load(path)(ids)[at]
    want = tinyqwen.load_model(path)(ids)[at]
    assert at.size and rel(got, want) <= 1e-5


def test_sample_rows_twin_sums_as_the_kernel_does():
    # bug 3: the twin summed 151,936 probabilities in one float32 running sum, the kernel in 256 chunks: 17-35 % of
    # full-vocabulary draws picked another id
    r = np.random.default_rng(5)
    big = (r.standard_normal((4, 151_936)) * 3).astype(np.float32)
    u = r.random(4).astype(np.float32)
    for temperature in (0.6, 1.0, 1.7):
        for shift in np.linspace(0, 0.9, 8):
            uu = ((u + shift) % 1).astype(np.float32)
            got = OPS.sample(device.asarray(big), temperature, device.asarray(uu)).get()
            assert got.tolist() == TWINS.sample(big, temperature, uu).tolist(), (temperature, shift)


def test_nan_router_logits_choose_real_experts():
    # bug 4: NaN router logits made moe_route return expert -1, and the expert GEMV then read before its weights
    logits = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
    logits[1, 3] = np.nan
    logits[3] = np.nan
    weights, experts = OPS.route(device.asarray(logits), 2, True)
    want_w, want_e = moe.route(logits, 2, True)
    assert (
        experts.get().tolist() == want_e.tolist()
    )  # the reference's stable order: experts 0, 1 for a NaN row
    assert np.isnan(weights.get()[[1, 3]]).all() and not np.isnan(weights.get()[[0, 2, 4]]).any()
    bits = np.random.default_rng(3).integers(0, 1 << 14, (8, 16, 32), dtype=np.uint16)  # finite weights
    xs = np.ones((10, 32), np.float32)
    out = OPS.expert_gemv(device.asarray(xs), experts.reshape(-1), device.asarray(bits)).get()
    assert np.isfinite(out).all()


def test_argmax_rows_treats_nan_as_np_argmax():
    # bug 5: argmax_rows skipped NaN ([639, 3, 522] where np.argmax gives [10, 500, 256])
    logits = np.random.default_rng(4).standard_normal((4, 1000)).astype(np.float32)
    logits[0, [10, 20]] = np.nan
    logits[1, 500] = np.nan
    logits[2, [256, 3]] = [np.nan, np.inf]
    logits[3, 999] = np.nan  # the last id, in the last thread's stride
    assert OPS.argmax(device.asarray(logits)).get().tolist() == np.argmax(logits, -1).tolist()


@pytest.mark.parametrize("M", [1, 7, 8, 9, 17, 64])
def test_gemv_bf16_computes_every_row(M):
    # bug 6: gemv_bf16 computed only the first 8 rows; rows 8 and up were left as they were
    r = np.random.default_rng(M)
    bits = r.integers(0, 1 << 16, (70, 200), dtype=np.uint16) & 0xBFFF  # N = 70: a partial last block
    x = r.standard_normal((M, 200), dtype=np.float32)
    got = OPS.gemv_bf16(device.asarray(x), device.asarray(bits)).get()
    assert rel(got, TWINS.gemv_bf16(x, bits)) <= 1e-5


class TopDraws:
    """A generator (on `xp`) whose every draw is the largest its dtype can give: float64's 1 - 2^-53 rounds to 1.0 in
    float32, while a float32 draw (24 bits, as NumPy and CuPy make them) is at most 1 - 2^-24."""

    def __init__(self, xp):
        self.xp = xp

    def random(self, n, dtype=np.float64):
        return self.xp.asarray(
            np.full(n, 1 - 2.0**-53 if np.dtype(dtype) == np.float64 else 1 - 2.0**-24, dtype)
        )


@pytest.mark.parametrize("ops", [TWINS, OPS], ids=["twins", "executor"])
def test_uniform_numbers_stay_below_one(ops):
    # bug 7: uniform() rounded a float64 draw to float32 (u = 1.0 about 3e-8 of the time): sampling then returned the
    # last id whatever its probability
    u = ops.uniform(TopDraws(ops.xp), 3)
    assert (ops.to_numpy(u) < 1).all()
    logits = np.zeros((3, 300), np.float32)
    logits[:, -1] = -1e4  # the last id: probability 0
    ids = cupy_backend.next_token(ops, ops.xp.asarray(logits), 1.0, TopDraws(ops.xp))
    assert (ops.to_numpy(ids) == 298).all()


# ------------------------------------------------------------------------------------------ edges


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_kernels_at_edge_shapes_in_every_thread_order(order):
    ops = executor_kernels(order=order, seed=11)
    r = np.random.default_rng(9)
    for d in (1, 33, 100, 257):  # rows shorter than a warp, partial warps, not a multiple of the block
        x = r.standard_normal((3, d), dtype=np.float32)
        w = r.standard_normal(d, dtype=np.float32)
        assert (
            rel(ops.rms_norm(device.asarray(x), device.asarray(w), 1e-6).get(), TWINS.rms_norm(x, w, 1e-6))
            <= 1e-6
        )
    g, u = r.standard_normal((2, 333), dtype=np.float32)
    assert rel(ops.silu_mul(device.asarray(g), device.asarray(u)).get(), TWINS.silu_mul(g, u)) <= 1e-6
    logits = r.standard_normal((3, 1001)).astype(np.float32)
    assert ops.argmax(device.asarray(logits)).get().tolist() == TWINS.argmax(logits).tolist()
    y, wts = r.standard_normal((6, 77), dtype=np.float32), r.random((3, 2)).astype(np.float32)
    assert rel(ops.combine(device.asarray(y), device.asarray(wts)).get(), TWINS.combine(y, wts)) <= 1e-6
    q = r.standard_normal((1, 4, 40), dtype=np.float32)  # d = 40: a partial warp of threads
    kv = r.standard_normal((2, 1, 2, 9, 40), dtype=np.float32)
    mask = np.ones((1, 5), bool)
    mask[0, 0] = False
    got = ops.decode_attention(device.asarray(q), device.asarray(kv[0])[:, :, :5], device.asarray(kv[1])[:, :, :5],
                               device.asarray(mask)).get()  # fmt: skip
    assert rel(got, TWINS.decode_attention(q, kv[0][:, :, :5], kv[1][:, :, :5], mask)) <= 1e-6


def test_nan_logits_in_the_device_sampler_are_flagged():
    logits = np.zeros((2, 151_936), np.float32)
    logits[1, 77] = np.nan
    seen, counts = np.zeros((2, 151_936), np.uint8), np.zeros((2, 151_936), np.int32)
    x, bad = OPS.penalize(
        device.asarray(logits), device.asarray(seen), device.asarray(counts), 1.0, 0.0, 0.0, 1.0
    )
    assert bad.get().tolist() == [0, 1]
    ids = OPS.filter_sample(x, 0, 1.0, 0.0, False, np.array([0.5, 0.5]), np.array([-1, -1]), bad,
                            device.asarray(seen), device.asarray(counts))  # fmt: skip
    assert ids.get().tolist()[1] == -1 and 0 <= ids.get().tolist()[0] < 151_936
