"""Chapter 14 checkpoints: Q8_0 quantize and dequantize, the Q4_K scale field and super-block, an int8 GEMV, KL
divergence, and your dequantizer inside a real quantized model.

Expected values come from llama.cpp's own Python package `gguf` (exercises/references/ch14_quantization.npz, made by
exercises/references/make_ch14_quantization.py): its Q8_0 quantizer (bit-exact with ggml-quants.c), its Q8_0 and
Q4_K dequantizers and Q4_K's scale unpacking, and llama.cpp's Q8_0 × Q8_0 dot product written out with exact integer
sums. The quantized model's logits are tinyqwen's NumPy forward pass (equal to transformers' on the test fixtures)
run on the weights gguf dequantized: what the last checkpoint grades is your decoding of the blocks. The by-hand cases and the KL divergences are derived in this file (the arithmetic is next to each number), and
so are the classic wrong answers (Mistake).

Tolerances: quantized bytes and unpacked scales are exact (integers). A dequantized weight is one or two float32
products and a difference; taking them in another order (d·(sc·q) instead of (d·sc)·q) moves it by an ulp of its
terms: 1e-6 relative plus 1e-6 of the largest weight, while a wrong nibble or a forgotten dmin moves weights by a
whole step, 1e-4 of the largest weight or more. The GEMV sums k blocks of exact integer dot products times d_w·d_x in
float32 (in any order): 1e-5 of the largest |y|; quantizing nothing (float weights times a float x) is off by ~1e-3
of it. KL: 1e-5 absolute, enough for a float32 log-softmax even of logits near 1000 (measured 1.6e-6), while a swapped
direction or a missing softmax is off by 8e-3 or more. The model's logits use the project's one definition of "equal",
tinyqwen.verify.tolerance.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from exercises.grading import (
    GradeError,
    Mistake,
    call,
    expect,
    expect_close,
    expect_equal,
    notebook,
    reference_file,
)
from tinyqwen.verify import tolerance

REF = reference_file("ch14_quantization.npz")
reread = functools.partial(notebook, 14)
Q8 = reread("2. Q8_0: absmax scaling, by hand")
Q4K = reread("3. Q4_K: super-blocks with 6-bit scales and mins")
DOT = reread("5. The int8 dot product")
KL = reread("6. KL divergence: how much a quantized model changed")
FINAL = reread("7. Checkpoint: your dequantizer inside the real model")
RTOL, KL_ATOL = 1e-6, 1e-5


def _deq_atol(want: np.ndarray) -> float:
    """1e-6 of the largest weight: a product taken in another order, d·(sc·q) for (d·sc)·q, moves a weight by an ulp
    of its terms, which can exceed 1e-6 of the weight itself where d·sc·q and dmin·m nearly cancel."""
    return 1e-6 * float(np.abs(want).max()) + 1e-12


# ------------------------------------------------------------------------------------------ wrong variants, by hand


def _f16(raw: np.ndarray) -> np.ndarray:  # uint8 [..., 2] -> float32 [...]
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _q8_variant(x: np.ndarray, *, signed_max=False, div=127.0, rounding="away", from_f16=False) -> np.ndarray:
    """Q8_0 bytes of x with one classic mistake switched on (the correct quantizer when none is)."""
    b = np.asarray(x, np.float32).reshape(-1, 32)
    amax = b.max(axis=1) if signed_max else np.abs(b).max(axis=1)
    d = (amax / np.float32(div)).astype(np.float32)
    dd = d.astype(np.float16).astype(np.float32) if from_f16 else d
    with np.errstate(divide="ignore", invalid="ignore"):
        v = b * np.where(dd != 0, np.float32(1) / dd, np.float32(0))[:, None]
    if rounding == "away":
        a = np.abs(v)
        q = np.sign(v) * (np.floor(a) + (a - np.floor(a) >= 0.5))
    elif rounding == "even":
        q = np.round(v)
    else:  # truncation toward zero
        q = np.trunc(v)
    q = np.clip(q, -128, 127).astype(np.int8)
    out = np.empty((len(b), 34), np.uint8)
    out[:, :2] = d.astype("<f2")[:, None].view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(*np.shape(x)[:-1], -1)


def _q8_mistakes(x: np.ndarray) -> list[Mistake]:
    return [
        Mistake("the scale came from max(x), not max(|x|)", lambda: _q8_variant(x, signed_max=True).tolist(),
                "A block whose largest magnitude is negative needs d = max(|x|) / 127, or -0.3 overflows the int8 "
                "range."),
        Mistake("the scale divides by 128 (or 255) instead of 127", lambda: _q8_variant(x, div=128.0).tolist(),
                "int8 is symmetric here: ±127 levels, d = absmax / 127 (so the largest weight maps to ±127)."),
        Mistake("ties were rounded to even (np.round) instead of away from zero",
                lambda: _q8_variant(x, rounding="even").tolist(),
                "llama.cpp uses C's roundf: 2.5 → 3, -2.5 → -3. np.round gives 2 and -2."),
        Mistake("the values were truncated (astype(np.int8)) instead of rounded",
                lambda: _q8_variant(x, rounding="trunc").tolist(),
                "Round to the nearest level (halves away from zero) before converting to int8."),
        Mistake("q was computed from the float16-rounded d", lambda: _q8_variant(x, from_f16=True).tolist(),
                "llama.cpp divides by the float32 d (q = roundf(x · (1/d))) and rounds d to float16 only to store it."),
    ]  # fmt: skip


def _q8_deq_mistakes(blocks: np.ndarray) -> list[Mistake]:
    b = blocks.reshape(-1, 34)
    d = _f16(b[:, :2])
    shape = (*blocks.shape[:-1], -1)
    return [
        Mistake("the weights were read as unsigned bytes (uint8), not int8",
                lambda: (d[:, None] * b[:, 2:].astype(np.float32)).reshape(shape),
                "Read the 32 quantized weights with .view(np.int8): byte 0xFF is -1, not 255."),
        Mistake("the scale d was left out", lambda: b[:, 2:].view(np.int8).astype(np.float32).reshape(shape),
                "Every weight is d · q, with d the block's float16 in its first two bytes."),
        Mistake("d was read big-endian", lambda: (b[:, 1::-1].copy().view("<f2").astype(np.float32)
                                                    * b[:, 2:].view(np.int8)).reshape(shape),
                "GGUF numbers are little-endian: view the two bytes as '<f2' (np.float16 on every common CPU)."),
    ]  # fmt: skip


def _q4k_unpack_wrong(p: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    p = p.astype(np.uint8)
    sc = np.empty((*p.shape[:-1], 8), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = p[..., 0:4] & 63, p[..., 4:8] & 63
    if variant == "low_only":  # the top two bits ignored
        sc[..., 4:], m[..., 4:] = p[..., 8:12] & 0xF, p[..., 8:12] >> 4
    elif variant == "swapped_nibbles":  # scale from the high nibble, min from the low one
        sc[..., 4:] = (p[..., 8:12] >> 4) | ((p[..., 0:4] >> 6) << 4)
        m[..., 4:] = (p[..., 8:12] & 0xF) | ((p[..., 4:8] >> 6) << 4)
    else:  # "eight_bytes": sub-blocks 4-7 read like 0-3, from bytes 4-7 and 8-11
        sc[..., 4:], m[..., 4:] = p[..., 4:8] & 63, p[..., 8:12] & 63
    return sc, m


def _q4k_deq_variant(blocks: np.ndarray, variant: str) -> np.ndarray:
    b = blocks.reshape(-1, 144)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    p = b[:, 4:16]
    sc = np.empty((len(b), 8), np.uint8)
    m = np.empty_like(sc)
    sc[:, :4], m[:, :4] = p[:, 0:4] & 63, p[:, 4:8] & 63
    sc[:, 4:] = (p[:, 8:12] & 0xF) | ((p[:, 0:4] >> 6) << 4)
    m[:, 4:] = (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = np.empty((len(b), 8, 32), np.float32)
    if variant == "high_first":
        q[:, 0::2], q[:, 1::2] = qs >> 4, qs & 0xF
    elif variant == "interleaved":  # value 2i from the low nibble of byte i, 2i + 1 from its high nibble
        flat = b[:, 16:]
        q = np.stack([flat & 0xF, flat >> 4], axis=-1).reshape(len(b), 8, 32).astype(np.float32)
    else:
        q[:, 0::2], q[:, 1::2] = qs & 0xF, qs >> 4
    scale = (d[:, None] * sc)[:, :, None]
    low = (dmin[:, None] * m)[:, :, None]
    if variant == "no_min":
        out = scale * q
    elif variant == "plus_min":
        out = scale * q + low
    else:
        out = scale * q - low
    return out.reshape(*blocks.shape[:-1], -1).astype(np.float32)


def _q4k_mistakes(blocks: np.ndarray) -> list[Mistake]:
    return [
        Mistake("the high nibble was taken first", lambda: _q4k_deq_variant(blocks, "high_first"),
                "Within each 32-byte chunk the LOW nibbles are sub-block 2c and the HIGH nibbles sub-block 2c + 1."),
        Mistake("the nibbles were interleaved (value 2i low, 2i + 1 high of byte i)",
                lambda: _q4k_deq_variant(blocks, "interleaved"),
                "Q4_K is not Q4_0's neighbour pairing: byte i of chunk c holds value i of sub-block 2c (low nibble) and "
                "value i of sub-block 2c + 1 (high nibble)."),
        Mistake("dmin · m was not subtracted (the min was forgotten)", lambda: _q4k_deq_variant(blocks, "no_min"),
                "Q4_K is asymmetric: w = d·sc[j]·q − dmin·m[j]; q runs 0..15, the min shifts it down."),
        Mistake("dmin · m was added instead of subtracted", lambda: _q4k_deq_variant(blocks, "plus_min"),
                "The min is subtracted: w = d·sc[j]·q − dmin·m[j]."),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ Q8_0


def test_q8_0_by_hand(course):
    """Q8_0 of one block, by hand"""
    x = np.zeros(32, np.float32)
    x[:5] = np.array([127, -63.5, 0.5, -1.5, 30.2], np.float32) / 64
    # by hand: absmax = 127/64, d = absmax / 127 = 1/64 exactly (so 1/d = 64 and x · 64 is exact): q = roundf of
    # [127, −63.5, 0.5, −1.5, 30.2] = [127, −64, 1, −2, 30] (halves away from zero), the other 27 are 0.
    # d = 1/64 as float16 is 0x2400, stored little-endian: bytes 0x00, 0x24
    want = np.zeros(34, np.int64)
    want[:2] = [0x00, 0x24]
    want[2:7] = np.array([127, -64, 1, -2, 30], np.int8).view(np.uint8)
    what = "quantize_q8_0([127, -63.5, 0.5, -1.5, 30.2, 0, …, 0] / 64) as bytes"
    got = call(course.ch14.quantize_q8_0, x.copy(), what=what, reread=Q8)
    expect_equal(np.asarray(got).astype(np.int64).tolist(), want.tolist(), what=what, reread=Q8,
                 inputs="x [32] float32", mistakes=_q8_mistakes(x))  # fmt: skip


def test_q8_0_like_llamacpp(course):
    """Q8_0 quantization equals llama.cpp's, byte for byte"""
    x, want = REF["q8.x"], REF["q8.blocks"]
    what = "quantize_q8_0(x [12, 256]) vs llama.cpp's (gguf.quants.quantize Q8_0)"
    got = call(course.ch14.quantize_q8_0, x.copy(), what=what, reread=Q8)
    got_a = np.asarray(got)
    expect(got_a.shape == want.shape, what=what, reread=Q8,
           problem=f"expected bytes of shape {list(want.shape)} (8 blocks of 34 per row), got {list(got_a.shape)}")  # fmt: skip
    expect(got_a.dtype == np.uint8, what=what, reread=Q8,
           problem=f"expected uint8 bytes, got {got_a.dtype}: view the float16 d and the int8 q as np.uint8")  # fmt: skip
    expect_equal(got_a.astype(np.int64).tolist(), want.astype(np.int64).tolist(), what=what, reread=Q8,
                 inputs="rows of normals × 0.05, an all-zero block, a negative absmax, exact halves, an outlier",
                 mistakes=_q8_mistakes(x))  # fmt: skip


def test_q8_0_dequantize(course):
    """Q8_0 dequantization equals llama.cpp's"""
    blocks, want = REF["q8.blocks"], REF["q8.dequant"]
    what = "dequantize_q8_0(blocks [12, 272]) vs llama.cpp's (gguf.quants.dequantize Q8_0)"
    got = call(course.ch14.dequantize_q8_0, blocks.copy(), what=what, reread=Q8)
    expect_close(got, want, what=what, atol=_deq_atol(want), rtol=RTOL, reread=Q8, inputs="12 rows of 8 Q8_0 blocks",
                 mistakes=_q8_deq_mistakes(blocks))  # fmt: skip


def test_q8_0_round_trip_error(course):
    """Round trip: every weight within half a step (d / 2) of where it started"""
    x = REF["q8.x"]
    ch = course.ch14
    back = np.asarray(call(lambda v: ch.dequantize_q8_0(ch.quantize_q8_0(v)), x.copy(), what="round trip",
                           reread=Q8), np.float64)  # fmt: skip
    expect(back.shape == x.shape, what="dequantize_q8_0(quantize_q8_0(x))", reread=Q8,
           problem=f"expected shape {list(x.shape)}, got {list(back.shape)}")  # fmt: skip
    # by hand: |x − d·q| ≤ d/2 for the float32 d that chose q; storing d as float16 adds |q|·|Δd| ≤ 127 · d · 2^-11
    d = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    err = np.abs(back.reshape(-1, 32) - x.reshape(-1, 32))
    bound = d * (0.5 + 127 * 2.0**-11) + 1e-12
    worst = int(np.argmax((err / bound).max(axis=1)))
    expect(bool((err <= bound).all()), what="dequantize_q8_0(quantize_q8_0(x)): error per weight", reread=Q8,
           problem=f"block {worst} has an error of {err[worst].max():.3g}, more than half a step "
           f"(d/2 = {d[worst, 0] / 2:.3g}): rounding to the nearest level never misses by more")  # fmt: skip


# ------------------------------------------------------------------------------------------ Q4_K


def test_q4_k_scales_by_hand(course):
    """Unpacking Q4_K's 12-byte field of 6-bit scales and mins, by hand"""
    p = np.array([0b01_000001, 0b10_000010, 0b11_000011, 0b00_111111,      # scales 0-3 + top bits of scales 4-7
                  0b00_000101, 0b01_000110, 0b10_000111, 0b11_001000,      # mins 0-3 + top bits of mins 4-7
                  0x21, 0x43, 0x65, 0x87], np.uint8)  # fmt: skip
    # by hand: sc[0:4] = low 6 bits of bytes 0-3 = [1, 2, 3, 63]; m[0:4] = low 6 bits of bytes 4-7 = [5, 6, 7, 8]
    # sc[4:8] = low nibble of bytes 8-11 | top 2 bits of bytes 0-3 << 4 = [1|16, 3|32, 5|48, 7|0] = [17, 35, 53, 7]
    # m[4:8] = high nibble of bytes 8-11 | top 2 bits of bytes 4-7 << 4 = [2|0, 4|16, 6|32, 8|48] = [2, 20, 38, 56]
    want = ([1, 2, 3, 63, 17, 35, 53, 7], [5, 6, 7, 8, 2, 20, 38, 56])
    what = "unpack_q4_k_scales(a 12-byte field built by hand)"
    got = call(course.ch14.unpack_q4_k_scales, p.copy(), what=what, reread=Q4K)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise GradeError(
            f"{what}\n  expected a pair (scales [8], mins [8]), got {type(got).__name__}\n  re-read: {Q4K}"
        )
    got_pair = [np.asarray(a).astype(np.int64).tolist() for a in got]
    mistakes = [Mistake(f"{why}", [a.astype(np.int64).tolist() for a in _q4k_unpack_wrong(p, v)], hint)
                for why, v, hint in _UNPACK_MISTAKES]  # fmt: skip
    expect_equal(got_pair, [list(want[0]), list(want[1])], what=what, reread=Q4K, mistakes=mistakes,
                 inputs="bytes " + " ".join(f"{b:02x}" for b in p))  # fmt: skip


_UNPACK_MISTAKES = [
    ("the top two bits of sub-blocks 4-7 were ignored (only the 4-bit nibbles of bytes 8-11 used)", "low_only",
     "Scales and mins 4-7 have 6 bits: low 4 from bytes 8-11, high 2 from the top of bytes 0-3 (scales) / 4-7 (mins)."),
    ("scale and min nibbles of bytes 8-11 were swapped", "swapped_nibbles",
     "In bytes 8-11 the LOW nibble belongs to the scale, the HIGH nibble to the min."),
    ("sub-blocks 4-7 were read like 0-3, as if the field were 16 bytes", "eight_bytes",
     "Only 12 bytes for 16 six-bit numbers: 4-7 are split between bytes 8-11 and the spare top bits of bytes 0-7."),
]  # fmt: skip


def test_q4_k_scales_like_llamacpp(course):
    """Q4_K's scale field unpacked as llama.cpp does, for 64 random fields"""
    p = REF["q4k.scales"]
    what = "unpack_q4_k_scales(scales [64, 12]) vs llama.cpp's get_scale_min_k4 (gguf's Q4_K.get_scale_min)"
    got = call(course.ch14.unpack_q4_k_scales, p.copy(), what=what, reread=Q4K)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise GradeError(
            f"{what}\n  expected a pair (scales, mins), got {type(got).__name__}\n  re-read: {Q4K}"
        )
    for name, have, want, k in (("scales", got[0], REF["q4k.sc"], 0), ("mins", got[1], REF["q4k.m"], 1)):
        mistakes = [Mistake(why, lambda v=v, k=k: _q4k_unpack_wrong(p, v)[k].astype(np.int64).tolist(), hint)
                    for why, v, hint in _UNPACK_MISTAKES]  # fmt: skip
        expect_equal(np.asarray(have).astype(np.int64).tolist(), want.astype(np.int64).tolist(),
                     what=f"{what}: the {name}", reread=Q4K, mistakes=mistakes)  # fmt: skip


def test_q4_k_block_by_hand(course):
    """One Q4_K super-block, by hand"""
    b = np.zeros(144, np.uint8)
    b[0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)  # d = 0.5
    b[2:4] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)  # dmin = 0.25
    b[4], b[8] = 2, 0b00_000100  # sub-block 0: scale 2; min 4 (sc[4:8] and m[4:8] stay 0, as does m[1:4])
    b[5] = 3  # sub-block 1: scale 3, min 0
    b[16] = 0x71  # chunk 0, byte 0: low nibble 1 → sub-block 0 value 0; high nibble 7 → sub-block 1 value 0
    b[17] = 0x0F  # low nibble 15 → sub-block 0 value 1; high 0 → sub-block 1 value 1
    # by hand: sub-block 0: w = 0.5·2·q − 0.25·4 = q − 1 → value 0: 0, value 1: 14, the rest (q = 0): −1
    # sub-block 1: w = 0.5·3·q − 0 = 1.5·q → value 0: 10.5, the rest 0; sub-blocks 2-7: scale and min 0 → 0
    want = np.zeros(256, np.float32)
    want[0:32] = -1.0
    want[0], want[1] = 0.0, 14.0
    want[32] = 10.5
    what = "dequantize_q4_k(one super-block built by hand: d 0.5, dmin 0.25, two sub-blocks set)"
    got = call(course.ch14.dequantize_q4_k, b.copy(), what=what, reread=Q4K)
    expect_close(got, want, what=what, atol=_deq_atol(want), rtol=RTOL, reread=Q4K, inputs="block [144] uint8",
                 mistakes=_q4k_mistakes(b))  # fmt: skip


def test_q4_k_like_llamacpp(course):
    """Q4_K dequantization equals llama.cpp's on 40 random super-blocks"""
    blocks, want = REF["q4k.blocks"], REF["q4k.dequant"]
    what = "dequantize_q4_k(blocks [40, 144]) vs llama.cpp's (gguf.quants.dequantize Q4_K)"
    got = call(course.ch14.dequantize_q4_k, blocks.copy(), what=what, reread=Q4K)
    expect_close(got, want, what=what, atol=_deq_atol(want), rtol=RTOL, reread=Q4K, inputs="40 random super-blocks",
                 mistakes=_q4k_mistakes(blocks))  # fmt: skip
    rows = blocks.reshape(4, 10 * 144)
    got = call(course.ch14.dequantize_q4_k, rows.copy(), what="dequantize_q4_k(rows [4, 1440])", reread=Q4K)
    expect_close(got, want.reshape(4, 2560), what="dequantize_q4_k(4 rows of 10 super-blocks)", atol=_deq_atol(want),
                 rtol=RTOL, reread=Q4K, inputs="blocks [4, 1440]: a row holds several super-blocks")  # fmt: skip


# ------------------------------------------------------------------------------------------ the int8 GEMV


def _gemv_mistakes(w: np.ndarray, x: np.ndarray) -> list[Mistake]:
    wb = w.reshape(w.shape[0], -1, 34)
    dw = _f16(wb[..., :2])
    qw = wb[..., 2:].view(np.int8)
    xb = _q8_variant(x[None]).reshape(-1, 34)
    dx = _f16(xb[:, :2])
    qx = xb[:, 2:].view(np.int8)
    return [
        Mistake("the int8 products were summed in int8 (numpy keeps int8 · int8 in int8: it wraps around)",
                lambda: ((qw * qx[None]).sum(axis=-1, dtype=np.int8).astype(np.float32) * dw * dx).sum(1),
                "Widen q to int32 before multiplying (.astype(np.int32)): 127 · 127 = 16,129 does not fit in int8."),
        Mistake("x was not quantized: the dequantized weights times the float x",
                lambda: ((dw[..., None] * qw).reshape(len(w), -1) @ x).astype(np.float32),
                "Quantize x to Q8_0 blocks too (your quantize_q8_0), then integer dot products per block."),
        Mistake("the scale of x was left out", lambda: ((qw.astype(np.int32) * qx[None]).sum(-1) * dw).sum(1),
                "Each block's integer sum is multiplied by d_w · d_x: both scales."),
        Mistake("the weights' scales were left out", lambda: ((qw.astype(np.int32) * qx[None]).sum(-1) * dx).sum(1),
                "Each block's integer sum is multiplied by d_w · d_x: both scales."),
    ]  # fmt: skip


def _check_gemv(course, case: str) -> None:
    w, x, want = (REF[f"gemv.{case}.{k}"] for k in ("w", "x", "y"))
    w_given, x_given = w.copy(), x.copy()
    m, n = w.shape[0], x.size
    what = f"gemv_q8_0(w [{m}, {w.shape[1]}] Q8_0 bytes, x [{n}]) vs llama.cpp's Q8_0 × Q8_0 dot products"
    got = call(course.ch14.gemv_q8_0, w_given, x_given, what=what, reread=DOT)
    bound = 1e-5 * float(np.abs(want).max())
    expect_close(got, want, what=what, atol=bound, reread=DOT, inputs=f"{n // 32} blocks per row",
                 mistakes=_gemv_mistakes(w, x))  # fmt: skip
    expect(np.array_equal(w_given, w) and np.array_equal(x_given, x), what=what, reread=DOT,
           problem="gemv_q8_0 changed its input w or x in place")  # fmt: skip


def test_gemv_small(course):
    """An int8 GEMV: 4 rows of 2 blocks"""
    _check_gemv(course, "small")


def test_gemv_wide(course):
    """An int8 GEMV with rows as long as Qwen3-0.6B's (32 blocks)"""
    _check_gemv(course, "wide")


def test_gemv_tall(course):
    """An int8 GEMV with 300 rows"""
    _check_gemv(course, "tall")


# ------------------------------------------------------------------------------------------ KL divergence


def test_kl_by_hand(course):
    """KL divergence between two small distributions, by hand"""
    p_logits = np.log(np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    q_logits = np.log(np.array([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]])) + 7.0  # a shift changes nothing
    # by hand: KL(P‖Q) = Σ p log(p/q) = 0.5 log 2 + 0.25 log 0.5 + 0 = 0.25 log 2 = 0.1732868; identical rows: 0
    want = np.array([0.25 * np.log(2), 0.0])
    what = "kl_divergence(log [0.5, 0.25, 0.25], log [0.25, 0.5, 0.25] + 7) and two equal rows"
    got = call(course.ch14.kl_divergence, p_logits.copy(), q_logits.copy(), what=what, reread=KL)
    expect_close(got, want, what=what, atol=KL_ATOL, reread=KL, mistakes=[
        Mistake("softmax was not taken: the logits were used as probabilities",
                lambda: (p_logits * (p_logits - q_logits)).sum(-1),
                "KL compares distributions: softmax both rows of logits first (log_softmax is steadier)."),
        Mistake("the sum over the vocabulary is missing (one term per token was returned)",
                lambda: 0.5 * np.log(2) + 0 * want, "KL sums p · log(p / q) over the whole vocabulary."),
    ])  # fmt: skip


def test_kl_direction_and_large_logits(course):
    """KL(reference ‖ quantized), not the other way round, and no overflow for large logits"""
    p = np.array([[0.7, 0.2, 0.1]])
    q = np.array([[0.4, 0.4, 0.2]])
    # by hand: KL(P‖Q) = 0.7 ln(7/4) + 0.2 ln(1/2) + 0.1 ln(1/2) = 0.7·0.5596158 − 0.3·0.6931472 = 0.1837869
    #          KL(Q‖P) = 0.4 ln(4/7) + 0.4 ln 2 + 0.2 ln 2 = −0.2238463 + 0.4158883 = 0.1920420
    forward, backward = 0.7 * np.log(7 / 4) - 0.3 * np.log(2), 0.4 * np.log(4 / 7) + 0.6 * np.log(2)
    big = 1000.0  # logits of a few hundred occur in real models; exp(1000) overflows
    what = "kl_divergence(log P + 1000, log Q + 1000) with P = [0.7, 0.2, 0.1], Q = [0.4, 0.4, 0.2]"
    got = call(course.ch14.kl_divergence, np.log(p) + big, np.log(q) + big, what=what, reread=KL)
    expect_close(got, np.array([forward]), what=what, atol=KL_ATOL, reread=KL, mistakes=[
        Mistake("the arguments were swapped: KL(quantized ‖ reference)", np.array([backward]),
                "The reference (first argument) weighs the terms: Σ p_ref · (log p_ref − log p_quant)."),
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------ the real model


def _quantized_model():
    cfg = json.loads(str(REF["model.config"]))
    names = sorted({k[6:].rsplit(".", 1)[0] for k in REF if k.startswith("model.") and k.endswith(".qtype")})
    return cfg, {n: (str(REF[f"model.{n}.qtype"]), tuple(REF[f"model.{n}.shape"]), REF[f"model.{n}.data"])
                 for n in names}  # fmt: skip


class _Tensors:
    """The few methods tinyqwen's load_weights reads from a checkpoint, over a dict of float32 arrays."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def keys(self):
        return self.arrays.keys()

    def shape(self, name):
        return self.arrays[name].shape

    def dtype(self, name):
        return "F32"

    def get(self, name):
        return self.arrays[name]


def test_real_model(course):
    """Your dequantizers inside a real quantized Qwen3 (Q4_K, Q8_0 and F32 tensors)"""
    from tinyqwen.backends import get_backend
    from tinyqwen.config import config_from_dict
    from tinyqwen.model import Qwen3, load_weights

    cfg, tensors = _quantized_model()
    weights = {}
    for name, (qtype, shape, data) in tensors.items():
        what = f"dequantize({qtype!r}, {name} data [{', '.join(map(str, data.shape))}], shape {list(shape)})"
        got = call(course.ch14.dequantize, qtype, data.copy(), shape, what=what, reread=FINAL)
        got = np.asarray(got)
        expect(got.shape == shape and got.dtype.kind == "f", what=what, reread=FINAL,
               problem=f"expected float32 of shape {list(shape)}, got {got.dtype} {list(got.shape)}")  # fmt: skip
        row0 = REF[f"model.{name}.row0"]
        expect_close(got.reshape(shape[0], -1)[0] if len(shape) == 2 else got, row0, atol=_deq_atol(row0), rtol=RTOL,
                     reread=Q4K if qtype == "q4_k" else Q8 if qtype == "q8_0" else FINAL,
                     what=f"{what}: its row 0 vs llama.cpp's dequantization (a {qtype} tensor is decoded wrong)")  # fmt: skip
        weights[name] = np.ascontiguousarray(got, np.float32)
    config = config_from_dict(cfg)
    backend = get_backend("numpy")
    model = Qwen3(config, load_weights(_Tensors(weights), config, backend.prepare, progress=False), backend)
    ids, want = REF["model.input_ids"], REF["model.logits"]
    expect_close(model(ids), want, atol=tolerance(want), reread=FINAL,
                 what="logits of a 1-layer Qwen3 stored as Q4_K / Q8_0 / F32, dequantized by your `dequantize`, "
                 "vs the same model with its blocks dequantized by llama.cpp's gguf package",
                 inputs=f"input_ids {list(ids.shape)}; tensors: " + ", ".join(
                     sorted({q for q, _, _ in tensors.values()})))  # fmt: skip
