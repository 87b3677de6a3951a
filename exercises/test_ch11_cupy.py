"""Chapter 11 checkpoints: the decode roofline, an RMSNorm and a RoPE kernel in CUDA C, their NumPy twins, device sampling
(the inverse CDF; radix select's keys and top-k cut).

Expected values: the roofline numbers are derived by hand in this file (the arithmetic is written next to each);
RMSNorm, RoPE and the sampled ids come from transformers and torch (exercises/references/make_ch11_cupy.py →
ch11_cupy.npz): Qwen3RMSNorm, Qwen3RotaryEmbedding + apply_rotary_pos_emb, and torch.softmax in float64 for the
inverse CDF, torch.topk for the top-k cuts. The keys' bit patterns are derived by hand (IEEE 754 doubles); their
order is NumPy's sort of the values. The last checkpoint compares a fixture model's logits with transformers' stored
ones.

The CUDA sources are graded by compiling them with NVRTC for every architecture in ARCHITECTURES (no GPU needed: the
`gpu` extra brings NVRTC and the CUDA headers), by checking the kernel's name and parameter types in the PTX, and by
running them: on the tests' CPU executor of CUDA C everywhere (g++; each CUDA thread a fiber, so barriers really
wait; forward and reverse thread order), and on the GPU where there is one.

Tolerances: RMSNorm against torch ≤ 1e-5 relative (one float32 sum of squares, in another order); RoPE exact to
1e-6 (two products and a sum per value, as torch); sampled ids exactly (the float32 CDF and torch's float64 one
differ by ~1e-7, far from every boundary of these inputs); the roofline to 1e-9 relative.
"""

from __future__ import annotations

import functools
import json
import re

import numpy as np

from exercises.grading import (
    Mistake,
    call,
    expect,
    expect_close,
    expect_equal,
    expect_logits,
    notebook,
    reference,
    reference_file,
)

REF = reference_file("ch11_cupy.npz")
reread = functools.partial(notebook, 11)
ROOFLINE = reread("2. Why decode is bandwidth-bound: the roofline")
RMSNORM = reread("4. Writing an RMSNorm kernel")
ROPE = reread("5. Writing a RoPE kernel")
SAMPLING = reread("7. Sampling on the device")
FILTERS = reread("Every sampling option on the device")
WHOLE = reread("8. The whole backend, without a GPU")

# Qwen3-0.6B decode on an H100 SXM (published specs): 595,984,384 weights per token (chapter 10's count), bf16,
# 3,350 GB/s HBM3, 989 TFLOPS of dense bf16 tensor-core math
QWEN3_06B = 595_984_384
H100_GB_S, H100_TFLOPS = 3350.0, 989.0


# ------------------------------------------------------------------------------------------ the roofline


def _ceiling_mistakes(w: int, b: float, bw: float, tf: float, batch: int) -> list[Mistake]:
    right_read, right_compute = w * b / (bw * 1e9), 2 * w * batch / (tf * 1e12)
    return [
        Mistake("the bytes per weight were left out (weights counted as bytes)",
                batch / max(w / (bw * 1e9), right_compute), "A step reads weights_per_token · bytes_per_weight bytes."),
        Mistake("one flop per weight instead of two (a multiply AND an add)",
                batch / max(right_read, w * batch / (tf * 1e12)), "A multiply-add is 2 flops per weight per sequence."),
        Mistake("GB was taken as 2**30 bytes", batch / max(w * b / (bw * 2**30), right_compute),
                "Spec sheets count GB/s as 1e9 bytes per second."),
        Mistake("the batch was ignored: one token per step", 1 / max(right_read, 2 * w / (tf * 1e12)),
                "A step of a batch yields `batch` tokens, and its flops grow with the batch; its bytes do not."),
        Mistake("the two times were added instead of taking the longer", batch / (right_read + right_compute),
                "Reading and computing overlap: the slower of the two sets the step's time, max(read, compute)."),
    ]  # fmt: skip


def _check_ceiling(ch, batch: int, want: float, what: str) -> None:
    args = (QWEN3_06B, 2, H100_GB_S, H100_TFLOPS)
    got = call(ch.decode_ceiling, *args, kwargs={"batch": batch}, what=what, reread=ROOFLINE)
    expect_close(got, want, atol=0.0, rtol=1e-9, what=what, reread=ROOFLINE,
                 inputs=f"Qwen3-0.6B bf16 ({QWEN3_06B:,} weights), 3,350 GB/s, 989 TFLOPS, batch {batch}",
                 mistakes=_ceiling_mistakes(*args, batch))  # fmt: skip


def test_roofline_batch_1(course):
    """Qwen3-0.6B decode on an H100: the bandwidth ceiling"""
    # by hand: 595,984,384 · 2 B = 1.192 GB per step / 3.35e12 B/s = 355.7 µs; flops 1.19e9 / 9.89e14 = 1.2 µs
    want = 3350e9 / (QWEN3_06B * 2)  # memory-bound: 2,810.5 tokens/s
    _check_ceiling(course.ch11, 1, want, "decode_ceiling(Qwen3-0.6B, bf16, H100, batch=1)")


def test_roofline_batch_1024(course):
    """A batch of 1024 turns decode compute-bound"""
    # by hand: reading still takes 355.7 µs, but 2 · 595,984,384 · 1024 flops / 9.89e14 = 1,234 µs: compute-bound
    want = 989e12 / (2 * QWEN3_06B)  # 1024 / (1024 · 2W / peak) = 829,720 tokens/s
    _check_ceiling(course.ch11, 1024, want, "decode_ceiling(Qwen3-0.6B, bf16, H100, batch=1024)")


# ------------------------------------------------------------------------------------------ CUDA sources


def _ptx_params(ptx: str, kernel: str) -> list[str] | None:
    """The PTX types of `kernel`'s parameters (.u64 for pointers, .u32 for int, .f32 for float), or None."""
    found = re.search(rf"\.entry\s+{kernel}\s*\((.*?)\)", ptx, re.S)
    return None if found is None else re.findall(r"\.param\s+\.(\w+)", found.group(1))


def _compile(source_fn, kernel: str, params: list[str], signature: str, section: str) -> str:
    """The learner's source compiled for both architectures, its kernel's signature checked. Returns the source."""
    from tinyqwen.backends.cupy import ARCHITECTURES, compile_ptx, nvrtc_unavailable_reason
    from tinyqwen.errors import BackendError

    what = f"{'rms_norm_kernel' if kernel == 'rms_norm_f32' else 'rope_kernel'}() compiled by NVRTC"
    source = call(source_fn, what=what, reread=section)
    expect(isinstance(source, str), what=what, reread=section,
           problem=f"expected the kernel's CUDA C source as a str, got {type(source).__name__}")  # fmt: skip
    missing = nvrtc_unavailable_reason()
    if missing is not None:  # a learner's install without the gpu extra: the CPU executor below still runs it
        print(f"\n{kernel}: NVRTC compile and PTX signature check skipped ({missing})")
        return source
    for arch in ARCHITECTURES:
        try:
            ptx = compile_ptx(source, arch, name=f"{kernel}.cu")
        except BackendError as error:
            expect(False, what=f"{what} for {arch}", reread=section,
                   problem=f"{error}\n(NVRTC's log: file(line): error, then the line and a caret under the spot)")  # fmt: skip
        got = _ptx_params(ptx, kernel)
        if got is None:
            mangled = re.search(rf"\.entry\s+(_Z\w*{kernel}\w*)", ptx)
            problem = (f"the source defines no kernel named {kernel}"
                       + (f" (it has {mangled.group(1)}: a C++-mangled name — declare it extern \"C\")" if mangled
                          else f": write `extern \"C\" __global__ void {kernel}(...)`"))  # fmt: skip
            expect(False, what=f"{what} for {arch}", reread=section, problem=problem)
        expect(got == params, what=f"{what} for {arch}", reread=section,
               problem=f"{kernel}'s parameters compile to PTX types {got}, expected {params}: the signature must be "
               f"{signature} (pointers are .u64, int .u32, float .f32, double .f64)")  # fmt: skip
    return source


def _engines() -> list[tuple[str, object, object]]:
    """Where your kernels run: [(name, array namespace, module loader)]. The tests' CPU executor of CUDA C
    (tests/cuda_executor: each CUDA thread a fiber, barriers that really wait) everywhere, in forward and reverse
    thread order (a missing __syncthreads shows as a difference); the GPU too where there is one."""
    import sys
    from pathlib import Path

    from tinyqwen.backends.cupy import KERNEL_DIR, gpu_unavailable_reason

    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from cuda_executor import RawModule, device

    engines = [
        (f"the CPU executor ({order} thread order)", device,
         lambda code, order=order: RawModule(code, (f"-I{KERNEL_DIR}",), order=order))
        for order in ("forward", "reverse")
    ]  # fmt: skip
    if gpu_unavailable_reason() is None:
        import cupy

        from tinyqwen.backends.cupy import compile_options

        engines.append(
            ("the GPU", cupy, lambda code: cupy.RawModule(code=code, options=tuple(compile_options())))
        )
    return engines


def _run(load, source: str, kernel: str, launch, what: str, section: str):
    """Compile `source` with `load` and launch `kernel` through `launch(kernel)`; a clear failure if either fails."""
    try:
        launch(load(source).get_function(kernel))
    except (
        Exception
    ) as error:  # the executor's build log, a barrier or shuffle misuse, a launch argument error
        expect(False, what=what, reread=section, problem=f"{type(error).__name__}: {error}"[:3000])


def _norm_mistakes(x, w, eps, threads=128) -> list[Mistake]:
    x64 = x.astype(np.float64)
    ms = (x64**2).mean(-1, keepdims=True)
    centred = x64 - x64.mean(-1, keepdims=True)
    return [
        Mistake("the mean was subtracted (that is LayerNorm)", lambda: centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * w,
                "RMSNorm never subtracts the mean: x / sqrt(mean(x²) + eps) · weight."),
        Mistake("the sum of squares was divided by the number of threads, not by d",
                lambda: x64 / np.sqrt((x64**2).sum(-1, keepdims=True) / threads + eps) * w,
                "The mean is over the d values of the row: divide the block's total by d."),
        Mistake("only thread 0's partial sum was used (the block reduction is missing)",
                lambda: x64 / np.sqrt((x64[:, ::threads] ** 2).sum(-1, keepdims=True) / x.shape[1] + eps) * w,
                "Add all the threads' partial sums (the tree: partial[t] += partial[t + half], halving each step)."),
        Mistake("the weight was not applied", lambda: x64 / np.sqrt(ms + eps),
                "Multiply each normalised value by weight[j]."),
        Mistake("the row was multiplied by the root mean square instead of divided", lambda: x64 * np.sqrt(ms + eps) * w,
                "Scale by 1 / sqrt(mean(x²) + eps)."),
    ]  # fmt: skip


def test_rms_norm_kernel_compiles(course):
    """Your RMSNorm kernel compiles for every architecture and runs: on the CPU executor, and on a GPU if there is one"""
    signature = "rms_norm_f32(const float* x, const float* weight, float* out, int d, float eps)"
    source = _compile(course.ch11.rms_norm_kernel, "rms_norm_f32", ["u64", "u64", "u64", "u32", "f32"], signature,
                      RMSNORM)  # fmt: skip
    for engine, xp, load in _engines():
        for case in ("odd", "head", "wide"):
            x, w, want = (REF[f"rmsnorm.{case}.{k}"] for k in ("x", "weight", "y"))
            out = xp.empty(x.shape, np.float32)
            args = (xp.asarray(x), xp.asarray(w), out, np.int32(x.shape[1]), np.float32(1e-6))
            what = f"rms_norm_f32 on {engine}, {case}"
            _run(load, source, "rms_norm_f32", lambda k: k((x.shape[0],), (128,), args), what, RMSNORM)  # noqa: B023
            expect_close(out.get(), want, atol=1e-5 * max(1.0, float(np.abs(want).max())), what=what,
                         inputs=f"x {list(x.shape)}", reread=RMSNORM, mistakes=_norm_mistakes(x, w, 1e-6))  # fmt: skip


def _check_blocked(ch, case: str, threads: int) -> None:
    x, w, want = (REF[f"rmsnorm.{case}.{k}"] for k in ("x", "weight", "y"))
    given = x.copy()
    what = (
        f"rms_norm_blocked(x {list(x.shape)}, weight, 1e-6, threads={threads}) vs transformers' Qwen3RMSNorm"
    )
    got = call(
        ch.rms_norm_blocked, given, w.copy(), 1e-6, kwargs={"threads": threads}, what=what, reread=RMSNORM
    )
    expect_close(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())), what=what, reread=RMSNORM,
                 inputs=f"x {list(x.shape)}: d = {x.shape[1]}, {threads} threads",
                 mistakes=_norm_mistakes(x, w, 1e-6, threads))  # fmt: skip
    expect(
        np.array_equal(given, x), what=what, reread=RMSNORM, problem="rms_norm_blocked changed its input x"
    )


def test_rms_norm_blocked_odd(course):
    """RMSNorm as a block of 128 threads computes it, d not a multiple of 32"""
    _check_blocked(course.ch11, "odd", 128)


def test_rms_norm_blocked_wide(course):
    """RMSNorm over 1024 channels with 32 threads, and QK-Norm over a head"""
    _check_blocked(course.ch11, "wide", 32)
    _check_blocked(course.ch11, "head", 128)


def _rope_mistakes(x, cos, sin) -> list[Mistake]:
    half = x.shape[-1] // 2
    c, s = cos[:, None], sin[:, None]
    interleaved = np.empty_like(x)
    interleaved[..., 0::2] = x[..., 0::2] * c[..., 0::2] - x[..., 1::2] * s[..., 0::2]
    interleaved[..., 1::2] = x[..., 1::2] * c[..., 1::2] + x[..., 0::2] * s[..., 1::2]
    wrong_b = np.empty_like(
        x
    )  # the classic slip: b = r / T, forgetting to divide by H as well (clipped to B - 1)
    B, H, T, d = x.shape
    r = np.arange(B * H * T)
    bb = np.minimum(r // T, B - 1)
    flat = x.reshape(-1, d)
    cc, ss = cos[bb, r % T], sin[bb, r % T]
    wrong_b.reshape(-1, d)[:, :half] = flat[:, :half] * cc[:, :half] - flat[:, half:] * ss[:, :half]
    wrong_b.reshape(-1, d)[:, half:] = flat[:, half:] * cc[:, half:] + flat[:, :half] * ss[:, half:]
    return [
        Mistake("neighbouring channels (2i, 2i+1) were paired: the interleaved layout", interleaved,
                "Qwen3 uses the split-half layout: channel j turns with channel j + d/2."),
        Mistake("the batch row of cos/sin was taken as r / T, without dividing by H too", wrong_b,
                "r runs over (b, h, t): t = r % T, b = r / (T·H)."),
        Mistake("the sign of the sine term is flipped (a rotation the other way)",
                np.concatenate([x[..., :half] * c[..., :half] + x[..., half:] * s[..., :half],
                                x[..., half:] * c[..., half:] - x[..., :half] * s[..., half:]], -1),
                "out[j] = x[j]·cos − x[j+d/2]·sin; out[j+d/2] = x[j+d/2]·cos + x[j]·sin."),
    ]  # fmt: skip


def test_rope_kernel_compiles(course):
    """Your RoPE kernel compiles for every architecture and runs: on the CPU executor, and on a GPU if there is one"""
    signature = (
        "rope_f32(const float* x, const float* cos, const float* sin, float* out, int B, int H, int T, int d)"
    )
    source = _compile(course.ch11.rope_kernel, "rope_f32", ["u64"] * 4 + ["u32"] * 4, signature, ROPE)
    x, cos, sin, want = (REF[f"rope.{k}"] for k in ("x", "cos", "sin", "y"))
    B, H, T, d = x.shape
    n = B * H * T * d // 2
    for engine, xp, load in _engines():
        out = xp.empty(x.shape, np.float32)
        args = (xp.asarray(x), xp.asarray(cos), xp.asarray(sin), out, *(np.int32(v) for v in (B, H, T, d)))
        what = f"rope_f32 on {engine}"
        _run(load, source, "rope_f32", lambda k: k(((n + 255) // 256,), (256,), args), what, ROPE)  # noqa: B023
        expect_close(out.get(), want, atol=1e-6, what=what, inputs=f"x {list(x.shape)}", reread=ROPE,
                     mistakes=_rope_mistakes(x, cos, sin))  # fmt: skip


def test_rope_by_thread_quarter_turn(course):
    """RoPE from the thread index: a quarter turn by hand"""
    x = np.array([[[[1.0, 2.0, 3.0, 4.0]]]], np.float32)
    cos, sin = np.zeros((1, 1, 4), np.float32), np.ones((1, 1, 4), np.float32)
    # by hand: pairs (x0, x2) = (1, 3) and (x1, x3) = (2, 4) turn by 90°: (a, e) -> (-e, a)
    what = "rope_by_thread([[[[1, 2, 3, 4]]]], cos = 0, sin = 1)"
    got = call(course.ch11.rope_by_thread, x.copy(), cos, sin, what=what, reread=ROPE)
    expect_close(got, np.array([[[[-3.0, -4.0, 1.0, 2.0]]]], np.float32), atol=1e-6, what=what, reread=ROPE,
                 mistakes=_rope_mistakes(x, cos, sin))  # fmt: skip


def test_rope_by_thread_like_transformers(course):
    """RoPE from the thread index, two rows at different positions, as transformers"""
    x, cos, sin, want = (REF[f"rope.{k}"] for k in ("x", "cos", "sin", "y"))
    given = x.copy()
    what = "rope_by_thread(x [2, 3, 5, 16], cos, sin) vs transformers' apply_rotary_pos_emb"
    got = call(course.ch11.rope_by_thread, given, cos.copy(), sin.copy(), what=what, reread=ROPE)
    expect_close(got, want, atol=1e-6, what=what, reread=ROPE, mistakes=_rope_mistakes(x, cos, sin),
                 inputs="B = 2 rows at positions 0..4 and 7..11, H = 3 heads, T = 5, d = 16")  # fmt: skip
    expect(np.array_equal(given, x), what=what, reread=ROPE, problem="rope_by_thread changed its input x")


# ------------------------------------------------------------------------------------------ sampling


def _sample_mistakes(logits, temperature, u) -> list[Mistake]:
    def pick(weights, side="right"):
        cdf = np.cumsum(weights, -1)
        return [
            min(int(np.searchsorted(c, t * c[-1], side=side)), c.size - 1)
            for c, t in zip(cdf, u, strict=True)
        ]

    x, temperature = logits.astype(np.float32), np.float32(temperature)  # float32, as the kernel
    top = x.max(-1, keepdims=True)
    return [
        Mistake("the first id whose cumulative weight reaches u·total (>=) was taken, not the first that exceeds it",
                lambda: pick(np.exp((x - top) / temperature), side="left"),
                "Strictly greater: np.searchsorted(cdf, target, side='right'), or `cumulative > target` in a loop."),
        Mistake("the temperature was not applied", lambda: pick(np.exp(x - top)),
                "Divide (logits - max) by the temperature before exp()."),
        Mistake("the logits were multiplied by the temperature instead of divided",
                lambda: pick(np.exp((x - top) * temperature)), "Temperature T divides: exp((l - max) / T)."),
        Mistake("the greedy arg-max was returned", lambda: np.argmax(logits, -1).tolist(),
                "Sampling draws from all ids by their probability: the inverse CDF of u."),
    ]  # fmt: skip


def _no_max(logits, temperature, u) -> list[int]:  # exp(logits / T) in float32, no max subtracted: infs
    with np.errstate(over="ignore", invalid="ignore"):
        cdf = np.cumsum(np.exp(logits / np.float32(temperature)), -1)
        return [
            min(int(np.searchsorted(c, t * c[-1], side="right")), c.size - 1)
            for c, t in zip(cdf, u, strict=True)
        ]


def test_sample_by_hand(course):
    """Inverse-CDF sampling at the boundaries, by hand"""
    logits = np.full((5, 4), 3.0, np.float32)
    u = np.array([0.1, 0.25, 0.5, 0.6, 0.75], np.float32)
    # by hand: four equal logits weigh exp(0) = 1 each, at any temperature and in any precision: cumulative weights
    # [1, 2, 3, 4], total 4, targets 4u = [0.4, 1, 2, 2.4, 3]; the first weight exceeding each: 0, 1 (1 does not
    # exceed 1), 2, 2, 3
    what = "sample_inverse_cdf(four equal logits, temperature 0.8, u = [0.1, 0.25, 0.5, 0.6, 0.75])"
    got = call(course.ch11.sample_inverse_cdf, logits, 0.8, u.copy(), what=what, reread=SAMPLING)
    expect_equal(np.asarray(got).tolist() if got is not None else got, [0, 1, 2, 2, 3], what=what, reread=SAMPLING,
                 mistakes=_sample_mistakes(logits, 0.8, u))  # fmt: skip


def test_sample_like_torch(course):
    """Warm, hot and huge logits sampled like torch's softmax in float64"""
    for case in ("warm", "hot", "big"):
        logits, u, want = (REF[f"sample.{case}.{k}"] for k in ("logits", "u", "ids"))
        t = float(REF[f"sample.{case}.temperature"])
        what = f"sample_inverse_cdf(logits {list(logits.shape)} of size ~{np.abs(logits).max():.0f}, temperature {t})"
        got = call(course.ch11.sample_inverse_cdf, logits.copy(), t, u.copy(), what=what, reread=SAMPLING,
                   hints={"overflow": "exp() of large logits overflows float32: subtract the row's maximum first."})  # fmt: skip
        mistakes = _sample_mistakes(logits, t, u)
        if case == "big":
            mistakes.append(Mistake("the maximum was not subtracted before exp(): exp overflows to inf",
                                    lambda lg=logits, uu=u, tt=t: _no_max(lg, tt, uu),
                                    "Subtract each row's maximum logit before exp(); it cancels in the ratio."))  # fmt: skip
        expect_equal(np.asarray(got).tolist() if got is not None else got, want.tolist(), what=what,
                     reread=SAMPLING, mistakes=mistakes, inputs=f"u = {np.round(u[:4], 3).tolist()} …")  # fmt: skip


# ------------------------------------------------------------------------------------------ radix select

SIGN = np.uint64(1 << 63)


def _key_variants(values) -> dict[str, np.ndarray]:
    """Keys a classic slip gives (the right ones are derived in the tests by hand or by NumPy's sort)."""
    v = np.asarray(values, np.float64)
    bits, canon = v.view(np.uint64), (v + 0.0).view(np.uint64)
    negative = (canon >> np.uint64(63)) == 1
    return {
        "sign bit only": canon ^ SIGN,  # negatives keep their order backwards
        "no flip": canon | SIGN,  # negatives not flipped: they land above the positives
        "raw bits": canon,
        "-0.0 kept": np.where((bits >> np.uint64(63)) == 1, ~bits, bits | SIGN),
        "flip all": np.where(
            negative, ~canon, canon
        ),  # the negatives flipped, the positives' sign bit not set
    }


def _key_mistakes(values, shape=lambda keys: keys.tolist()) -> list[Mistake]:
    k = _key_variants(values)
    return [
        Mistake("only the sign bit of the negative values was flipped", shape(k["sign bit only"]),
                "A negative value's bits sort backwards (a larger magnitude is a larger integer): flip every bit, ~bits."),
        Mistake("the negative values were not flipped at all", shape(k["no flip"]),
                "Set the sign bit of positive values, and flip every bit of negative ones."),
        Mistake("the raw bits were used as keys", shape(k["raw bits"]),
                "Raw bits put every negative value above every positive one, and sort the negatives backwards."),
        Mistake("-0.0 kept its own key", shape(k["-0.0 kept"]),
                "-0.0 equals 0.0 and must get its key: add 0.0 to the values before reading their bits."),
        Mistake("the positive values' sign bit was not set", shape(k["flip all"]),
                "A positive value's bits start with 0, below every flipped negative (which also starts with 0): set the "
                "sign bit, bits | (1 << 63)."),
    ]  # fmt: skip


def test_order_key_by_hand(course):
    """Radix select's keys: bit patterns of five values, by hand"""
    values = np.array([1.0, -1.0, -0.0, 2.0, -2.5])
    given = values.copy()
    # by hand (IEEE 754 doubles): 1.0 = 0x3FF0..0 -> sign bit set: 0xBFF0..0; -1.0 = 0xBFF0..0 -> all bits flipped:
    # 0x400F..F; -0.0 is 0.0 (all zero bits) -> 0x8000..0; 2.0 = 0x4000..0 -> 0xC000..0;
    # -2.5 = 0xC004000000000000 -> flipped: 0x3FFBFFFFFFFFFFFF
    want = [
        0xBFF0000000000000,
        0x400FFFFFFFFFFFFF,
        0x8000000000000000,
        0xC000000000000000,
        0x3FFBFFFFFFFFFFFF,
    ]
    what = "order_key([1.0, -1.0, -0.0, 2.0, -2.5])"
    got = call(course.ch11.order_key, given, what=what, reread=FILTERS)
    got = np.asarray(got).tolist() if got is not None else got
    expect_equal(got, want, what=what, reread=FILTERS, mistakes=_key_mistakes(values),
                 inputs="keys as integers; in hex: " + ", ".join(f"{w:#018x}" for w in want))  # fmt: skip
    expect(np.array_equal(given, values, equal_nan=True) and np.signbit(given[2]), what=what, reread=FILTERS,
           problem="order_key changed its input values")  # fmt: skip


def test_order_key_sorts_like_the_values(course):
    """Keys of values of both signs, from 1e-300 to 1e300, sort like the values"""
    for row in REF["topk.signs.values"]:
        what = f"np.argsort(order_key(values)) for {row.size} values of both signs (zeros of both signs included)"
        keys = call(course.ch11.order_key, row.copy(), what=what, reread=FILTERS)
        expect(isinstance(keys, np.ndarray) and keys.dtype == np.uint64 and keys.shape == row.shape, what=what,
               reread=FILTERS, problem=f"expected a uint64 array of shape {list(row.shape)}, got "
               f"{type(keys).__name__} {getattr(keys, 'dtype', '')} {list(getattr(keys, 'shape', []))}")  # fmt: skip
        want = np.argsort(
            row, kind="stable"
        ).tolist()  # NumPy's sort of the values (equal zeros stay in id order)
        expect_equal(np.argsort(keys, kind="stable").tolist(), want, what=what, reread=FILTERS,
                     mistakes=_key_mistakes(row, lambda k: np.argsort(k, kind="stable").tolist()))  # fmt: skip


def _cut_variant(values, k, *, walk_up=False, lsb_first=False, keys=None) -> float:
    """top_k_cut with one classic slip; nan when its final key is no value's."""
    keys = (
        _key_variants(values)["-0.0 kept"] if keys is None else keys
    )  # correct keys for every value but -0.0
    keys = np.where(values == 0, SIGN, keys)
    prefix, fixed, needed = 0, 0, k
    for shift in range(0, 64, 8) if lsb_first else range(56, -1, -8):
        live = keys[(keys & np.uint64(fixed)) == np.uint64(prefix)]
        bins = np.bincount(((live >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), minlength=256)
        d = 0
        for d in range(256) if walk_up else range(255, -1, -1):
            if bins[d] >= needed:
                break
            needed -= int(bins[d])
        prefix, fixed = prefix | d << shift, fixed | 255 << shift
    hit = values[keys == np.uint64(prefix)]
    return float(hit[0]) if hit.size else float("nan")


def _cut_mistakes(values, k) -> list[Mistake]:
    no_flip = _key_variants(values)["no flip"]
    return [
        Mistake("the bins were walked from 0 up: that is the k-th smallest", lambda: _cut_variant(values, k, walk_up=True),
                "Walk the bins from 255 (the largest byte) down."),
        Mistake("the least significant byte was fixed first", lambda: _cut_variant(values, k, lsb_first=True),
                "Fix the most significant byte first: shift = 56, 48, ..., 0."),
        Mistake("the negative values' keys were not flipped", lambda: _cut_variant(values, k, keys=no_flip),
                "order_key: flip every bit of a negative value."),
    ]  # fmt: skip


RAN_OFF = ("the walk ran past the last bin (or wrapped around with a negative index): as it passes a bin, subtract "
           "that bin's count from `needed` — the bins above hold larger values, which count towards k")  # fmt: skip


def _check_cut(ch, values, k, want_value, want_trace, what) -> None:
    got = call(ch.top_k_cut, values.copy(), k, what=what, reread=FILTERS, hints={IndexError: RAN_OFF})
    expect(isinstance(got, (tuple, list)) and len(got) == 2, what=what, reread=FILTERS,
           problem=f"expected (value, candidates per pass), got {got!r:.80}")  # fmt: skip
    value, trace = got
    expect_equal(float(value), want_value, what=what + ": the value", reread=FILTERS,
                 mistakes=_cut_mistakes(values, k))  # fmt: skip
    if want_trace is not None:
        expect_equal(np.asarray(trace).tolist(), want_trace, what=what + ": candidates at the start of each pass",
                     reread=FILTERS)  # fmt: skip
    else:  # by reasoning: every value is a candidate at first; candidates only narrow; the last pass has the ties
        trace = np.asarray(trace).tolist()
        expect(len(trace) == 8 and trace[0] == values.size and all(a >= b for a, b in zip(trace, trace[1:], strict=False))
               and trace[-1] >= 1, what=what + ": candidates at the start of each pass", reread=FILTERS,
               problem=f"expected 8 counts, from {values.size} (every value) down, never growing; got {trace}")  # fmt: skip


def test_top_k_cut_by_hand(course):
    """Radix select of the 2nd and 3rd largest of four values, pass by pass"""
    values = np.array([3.0, 1.0, 3.0, 2.0])
    # by hand: keys 3.0 -> 0xC008.., 1.0 -> 0xBFF0.., 2.0 -> 0xC000..; pass 1: bin 0xC0 holds 3 values (3, 3, 2),
    # 0xBF one. k = 2: bin 0xC0 (3 >= 2); pass 2: bin 0x08 holds both 3.0s (2 >= 2): the rest of the bytes are 3.0's
    _check_cut(course.ch11, values, 2, 3.0, [4, 3, 2, 2, 2, 2, 2, 2], "top_k_cut([3.0, 1.0, 3.0, 2.0], k=2)")
    # k = 3: pass 2 passes bin 0x08 (2 < 3: needed becomes 1), then bin 0x00 holds 2.0 (1 >= 1)
    _check_cut(course.ch11, values, 3, 2.0, [4, 3, 1, 1, 1, 1, 1, 1], "top_k_cut([3.0, 1.0, 3.0, 2.0], k=3)")


def test_top_k_cut_like_torch(course):
    """Top-k cuts of ties, of both signs and of a row of logits, as torch.topk"""
    for case in ("ties", "signs", "logits"):
        for values, k, want in zip(*(REF[f"topk.{case}.{f}"] for f in ("values", "k", "kth")), strict=True):
            what = f"top_k_cut({case}: {values.size} values, k={int(k)}) vs torch.topk"
            _check_cut(course.ch11, values, int(k), float(want), None, what)


# ------------------------------------------------------------------------------------------ the whole backend


def test_real_model(course):
    """Your twins as the GPU backend's RMSNorm and RoPE, in the real model"""
    from exercises.grading import FIXTURES
    from tinyqwen import generate_batch
    from tinyqwen.backends.cupy import NumpyTwins, make_backend
    from tinyqwen.checkpoint import Checkpoint
    from tinyqwen.config import load_config
    from tinyqwen.model import Qwen3, load_weights

    ch = course.ch11

    class Yours(NumpyTwins):  # the cupy backend's kernels, with your two twins in place of its own
        def rms_norm(self, x, weight, eps):
            return np.asarray(ch.rms_norm_blocked(x, weight, eps), np.float32)

        def rope(self, x, cos, sin):
            return np.asarray(ch.rope_by_thread(x, cos, sin), np.float32)

    fixture = "dense-yarn"  # bf16 weights, YaRN: the angles and the norms matter at every layer
    backend = make_backend(Yours(), name="your twins")
    config = load_config(FIXTURES / fixture)
    with Checkpoint(FIXTURES / fixture) as checkpoint:
        weights = load_weights(checkpoint, config, backend.prepare, keep_bf16=True)
    model = Qwen3(config, weights, backend, path=FIXTURES / fixture)
    what = "logits of the dense-yarn fixture on the cupy backend's orchestration, with your rms_norm_blocked and rope_by_thread"
    logits = call(model, reference(fixture)["input_ids"], what=what, reread=WHOLE)
    expect_logits(logits, fixture, what=what, reread=WHOLE)
    # a left-padded batch: its rows sit at different positions, so each row must read its own cos/sin row
    gen = json.loads((FIXTURES / fixture / "generate.json").read_text())
    what = "greedy generation of a left-padded batch (rows at different positions) with your twins"
    got = call(generate_batch, model, gen["prompts"], gen["max_new_tokens"], what=what, reread=WHOLE,
               kwargs={"eos_token_ids": (), "pad_token_id": gen["pad_token_id"]})  # fmt: skip
    expect_equal(got, gen["batch"]["new_tokens"], what=what + " vs transformers' generate", reread=WHOLE)
