"""The "cupy" backend, checked as far as a machine without a GPU can, and on the GPU where there is one.

Without a GPU (CI, every machine this project has):
- every CUDA source in backends/cuda/ compiles with NVRTC for compute_80 (A100) and compute_90 (H100/H200) and
  defines every kernel the backend launches; a broken kernel fails with NVRTC's log;
- each kernel's NumPy twin (`NumpyTwins`, the kernel's arithmetic in NumPy) equals tinyqwen's reference function:
  rms_norm, apply_rope, decode attention and SiLU·mul to ≤ 1e-6 relative (the same sums, in another order);
  routing, arg-max and sampling exactly (ids);
- the backend's whole orchestration (`make_backend(NumpyTwins())`: bf16 weights kept as bits, the KV cache in the
  backend's arrays, the GEMV/cuBLAS split, MoE grouping, device sampling) against transformers' stored outputs on
  every fixture, at `tolerance(ref)` = 1e-5 of the logits' size — the project's bar, 10x inside the issue's 1e-4
  (fp32) / 1e-3 (bf16); measured ≤ 1.5e-6 — and greedy generations identical to generate.json;
- `backend="cupy"` without a usable GPU is one clear line.
With a GPU (tests marked `gpu`, skipped and reported as skipped elsewhere): the real kernels against their twins,
and the whole model against transformers at the issue's 1e-4 / 1e-3 (GPU sums run in another order and use
CUDA's expf). None of this has run on a GPU yet: no GPU was available when it was written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyqwen
from backends import cupy_backend, get_backend
from backends.cupy_backend import KERNEL_DIR, KERNELS, NumpyTwins
from tinyqwen import attention as ref_attention
from tinyqwen import moe, norm, rope
from tinyqwen.config import load_config, load_generation_config
from tinyqwen.errors import BackendError, GenerationError
from tinyqwen.mlp import silu
from tinyqwen.model import Qwen3, load_weights
from tinyqwen.safetensors import Checkpoint
from tinyqwen.verify import tolerance

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
NAMES = ["dense-tied", "dense-untied-bf16-sharded", "dense-yarn", "moe-norm-topk", "moe-sparse-step"]
TWINS = NumpyTwins()

pytest.importorskip("cupy", reason="the gpu extra (CuPy, NVRTC, CUDA headers) is not installed")
NO_GPU = cupy_backend.gpu_unavailable_reason()
gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"no GPU here: {NO_GPU}")


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def load(path: Path, backend) -> Qwen3:
    """tinyqwen.load_model, with a Backend object instead of a name (the stand-in is not a named backend)."""
    config = load_config(path)
    with Checkpoint(path) as checkpoint:
        weights = load_weights(checkpoint, config, backend.prepare, keep_bf16=backend.keep_bf16)
    return Qwen3(config, weights, backend, load_generation_config(path), path)


# ------------------------------------------------------------------------------------------ compiling


def test_every_source_is_listed():
    assert sorted(p.name for p in KERNEL_DIR.glob("*.cu")) == sorted(KERNELS)


@pytest.mark.parametrize("arch", cupy_backend.ARCHITECTURES)
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_kernels_compile_with_nvrtc(source, arch):
    ptx = cupy_backend.compile_ptx(KERNEL_DIR / source, arch)
    target = arch.replace("compute_", "sm_")
    assert f".target {target}" in ptx
    for name in KERNELS[source]:
        assert f".entry {name}(" in ptx, f"{source} defines no kernel {name}"
    assert ".local" not in ptx, f"{source} spills to local memory"


def test_a_broken_kernel_fails_with_nvrtcs_log():
    broken = (KERNEL_DIR / "norm.cu").read_text().replace("ss += row[j] * row[j];", "ss += row[j] * row[j]")
    with pytest.raises(BackendError, match=r"norm\.cu does not compile for compute_80: .*error"):
        cupy_backend.compile_ptx(broken, "compute_80", name="norm.cu")


def _ptx_params() -> dict[str, list[str]]:
    """{kernel: PTX types of its parameters} for every kernel, from the compute_90 PTX."""
    import re

    params = {}
    for source in KERNELS:
        ptx = cupy_backend.compile_ptx(KERNEL_DIR / source, "compute_90")
        for name, body in re.findall(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S):
            params[name] = re.findall(r"\.param\s+\.(\w+)", body)
    return params


def test_every_launch_matches_its_kernels_parameters():
    """CudaKernels' launches (run here with NumPy arrays in place of CuPy's) pass what each kernel's PTX expects.

    A kernel launch only checks its arguments on the GPU, so this is the CPU's chance to catch a missing, extra or
    mistyped argument: arrays are pointers (.u64), np.int32 .u32, np.int64 .u64, np.float32 .f32. It also checks the
    launch shapes: a multiple of 32 threads, at most 1,024, enough threads for the work.
    """
    params = _ptx_params()
    launched = []

    def kind(a) -> str:
        if isinstance(a, np.ndarray):
            return "u64"
        return {np.int32: "u32", np.int64: "u64", np.float32: "f32"}[type(a)]

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args, shared_mem=0):
            assert [kind(a) for a in args] == params[self.name], self.name
            assert block[0] % 32 == 0 and 32 <= block[0] <= 1024 and grid[0] >= 1, (self.name, grid, block)
            launched.append(self.name)

    fake = object.__new__(cupy_backend.CudaKernels)  # no CuPy, no GPU: NumPy arrays, recorded launches
    fake.xp = np
    fake._kernel = Recorder
    r = np.random.default_rng(0)
    f32 = lambda *shape: r.standard_normal(shape).astype(np.float32)  # noqa: E731
    bits = r.integers(0, 1 << 15, (40, 64), dtype=np.uint16)
    fake.rms_norm(f32(3, 64), f32(64), 1e-6)
    fake.rope(f32(2, 4, 3, 16), f32(2, 3, 16), f32(2, 3, 16))
    cache = f32(2, 2, 10, 16)
    fake.decode_attention(f32(2, 4, 16), cache[:, :, :7], cache[:, :, :7], np.ones((2, 7), bool))
    fake.silu_mul(f32(3, 8), f32(3, 8))
    fake.widen(bits)
    fake.embed(bits, np.array([1, 2]))
    fake.embed(f32(40, 64), np.array([1, 2]))
    fake.gemv_bf16(f32(3, 64), bits)
    fake.route(f32(4, 8), 2, True)
    fake.gather_rows(f32(4, 64), np.array([0, 0, 1], np.int32))
    fake.expert_gemv(f32(3, 64), np.array([0, 1, 1], np.int32), bits.reshape(2, 20, 64))
    fake.expert_gemv(f32(3, 64), np.array([0, 1, 1], np.int32), f32(2, 20, 64))
    fake.combine(f32(6, 16), f32(3, 2))
    fake.argmax(f32(2, 100))
    fake.sample(f32(2, 100), 0.7, np.array([0.5, 0.1], np.float32))
    assert sorted(set(launched)) == sorted(params), "every kernel of backends/cuda is launched by CudaKernels"


# ------------------------------------------------------------------------------------------ the twins


def test_docstring_examples():
    import doctest

    assert doctest.testmod(cupy_backend, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_twins_equal_the_reference_functions():
    r = np.random.default_rng(0)
    x = r.standard_normal((6, 64), dtype=np.float32) * 3
    w = r.standard_normal(64, dtype=np.float32)
    assert rel(TWINS.rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6)) <= 1e-6

    q = r.standard_normal((2, 4, 5, 16), dtype=np.float32)
    cos, sin = rope.rope_cos_sin(np.arange(10).reshape(2, 5), rope.default_inv_freq(16, 1e4), 1.0)
    assert np.array_equal(TWINS.rope(q, cos, sin), rope.apply_rope(q, cos, sin))

    k = r.standard_normal((2, 2, 9, 16), dtype=np.float32)
    v = r.standard_normal((2, 2, 9, 16), dtype=np.float32)
    mask = np.ones((2, 9), bool)
    mask[0, :3] = False  # left padding in row 0
    want = ref_attention.attention(q[:, :, :1], k, v, mask[:, None])[:, :, 0]
    assert rel(TWINS.decode_attention(np.ascontiguousarray(q[:, :, 0]), k, v, mask), want) <= 1e-6

    g, u = r.standard_normal((2, 2, 30), dtype=np.float32) * 10
    assert rel(TWINS.silu_mul(g, u), silu(g) * u) <= 1e-6


def test_route_twin_equals_reference_routing_ties_included():
    logits = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float32)
    logits[0] = 0.0  # all tied: the lowest indices win
    for renormalise in (True, False):
        w, e = TWINS.route(logits, 3, renormalise)
        want_w, want_e = moe.route(logits, 3, renormalise)
        assert np.array_equal(e, want_e) and rel(w, want_w) <= 1e-6
    assert TWINS.route(logits, 2, True)[1][0].tolist() == [0, 1]


def test_sampling_twins():
    logits = np.array([[2.0, 5.0, 5.0, -1.0]], np.float32)
    assert TWINS.argmax(logits).tolist() == [1]  # ties: the lowest id, as np.argmax and tinyqwen's greedy
    # inverse CDF by hand: probabilities [0.1, 0.2, 0.7] -> u below 0.1 gives 0, below 0.3 gives 1, else 2
    three = np.log(np.array([[0.1, 0.2, 0.7]], np.float32))
    for u, want in ((0.05, 0), (0.15, 1), (0.29, 1), (0.31, 2), (0.99, 2)):
        assert TWINS.sample(three, 1.0, np.array([u], np.float32)).tolist() == [want], u
    # temperature 0.5 squares the probabilities before renormalising: [1, 4, 49] / 54
    for u, want in ((1 / 54 - 1e-3, 0), (5 / 54 - 1e-3, 1), (5 / 54 + 1e-3, 2)):
        assert TWINS.sample(three, 0.5, np.array([u], np.float32)).tolist() == [want], u


def test_device_sampling_draws_the_softmax_distribution():
    # 20,000 rows of the same logits: the empirical frequencies follow softmax(logits / T) (4-sigma bound)
    logits = np.array([1.0, 0.0, 2.0, -1.0, 0.5], np.float32)
    rows = np.tile(logits, (20_000, 1))
    ids = cupy_backend.next_token(TWINS, rows, 0.7, np.random.default_rng(3))
    p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    freq = np.bincount(ids, minlength=5) / ids.size
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / ids.size)), (freq, p)
    with pytest.raises(GenerationError, match="random generator"):
        cupy_backend.next_token(TWINS, rows[:1], 0.7, None)


# ------------------------------------------------------------------------------------------ the whole model


@pytest.fixture(scope="module", params=NAMES)
def standin(request):
    path = FIXTURES / request.param
    return load(path, cupy_backend.standin_backend()), dict(np.load(path / "reference.npz"))


def test_standin_logits_and_router_logits_match_transformers(standin):
    model, ref = standin
    logits, router_logits = model(ref["input_ids"], return_router_logits=True)
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=tolerance(ref["logits"]))
    single = model(ref["single_input_ids"])
    np.testing.assert_allclose(single, ref["single_logits"], rtol=0, atol=tolerance(ref["single_logits"]))
    for got, want in zip(router_logits, ref.get("router_logits", []), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want))


def test_standin_decode_steps_match_transformers(standin):
    # prefill 5 positions (cuBLAS path), then one at a time: GEMV, decode attention on the cache, fused MoE
    model, ref = standin
    ids = ref["input_ids"]
    cache = model.new_cache(batch_size=ids.shape[0], max_len=ids.shape[1])
    steps = [model.forward(ids[:, :5], cache=cache).logits]
    for t in range(5, ids.shape[1]):
        steps.append(model.forward(ids[:, t : t + 1], cache=cache).logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), ref["logits"], rtol=0, atol=tolerance(ref["logits"]))


def test_standin_greedy_generations_equal_transformers(standin):
    model, _ = standin
    ref = json.loads((model.path / "generate.json").read_text())
    n = ref["max_new_tokens"]
    for prompt, expected in zip(ref["prompts"], ref["single"], strict=True):
        assert tinyqwen.generate(model, prompt, n, eos_token_ids=()) == expected, prompt
        assert cupy_backend.generate_on_device(model, prompt, n) == expected, (
            prompt
        )  # sampling "on the device"
    batch = tinyqwen.generate_batch(
        model, ref["prompts"], n, eos_token_ids=(), pad_token_id=ref["pad_token_id"]
    )
    assert batch == ref["batch"]["new_tokens"]


def test_standin_keeps_the_checkpoints_dtype_and_cache_in_backend_arrays():
    model = load(FIXTURES / "dense-untied-bf16-sharded", cupy_backend.standin_backend())
    w = model.weights
    assert (
        w.embed.bf16 and w.layers[0].attn.q_proj.data.dtype == np.uint16
    )  # bf16 stays bf16: 2 bytes a weight
    assert w.layers[0].input_norm.dtype == np.float32  # vectors widened (exactly)
    f32 = load(FIXTURES / "dense-tied", cupy_backend.standin_backend())
    assert f32.weights.lm_head is f32.weights.embed and not f32.weights.embed.bf16  # tied: one array


@pytest.mark.parametrize("gemv_rows", [0, 64])
def test_both_product_paths_and_widening_blocks(monkeypatch, gemv_rows):
    # every product through the widen + GEMM path (tiny blocks), or every one through the GEMV kernels
    monkeypatch.setattr(cupy_backend, "GEMV_MAX_ROWS", gemv_rows)
    monkeypatch.setattr(cupy_backend, "WIDEN_BLOCK_BYTES", 256)
    for name in ("dense-yarn", "moe-sparse-step"):  # bf16 dense, bf16 MoE
        ref = dict(np.load(FIXTURES / name / "reference.npz"))
        model = load(FIXTURES / name, cupy_backend.standin_backend())
        logits = model(ref["input_ids"])
        np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=tolerance(ref["logits"]))


def test_temperature_sampling_on_the_device_repeats_with_a_seed():
    model = load(FIXTURES / "dense-tied", cupy_backend.standin_backend())
    a = cupy_backend.generate_on_device(model, [5, 6, 7], 6, temperature=1.5, seed=4)
    assert a == cupy_backend.generate_on_device(model, [5, 6, 7], 6, temperature=1.5, seed=4)
    assert len(a) == 6 and all(0 <= t < model.config.vocab_size for t in a)
    numpy_model = tinyqwen.load_model(FIXTURES / "dense-tied")
    with pytest.raises(GenerationError, match="needs a device backend"):
        cupy_backend.generate_on_device(numpy_model, [1], 2)


# ------------------------------------------------------------------------------------------ without a GPU


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a GPU")
def test_cupy_without_a_gpu_is_one_clear_line():
    with pytest.raises(BackendError) as error:
        get_backend("cupy")
    assert "needs an NVIDIA GPU" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(BackendError, match="needs an NVIDIA GPU"):
        tinyqwen.load_model(FIXTURES / "dense-tied", backend="cupy")
    run = subprocess.run(
        [sys.executable, "-m", "tinyqwen.cli", "bench", "--model", str(FIXTURES / "dense-tied"), "--backend", "cupy"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == [f"tinyqwen: error: {error.value}"]


def test_cupy_refuses_bf16_rounded_products():
    with pytest.raises(BackendError, match="needs the numba backend"):
        get_backend("cupy", matmul_precision="medium")


def test_cupy_not_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    with pytest.raises(
        BackendError, match=r"needs CuPy, which is not installed: pip install 'tinyqwen\[gpu\]'"
    ):
        get_backend("cupy")


def test_bench_lists_cupy_as_skipped_with_the_reason():
    from tinyqwen.bench import plan_engines

    (engine,) = plan_engines(FIXTURES / "dense-tied", ["cupy"])
    assert engine.name == "tinyqwen-cupy" and (engine.skip == (NO_GPU or ""))


# ------------------------------------------------------------------------------------------ on a GPU


@pytest.fixture(scope="module")
def cuda():
    return cupy_backend.CudaKernels()


@pytest.mark.gpu
@gpu
def test_gpu_kernels_equal_their_numpy_twins(cuda):
    cp = cuda.xp
    r = np.random.default_rng(0)
    x = r.standard_normal((5, 1024), dtype=np.float32)
    w = r.standard_normal(1024, dtype=np.float32)
    assert rel(cuda.rms_norm(cp.asarray(x), cp.asarray(w), 1e-6).get(), TWINS.rms_norm(x, w, 1e-6)) <= 1e-6
    q = r.standard_normal((2, 16, 7, 128), dtype=np.float32)
    cos, sin = rope.rope_cos_sin(np.arange(14).reshape(2, 7), rope.default_inv_freq(128, 1e6), 1.0)
    got = cuda.rope(cp.asarray(q), cp.asarray(cos), cp.asarray(sin)).get()
    assert rel(got, TWINS.rope(q, cos, sin)) <= 1e-6
    cache = r.standard_normal((2, 2, 8, 300, 128), dtype=np.float32)  # keys, values of a [B, Hkv, max_len, d]
    S = 257
    mask = np.ones((2, S), bool)
    mask[1, :40] = False
    qd = r.standard_normal((2, 16, 128), dtype=np.float32)
    dev = cp.asarray(cache)
    got = cuda.decode_attention(cp.asarray(qd), dev[0][:, :, :S], dev[1][:, :, :S], cp.asarray(mask)).get()
    assert rel(got, TWINS.decode_attention(qd, cache[0][:, :, :S], cache[1][:, :, :S], mask)) <= 1e-5
    bits = r.integers(0, 1 << 16, (300, 1024), dtype=np.uint16) & 0xBFFF  # no inf/NaN patterns
    for M in (1, 3, 8):
        xm = r.standard_normal((M, 1024), dtype=np.float32)
        got = cuda.gemv_bf16(cp.asarray(xm), cp.asarray(bits)).get()
        assert rel(got, TWINS.gemv_bf16(xm, bits)) <= 1e-5
    assert np.array_equal(cuda.widen(cp.asarray(bits)).get(), TWINS.widen(bits))
    ids = np.array([3, 0, 299, 3])
    assert np.array_equal(cuda.embed(cp.asarray(bits), cp.asarray(ids)).get(), TWINS.embed(bits, ids))
    logits = r.standard_normal((6, 128)).astype(np.float32)
    wr, er = cuda.route(cp.asarray(logits), 8, True)
    want_w, want_e = TWINS.route(logits, 8, True)
    assert np.array_equal(er.get(), want_e) and rel(wr.get(), want_w) <= 1e-6
    experts = r.integers(0, 4, 6).astype(np.int32)
    stack = r.integers(0, 1 << 16, (4, 96, 1024), dtype=np.uint16) & 0xBFFF
    xs = r.standard_normal((6, 1024), dtype=np.float32)
    got = cuda.expert_gemv(cp.asarray(xs), cp.asarray(experts), cp.asarray(stack)).get()
    assert rel(got, TWINS.expert_gemv(xs, experts, stack)) <= 1e-5
    y = r.standard_normal((12, 64), dtype=np.float32)
    wts = r.random((6, 2)).astype(np.float32)
    assert rel(cuda.combine(cp.asarray(y), cp.asarray(wts)).get(), TWINS.combine(y, wts)) <= 1e-6
    g, u = r.standard_normal((2, 3, 1000), dtype=np.float32)
    assert rel(cuda.silu_mul(cp.asarray(g), cp.asarray(u)).get(), TWINS.silu_mul(g, u)) <= 1e-6
    big = r.standard_normal((3, 151_936)).astype(np.float32)
    big[1, [7, 9000]] = 50.0  # a tie: the lower id
    assert cuda.argmax(cp.asarray(big)).get().tolist() == TWINS.argmax(big).tolist()
    uu = np.array([0.1, 0.5, 0.9], np.float32)
    assert (
        cuda.sample(cp.asarray(big), 0.8, cp.asarray(uu)).get().tolist()
        == TWINS.sample(big, 0.8, uu).tolist()
    )


@pytest.fixture(scope="module", params=NAMES)
def on_gpu(request):
    path = FIXTURES / request.param
    return tinyqwen.load_model(path, backend="cupy"), dict(np.load(path / "reference.npz"))


@pytest.mark.gpu
@gpu
def test_gpu_model_matches_transformers(on_gpu):
    model, ref = on_gpu
    rtol = (
        1e-3 if model.weights.layers[0].attn.q_proj.bf16 else 1e-4
    )  # the bound for bf16 / fp32 fixtures
    for got, want in (
        (model(ref["input_ids"]), ref["logits"]),
        (model(ref["single_input_ids"]), ref["single_logits"]),
    ):
        assert rel(got, want) <= rtol
    ids = ref["input_ids"]
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    steps = [model.forward(ids[:, :5], cache=cache).logits]
    steps += [model.forward(ids[:, t : t + 1], cache=cache).logits for t in range(5, ids.shape[1])]
    assert rel(np.concatenate(steps, 1), ref["logits"]) <= rtol
    gen = json.loads((model.path / "generate.json").read_text())
    for prompt, expected in zip(gen["prompts"], gen["single"], strict=True):
        assert cupy_backend.generate_on_device(model, prompt, gen["max_new_tokens"]) == expected
