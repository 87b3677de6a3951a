"""Chapter 11 solutions: the cupy backend's own CUDA sources (backends/cuda/norm.cu, rope.cu) and their NumPy twins
(`tinyqwen.backends.cupy.NumpyTwins`), whose sampling is the device's inverse CDF."""

from __future__ import annotations

import numpy as np

from tinyqwen.backends.cupy import KERNEL_DIR, NumpyTwins, key_value, order_keys, radix_select_kth

_TWINS = NumpyTwins()


def decode_ceiling(
    weights_per_token: int, bytes_per_weight: float, bandwidth_gb_s: float, peak_tflops: float, batch: int = 1
) -> float:
    # the roofline of tinyqwen/bench's decode bandwidth: a step reads the weights once and does 2 flops per
    # weight per sequence; it lasts as long as the slower of the two
    read_s = weights_per_token * bytes_per_weight / (bandwidth_gb_s * 1e9)
    compute_s = 2 * weights_per_token * batch / (peak_tflops * 1e12)
    return batch / max(read_s, compute_s)


def rms_norm_kernel() -> str:
    # norm.cu includes common.cuh (its block_sum), found on the include path compile_ptx gives NVRTC
    return (KERNEL_DIR / "norm.cu").read_text()


def rms_norm_blocked(x: np.ndarray, weight: np.ndarray, eps: float, threads: int = 128) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return _TWINS.rms_norm(x.reshape(-1, x.shape[-1]), np.asarray(weight, np.float32), eps).reshape(x.shape)


def rope_kernel() -> str:
    return (KERNEL_DIR / "rope.cu").read_text()


def rope_by_thread(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    return _TWINS.rope(np.asarray(x, np.float32), np.asarray(cos, np.float32), np.asarray(sin, np.float32))


def sample_inverse_cdf(logits: np.ndarray, temperature: float, u: np.ndarray) -> np.ndarray:
    return _TWINS.sample(np.asarray(logits, np.float32), temperature, np.asarray(u, np.float32))


def order_key(values: np.ndarray) -> np.ndarray:
    return order_keys(np.asarray(values, np.float64))


def top_k_cut(values: np.ndarray, k: int) -> tuple[float, list[int]]:
    trace: list[int] = []
    key = radix_select_kth(order_key(values), k, trace)
    return key_value(key), trace
