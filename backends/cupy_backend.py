"""The "cupy" backend: the model on an NVIDIA GPU, with hand-written CUDA kernels and cuBLAS.

Decode reads every weight once per token, so the GPU's memory bandwidth (3.35 TB/s on an H100 SXM, published spec)
sets its speed; prefill multiplies whole matrices and is compute-bound. The plan:

    weights       uploaded once, in the checkpoint's dtype: bf16 stays bf16 (its uint16 bit patterns), F32 stays F32
    linear        decode (≤ GEMV_MAX_ROWS tokens): the bf16 GEMV kernel (2 bytes read per weight); prefill: widen
                  a block of the weight to float32 on the device, then cupy.matmul (cuBLAS SGEMM: fp32 in, fp32
                  accumulation; no TF32 unless the user sets CUPY_TF32=1)
    rms_norm      one block per row (also QK-Norm over head_dim)
    apply_rope    one thread per rotated pair
    attention     decode: one block per (row, query head) over the device KV cache; prefill: batched cuBLAS
                  products and a softmax, written once against the array namespace `xp`
    swiglu        two products, the SiLU·mul kernel, one product
    moe_block     router softmax + top-k on the device; decode: gather the routed rows, one GEMV per (token,
                  expert) pair through its own expert, combine in slot order — no trip to the host; prefill: the
                  tokens grouped by expert on the host (one sync per MoE layer), each expert's GEMMs once
    sampling      every option on the device (filter.cu: penalties from device-side counts, temperature,
                  top-k / top-p by radix select, min-p, the inverse CDF with the host generator's u): per step only
                  the chosen id (8 bytes) comes back, not the [vocab] logits; `tinyqwen.generate` uses it on this
                  backend (`DeviceBackend.device_sampler`), and the ids equal host sampling's with the same seed

The CUDA C sources live in `backends/cuda/*.cu` (compiled at first use by NVRTC, through CuPy). Everything is
written against an *ops* object: `CudaKernels` launches the real kernels on CuPy arrays; `NumpyTwins` computes the
same thing, kernel by kernel, in NumPy. `make_backend(NumpyTwins())` is therefore this backend's whole orchestration
(which kernel runs on which shapes, the KV cache on the "device", the MoE grouping, device sampling) running on a
machine without a GPU — which is how CI checks it against transformers' logits on every fixture. The kernels
themselves are compiled for sm_80 and sm_90 in CI (`compile_ptx`), and run against the twins only where a GPU is
(tests marked `gpu`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from tinyqwen.attention import MASKED
from tinyqwen.backends.contract import (
    CHOOSE,
    FINISHED,
    Backend,
)  # per row: sample it / finished (else: that forced id)
from tinyqwen.errors import BackendError, GenerationError
from tinyqwen.safetensors import bf16_to_float32
from tinyqwen.sampling import SamplingParams

KERNEL_DIR = Path(__file__).parent / "cuda"
# every kernel of every source file; tests check that each one is defined
KERNELS = {
    "norm.cu": ("rms_norm_f32",),
    "rope.cu": ("rope_f32",),
    "attention.cu": ("decode_attention_f32",),
    "mlp.cu": ("silu_mul_f32",),
    "bf16.cu": ("widen_bf16", "embed_bf16", "embed_f32", "gemv_bf16"),
    "moe.cu": ("moe_route", "gather_rows", "gemv_expert_bf16", "gemv_expert_f32", "moe_combine"),
    "sample.cu": ("argmax_rows", "sample_rows"),
    "filter.cu": ("penalize_rows", "filter_sample_rows"),
}
ARCHITECTURES = ("compute_80", "compute_90")  # A100, H100/H200: the virtual architectures CI compiles for
GEMV_MAX_ROWS = 8  # tokens up to which a bf16 product streams the weight (TQ_GEMV_ROWS in bf16.cu)
WIDEN_BLOCK_BYTES = 256 << 20  # float32 scratch for widening a bf16 weight before cuBLAS (prefill)
SAMPLE_THREADS = 256  # TQ_SAMPLE_THREADS in sample.cu
FILTER_THREADS = 1024  # TQ_FILTER_THREADS in filter.cu
MASS_ONE = 2.0**60  # TQ_MASS_ONE in filter.cu: a probability of 1 in fixed point
SLACK = 1e-9  # tinyqwen.sampling's rounding slack for top-p and min-p
INSTALL = "pip install 'tinyqwen[gpu]' (cupy-cuda12x, nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12)"


# --------------------------------------------------------------------------------------------- compiling


def cuda_include_dirs() -> list[Path]:
    """Folders holding cuda_bf16.h: the nvidia-cuda-runtime-cu12 wheel's include/, else $CUDA_PATH/include."""
    import os

    dirs = []
    try:
        import nvidia.cuda_runtime

        dirs += [Path(p) / "include" for p in nvidia.cuda_runtime.__path__]
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    return [d for d in dirs if (d / "cuda_bf16.h").is_file()]


def compile_options(arch: str | None = None) -> list[str]:
    """NVRTC options: C++17, our own folder and the CUDA headers on the include path, and the target if given."""
    includes = cuda_include_dirs()
    if not includes:
        raise BackendError(f"cuda_bf16.h not found (the CUDA runtime headers): {INSTALL}")
    options = ["--std=c++17", f"-I{KERNEL_DIR}", *(f"-I{d}" for d in includes)]
    return options + ([f"--gpu-architecture={arch}"] if arch else [])


def ptxas_report(source: Path, arch: str) -> dict[str, dict[str, int]]:
    """{kernel: {"registers", "spill_bytes", "shared_bytes"}} from compiling `source` to `arch` (sm_80, sm_90)
    machine code with ptxas -v, through NVRTC: what decides whether a launch of N threads fits one SM. No GPU needed.
    """
    import re

    from cupy.cuda import nvrtc

    program = nvrtc.createProgram(source.read_text(), source.name, [], [])
    try:
        nvrtc.compileProgram(
            program, [*compile_options(), f"--gpu-architecture={arch}", "--ptxas-options=-v"]
        )
        log = nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)
    report = {}
    for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry|\Z)", log, re.S):
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        shared = re.search(r"(\d+) bytes smem", body)
        report[name] = {
            "registers": int(re.search(r"Used (\d+) registers", body).group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
            "shared_bytes": int(shared.group(1)) if shared else 0,
        }
    return report


def compile_ptx(source: str | Path, arch: str, name: str = "kernel.cu") -> str:
    """CUDA C source (text, or a .cu file) -> PTX for `arch` via NVRTC; a BackendError carrying NVRTC's log.

    Needs no GPU and no driver: only the NVRTC library (nvidia-cuda-nvrtc-cu12) and the headers.
    """
    try:
        from cupy.cuda import nvrtc
    except ImportError:
        raise BackendError(f"compiling CUDA kernels needs CuPy's NVRTC binding: {INSTALL}") from None
    if isinstance(source, Path):
        name, source = source.name, source.read_text()
    program = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, compile_options(arch))
        except nvrtc.NVRTCError:
            log = nvrtc.getProgramLog(program).strip()
            raise BackendError(f"{name} does not compile for {arch}: {log}") from None
        ptx = nvrtc.getPTX(program)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(program)


# --------------------------------------------------------------------------------------------- the kernels, twice


def _bits_to_f32(w: np.ndarray) -> np.ndarray:
    return bf16_to_float32(w) if w.dtype == np.uint16 else w


class NumpyTwins:
    """Each CUDA kernel of backends/cuda/*.cu as NumPy: the same inputs, outputs and arithmetic (CPU stand-in).

    >>> ops = NumpyTwins()
    >>> ops.argmax(np.array([[1.0, 3.0, 3.0]], np.float32)).tolist()  # the lowest id on ties, as argmax_rows
    [1]
    """

    xp = np

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def rng(self, seed: int):
        return np.random.default_rng(seed)

    def uniform(self, rng, n: int):  # [n] float32 in [0, 1)
        return rng.random(n).astype(np.float32)

    def rms_norm(self, x, weight, eps: float):  # [R, d], [d] -> [R, d]            (rms_norm_f32)
        scale = np.float32(1.0) / np.sqrt(
            (x * x).sum(-1, keepdims=True) / np.float32(x.shape[-1]) + np.float32(eps)
        )
        return x * scale * weight

    def rope(self, x, cos, sin):  # [B, H, T, d], [B, T, d] x2 -> [B, H, T, d]      (rope_f32)
        half = x.shape[-1] // 2
        a, e = x[..., :half], x[..., half:]
        c, s = cos[:, None], sin[:, None]
        return np.concatenate(
            [a * c[..., :half] - e * s[..., :half], e * c[..., half:] + a * s[..., half:]], -1
        )

    def decode_attention(self, q, k, v, mask):  # [B, Hq, d], [B, Hkv, S, d] x2, [B, S] -> [B, Hq, d]
        B, Hq, d = q.shape
        Hkv = k.shape[1]
        qg = q.reshape(B, Hkv, Hq // Hkv, d)  # query head h reads kv head h // group   (decode_attention_f32)
        scores = np.einsum("bhgd,bhsd->bhgs", qg, k) * np.float32(d**-0.5)
        scores = np.where(mask[:, None, None], scores, MASKED)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        return (np.einsum("bhgs,bhsd->bhgd", e, v) / e.sum(-1, keepdims=True)).reshape(B, Hq, d)

    def silu_mul(self, g, u):  # [...] x2 -> [...]                                     (silu_mul_f32)
        with np.errstate(over="ignore"):
            return g / (np.float32(1.0) + np.exp(-g)) * u

    def widen(self, bits):  # bf16 bits [...] -> float32 [...]                         (widen_bf16)
        return bf16_to_float32(bits)

    def embed(self, table, ids):  # [V, d] (bf16 bits or f32), [n] int64 -> [n, d]    (embed_bf16 / embed_f32)
        return _bits_to_f32(table[ids])

    def gemv_bf16(self, x, bits):  # [M, K] f32, [N, K] bf16 bits -> [M, N]             (gemv_bf16)
        return x @ bf16_to_float32(bits).T

    def route(self, logits, k: int, renormalise: bool):  # [N, E] -> weights [N, k] f32, experts [N, k] int32
        e = np.exp(logits - logits.max(-1, keepdims=True))  #                            (moe_route)
        probs = e / e.sum(-1, keepdims=True)
        experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # ties: the lower index first
        weights = np.take_along_axis(probs, experts, -1)
        if renormalise:
            weights = weights / weights.sum(-1, keepdims=True)
        return weights.astype(np.float32), experts.astype(np.int32)

    def gather_rows(self, x, rows):  # [N, d], [P] int32 -> [P, d]                      (gather_rows)
        return x[rows]

    def expert_gemv(self, xs, experts, w):  # [P, K], [P] int32, [E, N, K] -> [P, N]    (gemv_expert_*)
        out = np.empty((xs.shape[0], w.shape[1]), np.float32)
        for p, e in enumerate(experts.tolist()):
            out[p] = _bits_to_f32(w[e]) @ xs[p]
        return out

    def combine(self, y, weights):  # [N·k, d], [N, k] -> [N, d], summed in slot order   (moe_combine)
        N, k = weights.shape
        y = y.reshape(N, k, -1)
        out = weights[:, 0, None] * y[:, 0]
        for slot in range(1, k):
            out = out + weights[:, slot, None] * y[:, slot]
        return out

    def argmax(self, logits):  # [B, V] -> [B] int64                                      (argmax_rows)
        return np.argmax(logits, axis=-1).astype(np.int64)

    def sample(self, logits, temperature: float, u):  # [B, V], [B] -> [B] int64           (sample_rows)
        top = logits.max(-1, keepdims=True)
        cdf = np.cumsum(np.exp((logits - top) * np.float32(1.0 / temperature)), axis=-1)
        target = u * cdf[:, -1]
        # the first id whose cumulative weight exceeds the target (tinyqwen.sampling.sample's rule)
        chosen = [
            min(int(np.searchsorted(c, t, side="right")), c.size - 1)
            for c, t in zip(cdf, target, strict=True)
        ]
        return np.array(chosen, np.int64)

    def penalize(self, logits, seen, counts, repetition, presence, frequency, temperature):
        # [B, V] f32, [B, V] uint8, [B, V] int32 -> x [B, V] float64, bad [B] int32        (penalize_rows)
        bad = (~np.isfinite(logits)).any(-1).astype(np.int32)
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.asarray(logits, np.float64)
            v = np.where(seen != 0, np.where(v > 0, v / repetition, v * repetition), v)
            v = v - np.where(counts > 0, presence, 0.0)
            v = v - frequency * counts.astype(np.float64)
            return v / temperature, bad

    def filter_sample(self, x, top_k, top_p, min_p, greedy, u, forced, bad, seen, counts):
        # [B, V] f64, ..., u [B] f64, forced [B] int64 -> [B] int64; records the ids in seen, counts (filter_sample_rows)
        out = np.empty(x.shape[0], np.int64)
        for b in range(x.shape[0]):
            f = int(forced[b])
            if f == FINISHED or bad[b]:
                out[b] = FINISHED if f == FINISHED else -1
                continue
            token = f if f >= 0 else filter_sample_row(x[b], top_k, top_p, min_p, greedy, float(u[b]))
            out[b] = token
            if token < x.shape[1]:  # a forced id outside the vocabulary is the host's to reject
                counts[b, token] += 1
                seen[b, token] = 1
        return out


# ---------------------------------------------------------------------------------- filter_sample_rows, in NumPy

_SIGN = np.uint64(1 << 63)
ALL_TIES = 0x7FFFFFFF  # TQ_ALL_TIES: no cut inside the tokens equal to the cut's value


def order_keys(x: np.ndarray) -> np.ndarray:
    """float64 values -> uint64 keys that sort like them (order_key in filter.cu); -0.0 and +0.0 share one key.

    >>> order_keys(np.array([-2.0, -0.0, 0.0, 1.5])).argsort().tolist()  # same order as the values
    [0, 1, 2, 3]
    >>> bool(order_keys(np.array([-0.0]))[0] == order_keys(np.array([0.0]))[0])
    True
    """  # [...] float64 -> [...] uint64
    bits = (np.asarray(x, np.float64) + 0.0).view(np.uint64)
    return np.where(bits >> np.uint64(63) == 1, ~bits, bits | _SIGN)


def key_value(key: int) -> float:
    """The float64 value whose key (order_keys) is `key`."""
    bits = key & ((1 << 63) - 1) if key >> 63 else ~key & ((1 << 64) - 1)
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def radix_select_kth(keys: np.ndarray, k: int, trace: list[int] | None = None) -> int:
    """The key of the k-th largest value (ties counted), one byte at a time from the most significant.

    Each pass histograms the next byte of the keys still matching the bytes fixed so far, then walks the 256 bins
    from the largest down until it has seen k keys: the k-th largest lies in that bin.

    >>> keys = order_keys(np.array([3.0, 1.0, 3.0, 2.0]))
    >>> key_value(radix_select_kth(keys, 2)), key_value(radix_select_kth(keys, 3))
    (3.0, 2.0)
    >>> trace = []; _ = radix_select_kth(keys, 3, trace); trace  # candidates histogrammed in each pass
    [4, 3, 1, 1, 1, 1, 1, 1]
    """  # [n] uint64, 1 <= k <= n -> key
    prefix, fixed, needed = 0, 0, k
    for shift in range(56, -1, -8):
        live = keys[(keys & np.uint64(fixed)) == np.uint64(prefix)]
        if trace is not None:
            trace.append(int(live.size))
        bins = np.bincount(((live >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), minlength=256)
        d = 255
        while bins[d] < needed:
            needed -= int(bins[d])
            d -= 1
        prefix |= d << shift
        fixed |= 255 << shift
    return prefix


def radix_select_mass(keys: np.ndarray, mass: np.ndarray, reach: int) -> tuple[int, int, int, int]:
    """Top-p's cut: the key of the last token (by value desc) whose mass *before* it is < `reach`.

    Like radix_select_kth, but the bins carry the candidates' (fixed-point) probability mass, and the walk keeps
    the last bin whose first token still has less than `reach` before it. Returns (the cut's key, the mass above
    it, how many tokens equal it, their mass). Integer masses: exact, whatever the order of the sums.

    >>> keys, mass = order_keys(np.array([0.5, 0.3, 0.2])), np.array([50, 30, 20], np.uint64)
    >>> cut, above, ties, tie_mass = radix_select_mass(keys, mass, 80)  # 50 + 30 reaches 80: 0.3 is the last
    >>> key_value(cut), above, ties, tie_mass
    (0.3, 50, 1, 30)
    """  # [n] uint64 keys, [n] uint64 masses, reach > 0 -> (key, mass above, count, mass of the ties)
    prefix, fixed, above = 0, 0, 0
    for shift in range(56, -1, -8):
        live = (keys & np.uint64(fixed)) == np.uint64(prefix)
        digit = ((keys[live] >> np.uint64(shift)) & np.uint64(255)).astype(np.int64)
        bins = np.bincount(digit, minlength=256)
        bin_mass = np.zeros(256, np.uint64)
        np.add.at(bin_mass, digit, mass[live])
        before, chosen = above, -1
        for d in range(255, -1, -1):
            if before >= reach:
                break
            if bins[d]:
                chosen, above_chosen = d, before
                before += int(bin_mass[d])
        prefix |= chosen << shift
        fixed |= 255 << shift
        above, count, count_mass = above_chosen, int(bins[chosen]), int(bin_mass[chosen])
    return prefix, above, count, count_mass


def filter_sample_row(x: np.ndarray, top_k: int, top_p: float, min_p: float, greedy: bool, u: float) -> int:
    """One row of filter_sample_rows: the same steps, in NumPy (tinyqwen.sampling.sample's rules, found by radix
    select instead of a sort). x: the penalised logits / T in float64; u: the host generator's uniform number.

    >>> x = np.log(np.array([0.1, 0.5, 0.15, 0.25]))
    >>> [filter_sample_row(x, 0, 0.7, 0.0, False, u) for u in (0.0, 0.6, 0.99)]  # top-p 0.7 keeps 0.5 and 0.25
    [1, 1, 3]
    """  # [V] float64 -> id
    V = x.size
    m = x.max()
    if greedy:
        return int(np.flatnonzero(x == m)[0])
    e = np.exp(x - m)
    keys = order_keys(x)
    key_k = radix_select_kth(keys, top_k) if 0 < top_k < V else 0  # top-k: every value >= the k-th stays
    in_k = keys >= np.uint64(key_k)
    key_p, keep_ties, e_cut = key_k, ALL_TIES, 0.0
    if top_p < 1.0:  # top-p over the top-k survivors, in fixed point
        total = e[in_k].sum()
        mass = np.where(in_k, np.rint(e / total * MASS_ONE), 0.0).astype(np.uint64)
        reach = top_p - SLACK
        if reach <= 0:
            key_p, keep_ties = int(order_keys(np.array([m]))[0]), 1
        else:
            P = int(np.ceil(reach * MASS_ONE))
            key_p, above, ties, tie_mass = radix_select_mass(keys[in_k], mass[in_k], P)
            q = tie_mass // ties
            keep_ties = (
                ties if q == 0 else min(ties, -(-(P - above) // q))
            )  # the i-th tie stays while above + i·q < P
        e_cut = np.exp(key_value(key_p) - m)
    tie = keys == np.uint64(key_p)
    rank = np.cumsum(tie) - tie  # a tie's rank by id
    keep = (keys > np.uint64(key_p)) | (tie & (rank < keep_ties))
    if min_p > 0.0:  # min-p over the top-p survivors
        if keep_ties != ALL_TIES:
            S = e[keys > np.uint64(key_p)].sum() + keep_ties * e_cut
        else:
            S = e[keys >= np.uint64(key_p)].sum()
        keep &= e / S >= min_p * (1.0 / S) * (1.0 - SLACK)
    # the inverse CDF in id order, summed the kernel's way: one contiguous chunk of ids per thread
    chunk = -(-V // FILTER_THREADS)
    w = np.zeros(FILTER_THREADS * chunk)
    w[:V] = np.where(keep, e, 0.0)
    chunk_total = np.cumsum(w.reshape(FILTER_THREADS, chunk), axis=1)[
        :, -1
    ]  # sequential sums, as the threads
    before = np.cumsum(chunk_total)  # thread 0's running sum over the chunks
    target = u * before[-1]
    for c in np.flatnonzero(before > target)[:1]:
        ids = np.flatnonzero(keep[c * chunk : (c + 1) * chunk]) + c * chunk
        running = np.cumsum(np.concatenate([[before[c - 1] if c else 0.0], e[ids]]))[1:]
        crossed = np.flatnonzero(running > target)
        return int(ids[crossed[0]] if crossed.size else ids[-1])
    return int(np.flatnonzero(keep)[-1])  # u·total rounded up to the total: the last kept id


class CudaKernels:
    """The kernels of backends/cuda/*.cu, compiled by NVRTC for this GPU at first use, launched on CuPy arrays."""

    def __init__(self):
        import cupy

        self.xp = cupy

    @cached_property
    def _modules(self) -> dict:
        options = tuple(compile_options())
        return {
            f: self.xp.RawModule(code=(KERNEL_DIR / f).read_text(), options=options, backend="nvrtc")
            for f in KERNELS
        }

    def _kernel(self, name: str):
        source = next(f for f, names in KERNELS.items() if name in names)
        return self._modules[source].get_function(name)

    def to_numpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def rng(self, seed: int):
        return self.xp.random.default_rng(seed)

    def uniform(self, rng, n: int):
        return rng.random(n).astype(np.float32)

    @staticmethod
    def _threads(d: int) -> int:  # a block per row: one thread per value up to 256, a multiple of 32
        return min(256, max(32, (d + 31) // 32 * 32))

    @staticmethod
    def _blocks(n: int, threads: int = 256) -> tuple[int]:
        return ((n + threads - 1) // threads,)

    def _c(
        self, a, dtype=np.float32
    ):  # kernels index flat memory: contiguous arrays of the dtype they expect
        return self.xp.ascontiguousarray(a, dtype=dtype)

    def rms_norm(self, x, weight, eps: float):
        x, weight = self._c(x), self._c(weight)
        out = self.xp.empty_like(x)
        d = x.shape[-1]
        self._kernel("rms_norm_f32")(
            (x.shape[0],), (self._threads(d),), (x, weight, out, np.int32(d), np.float32(eps))
        )
        return out

    def rope(self, x, cos, sin):
        x, cos, sin = self._c(x), self._c(cos), self._c(sin)
        B, H, T, d = x.shape
        out = self.xp.empty_like(x)
        n = B * H * T * (d // 2)
        args = (x, cos, sin, out, np.int32(B), np.int32(H), np.int32(T), np.int32(d))
        self._kernel("rope_f32")(self._blocks(n), (256,), args)
        return out

    def decode_attention(self, q, k, v, mask):
        q, mask = (
            self._c(q),
            self._c(mask, np.bool_),
        )  # k, v: float32 with unit stride along d (see attention())
        B, Hq, d = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        scores = self.xp.empty((B, Hq, S), np.float32)
        out = self.xp.empty((B, Hq, d), np.float32)
        ks = [np.int64(s // 4) for s in k.strides[:3]]  # element strides: the cache's first S positions
        vs = [np.int64(s // 4) for s in v.strides[:3]]
        args = (q, k, v, mask, scores, out, np.int32(Hq), np.int32(Hkv), np.int32(S), np.int32(d), *ks, *vs)
        args += (np.int64(mask.strides[0]), np.float32(d**-0.5))
        self._kernel("decode_attention_f32")((B * Hq,), (self._threads(d),), args, shared_mem=4 * d)
        return out

    def silu_mul(self, g, u):
        g, u = self._c(g), self._c(u)
        out = self.xp.empty_like(g)
        self._kernel("silu_mul_f32")(self._blocks(g.size), (256,), (g, u, out, np.int64(g.size)))
        return out

    def widen(self, bits):
        out = self.xp.empty(bits.shape, np.float32)
        self._kernel("widen_bf16")(self._blocks(bits.size), (256,), (bits, out, np.int64(bits.size)))
        return out

    def embed(self, table, ids):
        d = table.shape[1]
        out = self.xp.empty((ids.size, d), np.float32)
        name = "embed_bf16" if table.dtype == np.uint16 else "embed_f32"
        ids = self.xp.ascontiguousarray(ids, dtype=np.int64)
        self._kernel(name)((ids.size,), (self._threads(d),), (table, ids, out, np.int32(d)))
        return out

    def gemv_bf16(self, x, bits):
        x = self._c(x)
        M, K = x.shape
        N = bits.shape[0]
        out = self.xp.empty((M, N), np.float32)
        self._kernel("gemv_bf16")(
            self._blocks(32 * N), (256,), (x, bits, out, np.int32(M), np.int32(N), np.int32(K))
        )
        return out

    def route(self, logits, k: int, renormalise: bool):
        logits = self._c(logits)
        N, E = logits.shape
        experts = self.xp.empty((N, k), np.int32)
        weights = self.xp.empty((N, k), np.float32)
        args = (logits, np.int32(N), np.int32(E), np.int32(k), np.int32(bool(renormalise)), experts, weights)
        self._kernel("moe_route")(self._blocks(N, 64), (64,), args)
        return weights, experts

    def gather_rows(self, x, rows):
        x, rows = self._c(x), self._c(rows, np.int32)
        d = x.shape[1]
        out = self.xp.empty((rows.size, d), np.float32)
        self._kernel("gather_rows")((rows.size,), (self._threads(d),), (x, rows, out, np.int32(d)))
        return out

    def expert_gemv(self, xs, experts, w):
        xs, experts = self._c(xs), self._c(experts, np.int32)
        P, K = xs.shape
        N = w.shape[1]
        out = self.xp.empty((P, N), np.float32)
        name = "gemv_expert_bf16" if w.dtype == np.uint16 else "gemv_expert_f32"
        args = (xs, experts, w, out, np.int32(P), np.int32(N), np.int32(K))
        self._kernel(name)(self._blocks(32 * P * N), (256,), args)
        return out

    def combine(self, y, weights):
        y, weights = self._c(y), self._c(weights)
        N, k = weights.shape
        d = y.shape[1]
        out = self.xp.empty((N, d), np.float32)
        args = (y, weights, out, np.int32(N), np.int32(k), np.int32(d))
        self._kernel("moe_combine")(self._blocks(N * d), (256,), args)
        return out

    def argmax(self, logits):
        logits = self._c(logits)
        B, V = logits.shape
        out = self.xp.empty(B, np.int64)
        self._kernel("argmax_rows")((B,), (SAMPLE_THREADS,), (logits, np.int32(V), out))
        return out

    def sample(self, logits, temperature: float, u):
        logits, u = self._c(logits), self._c(u)
        B, V = logits.shape
        out = self.xp.empty(B, np.int64)
        args = (logits, np.int32(V), np.float32(1.0 / temperature), u, out)
        self._kernel("sample_rows")((B,), (SAMPLE_THREADS,), args)
        return out

    def penalize(self, logits, seen, counts, repetition, presence, frequency, temperature):
        logits = self._c(logits)
        B, V = logits.shape
        x = self.xp.empty((B, V), np.float64)
        bad = self.xp.zeros(B, np.int32)
        args = (logits, seen, counts, np.int32(V), np.float64(repetition), np.float64(presence))
        args += (np.float64(frequency), np.float64(temperature), x, bad)
        self._kernel("penalize_rows")((*self._blocks(V), B), (256,), args)
        return x, bad

    def filter_sample(self, x, top_k, top_p, min_p, greedy, u, forced, bad, seen, counts):
        B, V = x.shape  # seen, counts: the sampler's own device arrays, updated in place (never copies)
        e = self.xp.empty((B, V), np.float64)
        mass = self.xp.empty((B, V), np.uint64)
        out = self.xp.empty(B, np.int64)
        u = self._c(self.xp.asarray(u), np.float64)  # host -> device: B numbers per step
        forced = self._c(self.xp.asarray(forced), np.int64)
        args = (x, e, mass, np.int32(V), np.int32(top_k), np.float64(top_p), np.float64(min_p))
        args += (np.int32(bool(greedy)), u, forced, bad, seen, counts, out)
        self._kernel("filter_sample_rows")((B,), (FILTER_THREADS,), args)
        return out


# --------------------------------------------------------------------------------------------- the orchestration


class DeviceWeight:
    """A weight matrix on the device in its checkpoint dtype (uint16 bf16 bits, or float32).

    Indexing it is the embedding lookup: rows `ids` (a host array), widened to float32 on the device.
    """

    def __init__(self, data, ops):
        self.data, self.ops = data, ops
        self.bf16 = data.dtype == np.uint16

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    nbytes = property(lambda self: int(self.data.nbytes))
    dtype = np.dtype(np.float32)  # what it stands for

    def __getitem__(self, ids):  # [B, T] host ids -> [B, T, d] float32 on the device
        ids = np.asarray(ids)
        flat = self.ops.xp.asarray(ids.reshape(-1).astype(np.int64))
        return self.ops.embed(self.data, flat).reshape(*ids.shape, self.shape[-1])

    def __repr__(self) -> str:
        return f"DeviceWeight(shape={self.shape}, {'bf16' if self.bf16 else 'float32'})"


class _Uploads:
    """Host arrays the model builds once per forward (cos, sin, the mask) cross to the device once, not per layer.

    One entry per slot, keyed by the host object itself (held, so its id cannot be reused).
    """

    def __init__(self, xp):
        self.xp, self.held = xp, {}

    def __call__(self, slot: str, a, dtype=None):
        if not isinstance(a, np.ndarray):
            return a  # already on the device
        hit = self.held.get(slot)
        if hit is None or hit[0] is not a:
            hit = self.held[slot] = (a, self.xp.asarray(np.ascontiguousarray(a, dtype=dtype)))
        return hit[1]


@dataclass(frozen=True)
class DeviceBackend(Backend):
    ops: object = None  # NumpyTwins or CudaKernels: what `generate_on_device` samples with

    def device_sampler(self, params: SamplingParams, prompts: list[list[int]], vocab: int) -> DeviceSampler:
        """What tinyqwen.generation samples with on this backend (every option, on the device)."""
        return DeviceSampler(self.ops, params, prompts, vocab)


def make_backend(ops, name: str = "cupy") -> DeviceBackend:
    """The Backend whose kernels run through `ops` (CudaKernels on a GPU; NumpyTwins on a CPU, for CI)."""
    xp = ops.xp
    upload = _Uploads(xp)

    def rows(x):  # [..., d] -> [M, d] float32, contiguous
        return xp.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])

    def prepare(w: np.ndarray):
        # vectors (norm weights) become float32 (bf16 widened exactly, on the host: a few KB); matrices keep
        # the checkpoint's dtype and cross to the device once
        if w.ndim < 2:
            return xp.asarray(np.asarray(_bits_to_f32(w), np.float32))
        return DeviceWeight(xp.asarray(np.ascontiguousarray(w)), ops)

    def linear(x, w: DeviceWeight):  # [..., K], [N, K] -> [..., N]
        x2 = rows(x)
        M, N = x2.shape[0], w.shape[0]
        if not w.bf16:
            out = xp.matmul(x2, w.data.T)  # cuBLAS SGEMM (NumPy's BLAS in the stand-in)
        elif M <= GEMV_MAX_ROWS:
            out = ops.gemv_bf16(x2, w.data)  # decode: bandwidth-bound, the weight streamed once as bf16
        else:  # prefill: compute-bound, so cuBLAS on the widened weight, a block of rows at a time
            out = xp.empty((M, N), np.float32)
            block = max(1, WIDEN_BLOCK_BYTES // (4 * w.shape[1]))
            for start in range(0, N, block):
                stop = min(N, start + block)
                out[:, start:stop] = xp.matmul(x2, ops.widen(w.data[start:stop]).T)
        return out.reshape(*x.shape[:-1], N)

    def rms_norm(x, weight, eps: float):  # [..., d], [d] -> [..., d]
        return ops.rms_norm(rows(x), weight, eps).reshape(x.shape)

    def apply_rope(x, cos, sin):  # [B, H, T, d], [B, T, d] x2 -> [B, H, T, d]
        cos, sin = upload("cos", cos, np.float32), upload("sin", sin, np.float32)
        return ops.rope(xp.ascontiguousarray(x, dtype=np.float32), cos, sin)

    def attention(q, k, v, mask):  # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] -> [B, Hq, T, d]
        mask = upload("mask", mask, np.bool_)
        B, Hq, T, d = q.shape
        if T == 1:  # decode: the kernel reads the cache's first S positions in place (strided, no copy)
            k = k if k.strides[-1] == k.itemsize else xp.ascontiguousarray(k)
            v = v if v.strides[-1] == v.itemsize else xp.ascontiguousarray(v)
            out = ops.decode_attention(
                xp.ascontiguousarray(q[:, :, 0]), k, v, xp.ascontiguousarray(mask[:, 0])
            )
            return out.reshape(B, Hq, 1, d)
        Hkv = k.shape[1]  # prefill: the reference's algorithm, in xp (batched cuBLAS products)
        qg = q.reshape(B, Hkv, Hq // Hkv, T, d)
        scores = xp.matmul(qg, k[:, :, None].swapaxes(-1, -2)) * np.float32(d**-0.5)
        scores = xp.where(mask[:, None, None], scores, np.float32(MASKED))
        e = xp.exp(scores - scores.max(-1, keepdims=True))
        return xp.matmul(e / e.sum(-1, keepdims=True), v[:, :, None]).reshape(B, Hq, T, d)

    def swiglu(x, w_gate, w_up, w_down):  # [..., d] -> [..., d]
        x2 = rows(x)
        return linear(ops.silu_mul(linear(x2, w_gate), linear(x2, w_up)), w_down).reshape(x.shape)

    def expert(w: DeviceWeight, e: int) -> DeviceWeight:
        return DeviceWeight(w.data[e], ops)

    def moe_block(x, w_router, w_gate, w_up, w_down, top_k: int, norm_topk_prob: bool):
        # [N, d], [E, d], [E, f, d], [E, f, d], [E, d, f] -> output [N, d], router logits [N, E]
        x2 = rows(x)
        N, d = x2.shape
        router_logits = linear(x2, w_router)
        weights, experts = ops.route(router_logits, top_k, norm_topk_prob)  # [N, k] x2, on the device
        if N <= GEMV_MAX_ROWS:  # decode: every (token, slot) pair at once, nothing crosses to the host
            pairs = experts.reshape(-1)
            xs = ops.gather_rows(x2, xp.repeat(xp.arange(N, dtype=np.int32), top_k))
            h = ops.silu_mul(ops.expert_gemv(xs, pairs, w_gate.data), ops.expert_gemv(xs, pairs, w_up.data))
            y = ops.expert_gemv(h, pairs, w_down.data)  # [N·k, d]
        else:  # prefill: group the pairs by expert (the group sizes decide the GEMM shapes: one sync)
            flat = ops.to_numpy(experts).reshape(-1)
            y = xp.empty((N * top_k, d), np.float32)
            for e in np.unique(flat):
                pair = np.flatnonzero(flat == e).astype(np.int32)
                xs = ops.gather_rows(x2, xp.asarray(pair // top_k))
                y[xp.asarray(pair)] = swiglu(xs, expert(w_gate, e), expert(w_up, e), expert(w_down, e))
        return ops.combine(y, weights), router_logits

    return DeviceBackend(
        name=name,
        linear=linear,
        rms_norm=rms_norm,
        apply_rope=apply_rope,
        attention=attention,
        swiglu=swiglu,
        moe_block=moe_block,
        prepare=prepare,
        to_numpy=ops.to_numpy,
        keep_bf16=True,
        zeros=lambda shape, dtype=np.float32: xp.zeros(shape, dtype),
        ops=ops,
    )


# --------------------------------------------------------------------------------------------- sampling


def next_token(ops, logits, temperature: float = 0.0, rng=None):
    """[B, V] logits on the device -> [B] ids on the device: arg-max, or a temperature sample (needs `rng`).

    The minimal pair (argmax_rows, sample_rows: float32, the device's own generator); `DeviceSampler` is the whole
    pipeline (penalties, top-k, top-p, min-p) with the host generator's numbers, equal to host sampling."""
    if temperature <= 0:
        return ops.argmax(logits)
    if rng is None:
        raise GenerationError("sampling with temperature > 0 needs a random generator (pass seed=)")
    return ops.sample(logits, temperature, ops.uniform(rng, logits.shape[0]))


class DeviceSampler:
    """Every sampling option on the device for a batch of rows; per step only the B chosen ids cross to the host.

    It keeps, on the device, which ids each row has seen (prompt + output: the repetition penalty) and how often
    each was generated (presence / frequency); `filter_sample_rows` updates both with the id it picks, so they
    never cross either. The uniform numbers come from the host's generator (one float per row and step, host to
    device): with the same seed the ids equal `tinyqwen.generate`'s host sampler, on any backend.

    >>> s = DeviceSampler(NumpyTwins(), SamplingParams(repetition_penalty=2.0), [[1]], vocab=3)
    >>> s.choose(np.array([[1.0, 1.5, 0.0]], np.float32), [0.0], [CHOOSE]).tolist()  # 1.5 / 2 < 1: id 0
    [0]
    """

    def __init__(self, ops, params: SamplingParams, prompts: list[list[int]], vocab: int):
        self.ops, self.params = ops, params
        seen = np.zeros((len(prompts), vocab), np.uint8)
        for b, prompt in enumerate(prompts):
            seen[b, prompt] = 1
        self.seen = ops.xp.asarray(seen)  # [B, V] uploaded once
        self.counts = ops.xp.zeros((len(prompts), vocab), np.int32)  # [B, V]

    def choose(self, logits, u, forced) -> np.ndarray:
        """[B, V] device logits, [B] uniforms (ignored when greedy or forced), [B] CHOOSE / FINISHED / an id to
        take -> [B] int64 ids on the host (-1: that row's logits are not finite; FINISHED for finished rows)."""
        p, ops = self.params, self.ops
        temperature = 1.0 if p.greedy else p.temperature  # greedy: the arg-max of the penalised logits
        x, bad = ops.penalize(
            logits,
            self.seen,
            self.counts,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
            temperature,
        )
        ids = ops.filter_sample(
            x, int(p.top_k), p.top_p, p.min_p, p.greedy, np.asarray(u, np.float64), np.asarray(forced, np.int64),
            bad, self.seen, self.counts,
        )  # fmt: skip
        return ops.to_numpy(ids)  # the one transfer per step: B ids (8 bytes each)


def generate_on_device(
    model, prompt, max_new_tokens: int, temperature: float = 0.0, seed: int = 0, eos_token_ids=(), **knobs
) -> list[int]:
    """Generate one sequence with every sampling step on the device: per step only the new id (8 bytes) crosses.

    `knobs` are SamplingParams' (top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    all off by default). The uniform numbers come from `np.random.default_rng(seed)`, drawn as tinyqwen.sampling
    draws them, so the ids equal `tinyqwen.generate(model, prompt, ..., seed=seed)` with the same knobs.
    """
    ops = getattr(model.backend, "ops", None)
    if ops is None:
        raise GenerationError(
            f"generate_on_device needs a device backend, the model has {model.backend.name!r}"
        )
    prompt = [int(t) for t in prompt]
    if not prompt or max_new_tokens < 1:
        raise GenerationError("generate_on_device needs a non-empty prompt and max_new_tokens >= 1")
    params = SamplingParams(temperature=temperature, **knobs)
    sampler = DeviceSampler(ops, params, [prompt], model.config.vocab_size)
    rng = None if params.greedy else np.random.default_rng(seed)
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    ids, out = np.asarray([prompt]), []
    for _ in range(max_new_tokens):
        logits = model.forward(ids, cache=cache, last_only=True, on_device=True).logits  # [1, 1, V] on device
        u = [0.0 if rng is None else rng.random()]
        token = int(sampler.choose(logits[:, -1], u, [CHOOSE])[0])
        if token < 0:
            raise GenerationError(f"the model's logits are not finite when choosing new token {len(out) + 1}")
        out.append(token)
        if token in eos_token_ids:
            break
        ids = np.asarray([[token]])
    return out


# --------------------------------------------------------------------------------------------- entry points


def gpu_unavailable_reason() -> str | None:
    """None where CuPy can use a GPU here; otherwise one line saying why not and what to install."""
    try:
        import cupy
    except ImportError:
        return f"backend 'cupy' needs CuPy, which is not installed: {INSTALL}; or use --backend numpy"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or one too old for CUDA 12
        detail = str(e).split(":")[0] or type(e).__name__
        return (
            f"backend 'cupy' needs an NVIDIA GPU with a CUDA 12 driver, and CUDA finds none here ({detail}); "
            "use --backend numpy or numba"
        )
    if count == 0:
        return "backend 'cupy' needs an NVIDIA GPU, and CUDA finds none here; use --backend numpy or numba"
    if not cuda_include_dirs():
        return f"backend 'cupy' needs the CUDA runtime headers (cuda_bf16.h): {INSTALL}"
    return None


def hbm_peak_gb_s() -> float:
    """The GPU's theoretical memory bandwidth from its reported clock and bus width (GB/s): 2 transfers per clock."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    try:  # kHz and bits; CUDA 13 drops memoryClockRate from the properties
        return 2 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8 / 1e9
    except KeyError:
        return float("nan")


def device_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def backend() -> DeviceBackend:
    """The real GPU backend; a one-line BackendError where there is no usable GPU."""
    reason = gpu_unavailable_reason()
    if reason:
        raise BackendError(reason)
    return make_backend(CudaKernels())


def standin_backend() -> DeviceBackend:
    """This backend's orchestration with NumPy standing in for CuPy and the kernels' NumPy twins (no GPU needed)."""
    return make_backend(NumpyTwins(), name="cupy-standin")
