"""Chapter 11 solutions: the roofline, two CUDA kernels as plain CUDA C (one block per row; one thread per pair),
their NumPy twins written the way the threads compute, inverse-CDF sampling and radix select (backends/cuda/*.cu
and backends/cupy/ are the library's versions, with warp shuffles, fused kernels and more checks)."""

from __future__ import annotations

import numpy as np


def decode_ceiling(
    weights_per_token: int, bytes_per_weight: float, bandwidth_gb_s: float, peak_tflops: float, batch: int = 1
) -> float:
    # the roofline of tinyqwen/bench's decode bandwidth: a step reads the weights once and does 2 flops per
    # weight per sequence; it lasts as long as the slower of the two
    read_s = weights_per_token * bytes_per_weight / (bandwidth_gb_s * 1e9)
    compute_s = 2 * weights_per_token * batch / (peak_tflops * 1e12)
    return batch / max(read_s, compute_s)


RMS_NORM_CU = r"""
// out = x / sqrt(mean(x^2) + eps) * weight, one block of 128 threads per row
extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out, int d, float eps) {
    __shared__ float partial[128];
    const float* row = x + (long long)blockIdx.x * d;
    float* dst = out + (long long)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += row[j] * row[j];  // this thread's stride of the row
    partial[threadIdx.x] = ss;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {  // tree: halve the active threads each step
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf(partial[0] / (float)d + eps);  // divide by d, not by the thread count
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = row[j] * scale * weight[j];
}
"""


def rms_norm_kernel() -> str:
    return RMS_NORM_CU


def rms_norm_blocked(x: np.ndarray, weight: np.ndarray, eps: float, threads: int = 128) -> np.ndarray:
    # [rows, d], [d] -> [rows, d]: every block's arithmetic at once, in the kernel's order
    x = np.asarray(x, dtype=np.float32)
    rows, d = x.shape
    padded = np.zeros(
        (rows, -(-d // threads) * threads), np.float32
    )  # zeros past d: threads with nothing to do
    padded[:, :d] = x * x
    partial = padded.reshape(rows, -1, threads).sum(
        axis=1, dtype=np.float32
    )  # [rows, threads] per-thread sums
    while partial.shape[1] > 1:  # the tree: partial[t] += partial[t + half] for the first half
        half = partial.shape[1] // 2
        partial = partial[:, :half] + partial[:, half : 2 * half]
    scale = np.float32(1.0) / np.sqrt(partial / np.float32(d) + np.float32(eps))  # [rows, 1]
    return x * scale * np.asarray(weight, np.float32)


ROPE_CU = r"""
// split-half RoPE, one thread per rotated pair (j, j + d/2) of one row (b, h, t)
extern "C" __global__ void rope_f32(const float* x, const float* cos, const float* sin, float* out,
                                    int B, int H, int T, int d) {
    const int half = d / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // long long: B*H*T*d may pass 2^31
    if (i >= (long long)B * H * T * half) return;  // the launch rounds up to whole blocks
    const int j = (int)(i % half);
    const long long r = i / half;
    const int t = (int)(r % T);
    const long long b = r / ((long long)T * H);
    const long long cs = (b * T + t) * d;  // this position's row of cos and sin
    const float a = x[r * d + j], e = x[r * d + j + half];
    out[r * d + j] = a * cos[cs + j] - e * sin[cs + j];
    out[r * d + j + half] = e * cos[cs + j + half] + a * sin[cs + j + half];
}
"""


def rope_kernel() -> str:
    return ROPE_CU


def rope_by_thread(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [B, H, T, d], [B, T, d] x2 -> [B, H, T, d]: every thread's indices at once
    B, H, T, d = x.shape
    half = d // 2
    i = np.arange(B * H * T * half)  # one entry per thread
    j, r = i % half, i // half  # the pair, and the row (b, h, t) flattened
    t, b = r % T, r // (T * H)
    xs = np.asarray(x, np.float32).reshape(B * H * T, d)
    c = np.asarray(cos, np.float32).reshape(B * T, d)
    s = np.asarray(sin, np.float32).reshape(B * T, d)
    a, e = xs[r, j], xs[r, j + half]
    out = np.empty_like(xs)
    out[r, j] = a * c[b * T + t, j] - e * s[b * T + t, j]
    out[r, j + half] = e * c[b * T + t, j + half] + a * s[b * T + t, j + half]
    return out.reshape(x.shape)


def sample_inverse_cdf(
    logits: np.ndarray, temperature: float, u: np.ndarray
) -> np.ndarray:  # [B, V], [B] -> [B]
    logits = np.asarray(logits, np.float32)
    weights = np.exp(
        (logits - logits.max(axis=-1, keepdims=True)) / np.float32(temperature)
    )  # [B, V] no overflow
    cdf = np.cumsum(weights, axis=-1, dtype=np.float32)  # [B, V] the CDF times `total` = cdf[:, -1]
    target = np.asarray(u, np.float32) * cdf[:, -1]  # [B]
    # the first id whose cumulative weight EXCEEDS the target (strict); V - 1 if rounding leaves none
    ids = [
        int(np.argmax(row > t)) if (row > t).any() else len(row) - 1
        for row, t in zip(cdf, target, strict=True)
    ]
    return np.array(ids, dtype=np.int64)


SIGN = np.uint64(1 << 63)


def order_key(values: np.ndarray) -> np.ndarray:  # [n] float64 -> [n] uint64
    bits = (np.asarray(values, np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into +0.0
    negative = (bits & SIGN) != 0
    # positives: set the sign bit (above every negative); negatives: flip every bit (larger magnitude = smaller)
    return np.where(negative, ~bits, bits | SIGN)


def top_k_cut(values: np.ndarray, k: int) -> tuple[float, list[int]]:
    keys = order_key(values)  # [n]
    candidates, needed, trace = keys, k, []
    for shift in range(56, -1, -8):  # the most significant byte first
        trace.append(int(candidates.size))
        digit = ((candidates >> np.uint64(shift)) & np.uint64(255)).astype(np.int64)
        bins = np.bincount(digit, minlength=256)  # [256]
        d = 255
        while bins[d] < needed:  # walk down from the largest byte until the k-th largest is in bin d
            needed -= int(bins[d])
            d -= 1
        candidates = candidates[digit == d]
    return float(values[np.flatnonzero(keys == candidates[0])[0]]), trace  # they all share one key now
