"""Chapter 11 · Making it fast on the GPU: the roofline, two CUDA kernels and their NumPy twins, device sampling
(the inverse CDF, and radix select: the top-k cut without a sort).

Work through notebooks/11-cupy.ipynb, then replace each `raise NotImplementedError` below, in order.
Grade with `pytest exercises/test_ch11_cupy.py`. No GPU needed: your CUDA sources are compiled by NVRTC (from the
`gpu` extra: `pip install -e ".[gpu]"`) for every architecture from the T4 (compute_75) to the H100
(compute_90), then run on the tests' CPU executor of CUDA C (g++ compiles them; each CUDA thread is a fiber, so
__syncthreads really waits) and on the GPU where there is one; their NumPy twins are graded against transformers. The last checkpoint runs a fixture model on the cupy backend's orchestration with your twins
as its RMSNorm and RoPE kernels.
"""

from __future__ import annotations

import numpy as np


def decode_ceiling(
    weights_per_token: int,
    bytes_per_weight: float,
    bandwidth_gb_s: float,
    peak_tflops: float,
    batch: int = 1,
) -> float:
    """The roofline's bound on decode speed, in tokens per second, for `batch` sequences decoded together.

    One decode step reads every weight once (weights_per_token · bytes_per_weight bytes, whatever the batch) and
    does 2 flops (a multiply and an add) per weight per sequence. The step takes at least the longer of the two
    times: bytes / bandwidth, or flops / peak. It yields `batch` tokens. GB/s means 1e9 bytes per second and
    TFLOPS 1e12 flops per second (the units of spec sheets, not powers of two).

    Example: decode_ceiling(1_000_000_000, 2, 2000, 500, batch=1)
             -> 1000.0   (2 GB read in 1 ms; 2 GFLOP take 4 µs: memory-bound, 1 token per 1 ms)
             decode_ceiling(1_000_000_000, 2, 2000, 500, batch=1000)
             -> 250000.0 (still 1 ms of reading, but 2 TFLOP take 4 ms: compute-bound, 1000 tokens per 4 ms)
    """
    raise NotImplementedError


def rms_norm_kernel() -> str:
    """The CUDA C source of an RMSNorm kernel, as a string: `out = x / sqrt(mean(x²) + eps) * weight` per row.

    It must define exactly this kernel (extern "C", so NVRTC keeps its name):

        extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out, int d, float eps)

    launched with one block per row (blockIdx.x is the row; x, out are [rows, d] contiguous, weight is [d]) and
    128 threads per block (blockDim.x == 128), for any d (1 ≤ d ≤ 8192). Each thread sums the squares of the
    values j = threadIdx.x, threadIdx.x + blockDim.x, ...; the block then adds the 128 partial sums (a
    `__shared__ float partial[128]` and a tree: halve the active threads each step, `__syncthreads()` between
    steps), and every thread scales its values. Sum in float32. Use `sqrtf` (`<cmath>` is not available to NVRTC,
    but sqrtf is built in).

    Example: `tinyqwen.backends.cupy.compile_ptx(rms_norm_kernel(), "compute_90")` returns PTX text containing
             '.entry rms_norm_f32(' (the notebook's section 4 writes one such kernel, step by step).
    """
    raise NotImplementedError


def rms_norm_blocked(x: np.ndarray, weight: np.ndarray, eps: float, threads: int = 128) -> np.ndarray:
    """Your kernel's NumPy twin: RMSNorm of each row, computed the way one block of `threads` threads does it.

    x [rows, d] float32, weight [d] -> [rows, d] float32. Per row: thread t's partial sum is the sum of x[j]² for
    j = t, t + threads, t + 2·threads, ... (zero when t ≥ d); then a tree reduction: while more than one partial
    sum is left, partial[t] += partial[t + half] for the first half. Divide the total by d (not by the number of
    threads), add eps, take the square root, scale the row and multiply by weight. The input must not be modified.

    Example: rms_norm_blocked(np.array([[3.0, 4.0]], np.float32), np.ones(2, np.float32), 0.0, threads=4)
             -> array([[0.8485, 1.1314]], dtype=float32)   (partials [9, 16, 0, 0] -> [9, 16] -> [25]; 25 / 2 = 12.5;
             3 / sqrt(12.5) = 0.8485)
    """
    raise NotImplementedError


def rope_kernel() -> str:
    """The CUDA C source of a RoPE kernel (split-half layout, as Qwen3), as a string. It must define:

        extern "C" __global__ void rope_f32(const float* x, const float* cos, const float* sin, float* out,
                                            int B, int H, int T, int d)

    x and out are [B, H, T, d] contiguous, cos and sin [B, T, d]. One thread per rotated pair: thread
    i = blockIdx.x · blockDim.x + threadIdx.x handles pair j = i % (d/2) of row r = i / (d/2) (r runs over (b, h, t));
    threads with i ≥ B·H·T·d/2 do nothing (the launch rounds up to whole blocks of 256). With t = r % T and
    b = r / (T·H):

        out[r, j]       = x[r, j] · cos[b, t, j]             − x[r, j + d/2] · sin[b, t, j]
        out[r, j + d/2] = x[r, j + d/2] · cos[b, t, j + d/2] + x[r, j] · sin[b, t, j + d/2]

    Use `long long` for flat indices (B·H·T·d can pass 2³¹ for long contexts).

    Example: the source compiles with `tinyqwen.backends.cupy.compile_ptx(source, "compute_80")`.
    """
    raise NotImplementedError


def rope_by_thread(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Your RoPE kernel's NumPy twin: every thread's work at once, from the flat thread index.

    x [B, H, T, d], cos and sin [B, T, d] -> [B, H, T, d] float32. Make i = np.arange(B·H·T·d/2) (all threads),
    derive j, r, t and b from it exactly as the kernel does, gather the values with those index arrays (x viewed as
    [B·H·T, d], cos and sin as [B·T, d]), and scatter the two results into an output of x's shape.

    Example: x = [[[[1, 2, 3, 4]]]] (B = H = T = 1, d = 4) with cos = 0 and sin = 1 everywhere (a quarter turn)
             -> [[[[-3, -4, 1, 2]]]]   (pairs (1, 3) and (2, 4) each turn by 90°: (a, e) -> (-e, a))
    """
    raise NotImplementedError


def sample_inverse_cdf(logits: np.ndarray, temperature: float, u: np.ndarray) -> np.ndarray:
    """Temperature sampling as the device does it: for each row, the first id whose cumulative weight exceeds u·total.

    logits [B, V] float32, temperature > 0, u [B] uniform numbers in [0, 1) -> [B] int64 ids. The weights are
    exp((logits - max) / temperature) (subtracting the row's maximum first, so nothing overflows); their cumulative
    sum is the CDF up to a factor, `total` its last value. "Exceeds" is strict: a u·total exactly at a boundary
    picks the next id. Return V - 1 if rounding leaves no cumulative weight above the target.

    Example: logits = np.log([[0.1, 0.2, 0.7]]) (probabilities 0.1, 0.2, 0.7), temperature 1:
             u = [0.05] -> [0];   u = [0.25] -> [1];   u = [0.5] -> [2]
    """
    raise NotImplementedError


def order_key(values: np.ndarray) -> np.ndarray:
    """float64 values -> uint64 keys that sort like the values: the first step of radix select.

    values [n] float64 -> [n] uint64. Read each value's 64 bits as an unsigned integer (`values.view(np.uint64)`).
    A positive value's bits already sort like the value, but below every negative value's (whose sign bit is set):
    set the sign bit (`bits | (1 << 63)`). A negative value's bits sort backwards (a larger magnitude is a larger
    integer): flip every bit (`~bits`), which also clears the sign bit. -0.0 equals 0.0, so it must get 0.0's key:
    add 0.0 to the values first (-0.0 + 0.0 is +0.0). The input must not be modified.

    Example: order_key(np.array([1.0, -1.0, -0.0, 2.0])).tolist()
             -> [0xBFF0000000000000, 0x400FFFFFFFFFFFFF, 0x8000000000000000, 0xC000000000000000]
             (1.0 is 0x3FF0000000000000: sign bit set; -1.0 is 0xBFF0000000000000: every bit flipped; -0.0 is
             0.0, whose bits are all zero; the keys sort as -1.0 < -0.0 < 1.0 < 2.0)
    """
    raise NotImplementedError


def top_k_cut(values: np.ndarray, k: int) -> tuple[float, list[int]]:
    """The k-th largest value (ties counted), found as the GPU finds it: radix select on order_key, a byte per pass.

    values [n] float64, 1 <= k <= n -> (the k-th largest value, the number of candidates at the start of each of
    the 8 passes). Keys: order_key(values); every key starts as a candidate, and `needed = k`. For the byte at
    shift = 56, 48, ..., 0 (most significant first): count the candidates' bytes `(key >> shift) & 255` in 256
    bins; walk the bins from 255 down, subtracting each bin's count from `needed` while the bin holds fewer than
    `needed`; the bin d where the walk stops holds the k-th largest: keep only the candidates whose byte is d.
    After the 8th pass the candidates all share one key: return their value. No sorting.

    Example: top_k_cut(np.array([3.0, 1.0, 3.0, 2.0]), 3) -> (2.0, [4, 3, 1, 1, 1, 1, 1, 1])
             (pass 1: 3.0, 3.0 and 2.0 share the first byte 0xC0, 1.0 has 0xBF: 3 >= 3 candidates in bin 0xC0;
             pass 2: the two 3.0s (byte 0x08) are above, needed becomes 3 - 2 = 1, and 2.0 (byte 0x00) is it)
    """
    raise NotImplementedError
