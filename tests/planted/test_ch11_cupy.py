"""Planted mistakes for chapter 11: classic roofline, CUDA, index-arithmetic and sampling bugs, injected into the
solutions, fail with the intended hint. The CUDA ones are caught by compiling with NVRTC (no GPU needed), or by running
the kernel on the tests' CPU executor of CUDA C (a missing barrier)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cupy", reason="the gpu extra (CuPy, NVRTC, CUDA headers) is not installed")

from exercises import test_ch11_cupy as grading  # noqa: E402
from exercises.solutions import ch11_cupy as solution  # noqa: E402

# ------------------------------------------------------------------------------------------ the roofline


def ceiling_without_bytes(w, b, bw, tf, batch=1):  # weights counted as bytes
    return solution.decode_ceiling(w, 1, bw, tf, batch)


def ceiling_adding_times(w, b, bw, tf, batch=1):  # read and compute do not overlap
    return batch / (w * b / (bw * 1e9) + 2 * w * batch / (tf * 1e12))


def ceiling_ignoring_batch(w, b, bw, tf, batch=1):
    return solution.decode_ceiling(w, b, bw, tf, 1)


@pytest.mark.parametrize(
    "buggy, checkpoint, hint",
    [
        (ceiling_without_bytes, grading.test_roofline_batch_1, "bytes per weight"),
        (ceiling_adding_times, grading.test_roofline_batch_1024, "max(read, compute)"),
        (ceiling_ignoring_batch, grading.test_roofline_batch_1024, "the batch was ignored"),
    ],
)
def test_roofline_mistakes(solutions, assert_caught, buggy, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch11", decode_ceiling=buggy), hint=hint)


# ------------------------------------------------------------------------------------------ CUDA sources

GOOD = """
extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out, int d, float eps) {
    __shared__ float partial[128];
    const float* row = x + (long long)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += row[j] * row[j];
    partial[threadIdx.x] = ss;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf(partial[0] / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)blockIdx.x * d + j] = row[j] * scale * weight[j];
}
"""


def test_the_planted_kernels_start_from_a_good_one(solutions):
    grading.test_rms_norm_kernel_compiles(solutions.with_overrides("ch11", rms_norm_kernel=lambda: GOOD))


@pytest.mark.parametrize(
    "source, hint",
    [
        (GOOD.replace('extern "C" ', ""), 'declare it extern "C"'),  # C++ mangles the name
        (GOOD.replace("ss += row[j] * row[j];", "ss += row[j] * row[j]"), "does not compile for compute_75"),
        (GOOD.replace("float eps)", "double eps)"), "parameters compile to PTX types"),
        (GOOD.replace("rms_norm_f32(", "rmsnorm("), "defines no kernel named rms_norm_f32"),
    ],
    ids=["no-extern-C", "syntax-error", "double-eps", "wrong-name"],
)
def test_kernel_source_mistakes(solutions, assert_caught, source, hint):
    buggy = solutions.with_overrides("ch11", rms_norm_kernel=lambda: source)
    assert_caught(grading.test_rms_norm_kernel_compiles, buggy, hint=hint)


def test_a_missing_barrier_is_caught_by_running_the_kernel(solutions, assert_caught):
    # it compiles, and a NumPy twin of it is right: only running it (threads that really wait at barriers) shows it
    racy = GOOD.replace(
        "partial[threadIdx.x + half];\n        __syncthreads();", "partial[threadIdx.x + half];"
    )
    assert racy != GOOD
    buggy = solutions.with_overrides("ch11", rms_norm_kernel=lambda: racy)
    assert_caught(grading.test_rms_norm_kernel_compiles, buggy, hint="rms_norm_f32 on the CPU executor")


def test_rope_kernel_with_a_wrong_signature(solutions, assert_caught):
    wrong = solution.rope_kernel().replace("int B, int H, int T, int d", "long long B, int H, int T, int d")
    buggy = solutions.with_overrides("ch11", rope_kernel=lambda: wrong)
    assert_caught(grading.test_rope_kernel_compiles, buggy, hint="parameters compile to PTX types")


# ------------------------------------------------------------------------------------------ the twins


def norm_by_threads(x, weight, eps, threads=128):  # the mean over the threads, not over d
    x = np.asarray(x, np.float32)
    return x / np.sqrt((x * x).sum(-1, keepdims=True) / np.float32(threads) + np.float32(eps)) * weight


def norm_layer(x, weight, eps, threads=128):  # LayerNorm's mean subtraction
    x = np.asarray(x, np.float32)
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt((c * c).mean(-1, keepdims=True) + np.float32(eps)) * weight


def norm_thread_zero(x, weight, eps, threads=128):  # no block reduction: thread 0's partial sum only
    x = np.asarray(x, np.float32)
    return (
        x
        / np.sqrt((x[:, ::threads] ** 2).sum(-1, keepdims=True) / np.float32(x.shape[1]) + np.float32(eps))
        * weight
    )


@pytest.mark.parametrize(
    "buggy, checkpoint, hint",
    [
        (norm_by_threads, grading.test_rms_norm_blocked_odd, "divide the block's total by d"),
        (norm_layer, grading.test_rms_norm_blocked_wide, "LayerNorm"),
        (norm_thread_zero, grading.test_rms_norm_blocked_odd, "block reduction is missing"),
    ],
)
def test_rms_norm_twin_mistakes(solutions, assert_caught, buggy, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch11", rms_norm_blocked=buggy), hint=hint)


def rope_interleaved(x, cos, sin):  # pairs (2i, 2i+1)
    out = np.empty_like(x)
    c, s = cos[:, None], sin[:, None]
    out[..., 0::2] = x[..., 0::2] * c[..., 0::2] - x[..., 1::2] * s[..., 0::2]
    out[..., 1::2] = x[..., 1::2] * c[..., 1::2] + x[..., 0::2] * s[..., 1::2]
    return out


def rope_wrong_batch(x, cos, sin):  # b = r // T: the head index leaks into the batch index
    B, H, T, d = x.shape
    half = d // 2
    i = np.arange(B * H * T * half)
    j, r = i % half, i // half
    t, b = r % T, np.minimum(r // T, B - 1)
    xs, cs, ss = x.reshape(-1, d), cos.reshape(-1, d), sin.reshape(-1, d)
    a, e = xs[r, j], xs[r, j + half]
    out = np.empty_like(xs)
    out[r, j] = a * cs[b * T + t, j] - e * ss[b * T + t, j]
    out[r, j + half] = e * cs[b * T + t, j + half] + a * ss[b * T + t, j + half]
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "buggy, checkpoint, hint",
    [
        (rope_interleaved, grading.test_rope_by_thread_quarter_turn, "split-half"),
        (rope_wrong_batch, grading.test_rope_by_thread_like_transformers, "b = r / (T·H)"),
        (rope_wrong_batch, grading.test_real_model, "left-padded batch"),
    ],
)
def test_rope_twin_mistakes(solutions, assert_caught, buggy, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch11", rope_by_thread=buggy), hint=hint)


def sample_reaching(logits, temperature, u):  # >= instead of >
    w = np.exp((logits - logits.max(-1, keepdims=True)) / temperature)
    cdf = np.cumsum(w, -1)
    return np.array(
        [
            min(int(np.searchsorted(c, t * c[-1], side="left")), c.size - 1)
            for c, t in zip(cdf, u, strict=True)
        ]
    )


def sample_no_max(logits, temperature, u):  # exp of the raw logits: overflows for large ones
    with np.errstate(over="ignore", invalid="ignore"):
        cdf = np.cumsum(np.exp(np.asarray(logits, np.float32) / np.float32(temperature)), -1)
        return np.array(
            [
                min(int(np.searchsorted(c, t * c[-1], side="right")), c.size - 1)
                for c, t in zip(cdf, u, strict=True)
            ]
        )


def sample_cold(logits, temperature, u):  # the temperature is forgotten
    return solution.sample_inverse_cdf(logits, 1.0, u)


@pytest.mark.parametrize(
    "buggy, checkpoint, hint",
    [
        (sample_reaching, grading.test_sample_by_hand, "Strictly greater"),
        (sample_no_max, grading.test_sample_like_torch, "maximum was not subtracted"),
        (sample_cold, grading.test_sample_like_torch, "temperature was not applied"),
    ],
)
def test_sampling_mistakes(solutions, assert_caught, buggy, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch11", sample_inverse_cdf=buggy), hint=hint)


# ------------------------------------------------------------------------------------------ radix select


def key_flipping_the_sign_only(values):  # negatives keep their backwards order
    return np.asarray(values, np.float64).__add__(0.0).view(np.uint64) ^ np.uint64(1 << 63)


def key_keeping_negative_zero(values):  # -0.0 gets its own key, below 0.0
    bits = np.asarray(values, np.float64).view(np.uint64)
    return np.where(bits >> np.uint64(63) == 1, ~bits, bits | np.uint64(1 << 63))


def cut(values, k, walk_up=False, subtract=True):  # a learner's radix select, with one of two slips
    keys = solution.order_key(values)
    prefix, fixed, needed, trace = 0, 0, k, []
    for shift in range(56, -1, -8):
        live = keys[(keys & np.uint64(fixed)) == np.uint64(prefix)]
        trace.append(live.size)
        bins = np.bincount(((live >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), minlength=256)
        d = 0 if walk_up else 255
        while bins[d] < needed:  # without subtracting, this runs off the bins (bins[-1], ... then IndexError)
            if subtract:
                needed -= bins[d]
            d = d + 1 if walk_up else d - 1
        prefix, fixed = prefix | d << shift, fixed | 255 << shift
    hit = np.asarray(values)[keys == np.uint64(prefix)]
    return (float(hit[0]) if hit.size else float("nan")), trace


@pytest.mark.parametrize(
    "overrides, checkpoint, hint",
    [
        ({"order_key": key_flipping_the_sign_only}, grading.test_order_key_by_hand, "flip every bit"),
        ({"order_key": key_keeping_negative_zero}, grading.test_order_key_by_hand, "add 0.0"),
        ({"order_key": key_flipping_the_sign_only}, grading.test_order_key_sorts_like_the_values, "~bits"),
        ({"top_k_cut": lambda v, k: cut(v, k, walk_up=True)}, grading.test_top_k_cut_by_hand, "from 255"),
        (
            {"top_k_cut": lambda v, k: cut(v, k, subtract=False)},
            grading.test_top_k_cut_like_torch,
            "subtract",
        ),
    ],
    ids=["sign-bit-only", "negative-zero", "sign-bit-only-order", "walk-up", "no-subtract"],
)
def test_radix_select_mistakes(solutions, assert_caught, overrides, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch11", **overrides), hint=hint)
