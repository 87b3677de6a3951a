"""Chapter 4 checkpoints: RoPE and YaRN, graded against transformers' Qwen3RotaryEmbedding and apply_rotary_pos_emb.

The expected values are in exercises/references/ch04_rope_yarn.npz (made by make_ch04_rope_yarn.py with
transformers 5.23.0 / torch 2.13.0 on the real Qwen3-0.6B configs); two checks are derived by hand and say so.

Tolerances, and why:
- inv_freq (values from 1 down to 1e-6): rtol 1e-6. A float32 power may differ in its last bit between torch and
  NumPy (1.2e-7 relative); 1e-6 allows a few such bits and nothing more.
- cos / sin (values of size <= 1.14): atol 1e-5. Both sides take the *same* float32 angle (a product is rounded
  the same way everywhere) and their cos differs by ~1e-7. Angles computed in float64 differ from transformers'
  float32 ones by up to 2.6e-3 at position 131071, so they fail here on purpose: the model was run (and is compared)
  with float32 angles.
- rotated queries and keys (values up to ~4): atol 1e-5.
- the whole model's logits: exercises.grading.expect_logits, |Δ| <= LOGITS_RTOL · max(1, max |logit|) with
  LOGITS_RTOL = 1e-5 (the bound a failure prints: 1.7e-4 for the dense-tied fixture's logits of size 17).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from exercises.grading import (
    Mistake,
    call,
    expect,
    expect_close,
    expect_logits,
    learner_model,
    notebook,
    reference_file,
)

FREQ_RTOL = 1e-6
TABLE_ATOL = 1e-5
ROPE_ATOL = 1e-5
REF = reference_file("ch04_rope_yarn.npz")


# reread("...") -> 'notebooks/04-rope-yarn.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 4)


def pair(got):
    """rope_cos_sin must return (cos, sin)."""
    expect(isinstance(got, (tuple, list)) and len(got) == 2, what="rope_cos_sin",
           problem=f"expected a pair (cos, sin), got {type(got).__name__}", reread=reread("3. The cos and sin tables"))  # fmt: skip
    return got


# ------------------------------------------------------------------ the classic wrong answers, computed honestly


def inv_freq_i_over_d(head_dim: int, theta: float) -> np.ndarray:
    return (1.0 / theta ** (np.arange(head_dim // 2) / head_dim)).astype(np.float32)


def inv_freq_default_theta(head_dim: int, theta: float):
    """The learner's formula with the classic theta = 10000 hard-coded; NOTHING when the true theta is 10000."""
    if theta == 10000.0:
        return None
    return (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


def inv_freq_not_inverted(head_dim: int, theta: float) -> np.ndarray:
    return (theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


def angles_f32(positions, inv_freq) -> np.ndarray:
    return positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)


def tables(angles: np.ndarray, factor: float, layout: str = "split-half") -> tuple[np.ndarray, np.ndarray]:
    if layout == "split-half":
        angles = np.concatenate([angles, angles], axis=-1)
    else:  # interleaved: each frequency twice in a row
        angles = np.repeat(angles, 2, axis=-1)
    return np.cos(angles) * factor, np.sin(angles) * factor


def rotate_half_interleaved(x: np.ndarray) -> np.ndarray:  # pairs (x0, x1), (x2, x3), ...
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


def rotate_half_sign_flipped(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([x[..., half:], -x[..., :half]], axis=-1)


def rotate_half_no_minus(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([x[..., half:], x[..., :half]], axis=-1)


def rotate_half_right(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_with(x, cos, sin, rotate=rotate_half_right) -> np.ndarray:
    return x * cos[:, None] + rotate(x) * sin[:, None]


def rope_interleaved(x, cos, sin) -> np.ndarray:
    """The GPT-J / original-Meta layout: pair (x[2i], x[2i+1]) turned by angle i (cos[..., i])."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    out = np.empty_like(x)
    even, odd = x[..., 0::2], x[..., 1::2]
    out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
    return out


def yarn_variant(head_dim, theta, factor, original, beta_fast, beta_slow, *, reverse=False, truncate=True):
    def dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim(beta_fast), dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0, 1)
    if reverse:
        ramp = 1 - ramp
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    return (inv * (1 - ramp) + inv / factor * ramp).astype(np.float32)


# ------------------------------------------------------------------ checkpoints


def test_inv_freq(course):
    """Frequencies of plain RoPE"""
    ch = course.ch04
    for case in ("fixture", "qwen3_0_6b"):
        d, theta = int(REF[f"freq.{case}.head_dim"]), float(REF[f"freq.{case}.theta"])
        got = call(
            ch.rope_inv_freq, d, theta, what="rope_inv_freq", reread=reread("2. The frequency spectrum")
        )
        expect_close(
            got,
            REF[f"freq.{case}.inv_freq"],
            what="rope_inv_freq",
            inputs=f"head_dim={d}, theta={theta:g} ({case})",
            atol=0.0,
            rtol=FREQ_RTOL,
            mistakes=[
                Mistake(
                    "exponent i/d instead of 2i/d",
                    inv_freq_i_over_d(d, theta),
                    "Pair i uses the even channel index 2i: theta ** (-2i / head_dim), i.e. "
                    "np.arange(0, head_dim, 2) / head_dim.",
                ),
                Mistake(
                    "theta ** (2i/d) without the 1 / ...",
                    inv_freq_not_inverted(d, theta),
                    "These are wavelength-like numbers that grow; the *inverse* frequency is 1 / theta ** (2i/d).",
                ),
                Mistake(
                    "the theta argument was ignored: 10000, the default of Llama 2 and GPT-NeoX, was used",
                    inv_freq_default_theta(d, theta),
                    f"Use the theta you are given: Qwen3 uses rope_theta = {theta:g} from config.json.",
                ),
            ],  # fmt: skip
            reread=reread("2. The frequency spectrum"),
        )


def test_cos_sin_short(course):
    """cos and sin tables"""
    ch = course.ch04
    for case in ("short", "batch"):
        r = {k: REF[f"cos_sin.{case}.{k}"] for k in ("positions", "inv_freq", "cos", "sin")}
        pos, inv = r["positions"], r["inv_freq"]
        got = call(
            ch.rope_cos_sin,
            pos.copy(),
            inv.copy(),
            1.0,
            what="rope_cos_sin",
            reread=reread("3. The cos and sin tables"),
        )
        got = pair(got)
        for name, got_table, index in (("cos", got[0], 0), ("sin", got[1], 1)):
            expect_close(
                got_table,
                r[name],
                what=f"rope_cos_sin: {name}",
                inputs=f"positions {pos.tolist()}, inv_freq of head_dim {2 * inv.size} ({case})",
                atol=TABLE_ATOL,
                mistakes=[
                    Mistake(
                        "positions counted from 1",
                        tables(angles_f32(pos + 1, inv), 1.0)[index],
                        "The first token is position 0: use the positions as given.",
                    ),
                    Mistake(
                        "interleaved layout (each frequency twice in a row)",
                        tables(angles_f32(pos, inv), 1.0, "interleaved")[index],
                        "Qwen3 uses the split-half layout: concatenate the angles with themselves, "
                        "[a0 .. a(d/2-1), a0 .. a(d/2-1)], not np.repeat.",
                    ),
                    Mistake(
                        "cos and sin swapped",
                        tables(angles_f32(pos, inv), 1.0)[1 - index],
                        "Return (cos, sin) in that order.",
                    ),
                ],  # fmt: skip
                reread=reread("3. The cos and sin tables"),
            )


def test_cos_sin_long(course):
    """cos and sin at long positions (40K plain, 131K with YaRN)"""
    ch = course.ch04
    for case in ("long", "yarn_long"):
        r = {k: REF[f"cos_sin.{case}.{k}"] for k in ("positions", "inv_freq", "cos", "sin")}
        pos, inv = r["positions"], r["inv_freq"]
        factor = float(REF[f"cos_sin.{case}.attention_factor"])
        got = pair(
            call(
                ch.rope_cos_sin,
                pos.copy(),
                inv.copy(),
                factor,
                what="rope_cos_sin",
                reread=reread("7. Float32 angles"),
            )
        )
        for name, got_table, index in (("cos", got[0], 0), ("sin", got[1], 1)):
            angles64 = pos.astype(np.float64)[..., None] * inv.astype(np.float64)
            expect_close(
                got_table,
                r[name],
                what=f"rope_cos_sin: {name}",
                inputs=f"positions {pos.tolist()}, attention_factor {factor:.6g} ({case})",
                atol=TABLE_ATOL,
                mistakes=[
                    Mistake(
                        "the angles were computed in float64, not float32",
                        tables(angles64, factor)[index].astype(np.float32),
                        "transformers multiplies positions and inv_freq in float32; at position 40959 the "
                        "float32 angle differs from the float64 one by ~1e-3 rad. Careful: int64 positions "
                        "times a float32 array gives float64 in NumPy — convert positions.astype(np.float32) first.",
                    ),
                    Mistake(
                        "the attention factor was not applied",
                        tables(angles_f32(pos, inv), 1.0)[index],
                        "Multiply both tables by attention_factor (YaRN's 0.1·ln(factor) + 1).",
                    ),
                    Mistake(
                        "positions counted from 1",
                        tables(angles_f32(pos + 1, inv), factor)[index],
                        "The first token is position 0: use the positions as given.",
                    ),
                ],  # fmt: skip
                reread=reread("7. Float32 angles"),
            )


def test_rotate_half(course):
    """rotate_half pairs channel i with channel i + d/2"""
    ch = course.ch04
    # derived by hand: the pairs of [1..8] are (1,5) (2,6) (3,7) (4,8); (a, b) turned by 90° is (-b, a)
    x = np.arange(1, 9, dtype=np.float32)
    cases = [(x, np.array([-5, -6, -7, -8, 1, 2, 3, 4], dtype=np.float32), "x = [1 .. 8]")]
    y = np.random.default_rng(404).standard_normal((2, 3, 5, 16)).astype(np.float32)
    cases.append((y, np.concatenate([-y[..., 8:], y[..., :8]], axis=-1), "x of shape [2, 3, 5, 16]"))
    for x_in, want, inputs in cases:
        got = call(ch.rotate_half, x_in.copy(), what="rotate_half", reread=reread("4. Split-half pairing"))
        expect_close(
            got,
            want,
            what="rotate_half",
            inputs=inputs,
            atol=0.0,
            mistakes=[
                Mistake(
                    "the sign is on the wrong half",
                    rotate_half_sign_flipped(x_in),
                    "(a, b) turned by +90° is (-b, a): the minus goes on the *second* half, moved to the front: "
                    "concatenate([-x2, x1]).",
                ),
                Mistake(
                    "neighbours paired (interleaved layout)",
                    rotate_half_interleaved(x_in),
                    "Qwen3 pairs channel i with i + d/2 (split-half), not with i + 1.",
                ),
                Mistake(
                    "no minus sign",
                    rotate_half_no_minus(x_in),
                    "A 90° turn of (a, b) is (-b, a): one of the halves changes sign.",
                ),
            ],  # fmt: skip
            reread=reread("4. Split-half pairing"),
        )


def test_apply_rope(course):
    """RoPE on queries (4 heads) and keys (2 heads)"""
    ch = course.ch04
    r = {k: REF[f"rope.heads.{k}"] for k in ("q", "k", "cos", "sin", "q_embed", "k_embed")}
    for name in ("q", "k"):
        x, cos, sin = r[name], r["cos"], r["sin"]
        got = call(ch.apply_rope, x.copy(), cos.copy(), sin.copy(), what="apply_rope", reread=reread("5. Applying RoPE"),
                   hint="cos and sin are [B, T, d] while x is [B, heads, T, d]: give them a heads axis "
                        "(cos[:, None]) so one angle table serves every head.")  # fmt: skip
        expect_close(
            got,
            r[f"{name}_embed"],
            what=f"apply_rope on {'queries' if name == 'q' else 'keys'}",
            inputs=f"{name} {list(x.shape)}, positions [[0..5], [3..8]], head_dim 32, theta 10000",
            atol=ROPE_ATOL,
            mistakes=[
                Mistake(
                    "interleaved pairing instead of split-half",
                    rope_interleaved(x, cos, sin),
                    "Qwen3 (like transformers' Llama code) pairs channel i with i + d/2 — split-half — and "
                    "the GPT-J/original-Meta layout pairs neighbours (2i, 2i+1). Use rotate_half.",
                ),
                Mistake(
                    "the rotation runs backwards (rotate_half's sign flipped)",
                    rope_with(x, cos, sin, rotate_half_sign_flipped),
                    "x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1].",
                ),
                Mistake(
                    "cos and sin swapped",
                    rope_with(x, sin, cos),
                    "x·cos + rotate_half(x)·sin: the unrotated part goes with cos.",
                ),
            ],  # fmt: skip
            reread=reread("5. Applying RoPE"),
        )


def test_relative_position(course):
    """Scores depend only on the distance m − n"""
    ch = course.ch04
    # derived by hand: rotations compose, so R(m)q · R(n)k = q · R(n - m)k — only the distance matters
    inv = REF["freq.fixture.inv_freq"]
    q, k = np.random.default_rng(406).standard_normal((2, 1, 1, 1, 32)).astype(np.float32)
    section = reread("6. Only the distance matters")

    def score(m: int, n: int) -> float:
        cq, sq = call(ch.rope_cos_sin, np.array([[m]]), inv.copy(), 1.0, what="rope_cos_sin", reread=section)
        ck, sk = call(ch.rope_cos_sin, np.array([[n]]), inv.copy(), 1.0, what="rope_cos_sin", reread=section)
        rq = call(ch.apply_rope, q, cq, sq, what="apply_rope", reread=section)
        rk = call(ch.apply_rope, k, ck, sk, what="apply_rope", reread=section)
        return float(np.sum(np.asarray(rq, dtype=np.float64) * np.asarray(rk, dtype=np.float64)))

    pairs = [(7, 3), (57, 53), (507, 503)]
    scores = [score(m, n) for m, n in pairs]
    # float32 angles near 500 carry ~3e-5 rad of rounding; scores are of size ~5, so 1e-3 is generous and safe
    expect_close(
        np.array(scores), np.full(3, scores[0]), what="q·k at the same distance 4",
        inputs=f"(query, key) positions {pairs}", atol=1e-3,
        reread=section,
    )  # fmt: skip
    expect(
        abs(score(7, 4) - scores[0]) > 1e-2,
        what="q·k at distances 4 and 3",
        problem="the score at distance 3 equals the one at distance 4: the positions have no effect — "
        "are the angles all zero, or is x returned unchanged?",
        reread=section,
    )


def test_yarn_inv_freq(course):
    """YaRN frequencies (Qwen3-0.6B with factor 4, and two more settings)"""
    ch = course.ch04
    for case in ("fixture", "qwen3_0_6b", "custom"):
        g = {k: REF[f"yarn.{case}.{k}"] for k in ("head_dim", "theta", "factor", "original", "beta_fast", "beta_slow")}  # fmt: skip
        args = (int(g["head_dim"]), float(g["theta"]), float(g["factor"]), int(g["original"]),
                float(g["beta_fast"]), float(g["beta_slow"]))  # fmt: skip
        got = call(
            ch.yarn_inv_freq,
            *args,
            what="yarn_inv_freq",
            reread=reread("9. YaRN: stretch only the slow pairs"),
        )
        expect_close(
            got,
            REF[f"yarn.{case}.inv_freq"],
            what="yarn_inv_freq",
            inputs=f"head_dim={args[0]}, theta={args[1]:g}, factor={args[2]:g}, original={args[3]}, "
            f"beta_fast={args[4]:g}, beta_slow={args[5]:g} ({case})",
            atol=0.0,
            rtol=FREQ_RTOL,
            mistakes=[
                Mistake(
                    "the ramp runs the wrong way",
                    yarn_variant(*args, reverse=True),
                    "ramp = 0 must *keep* the fast pairs (small i: many turns inside the original window) and "
                    "ramp = 1 must divide the slow pairs by factor: inv_freq·(1 - ramp) + inv_freq/factor·ramp.",
                ),
                Mistake(
                    "low and high were not rounded (floor / ceil)",
                    yarn_variant(*args, truncate=False),
                    "transformers rounds low down and high up (truncate=True) before clamping them.",
                ),
                Mistake(
                    "every pair divided by factor (plain position interpolation)",
                    inv_freq_not_inverted(args[0], args[1]) ** -1 / args[2],
                    "YaRN keeps the fast pairs unchanged: only pairs past the ramp are divided by factor.",
                ),
            ],  # fmt: skip
            reread=reread("9. YaRN: stretch only the slow pairs"),
        )


def test_yarn_attention_factor(course):
    """YaRN's attention factor"""
    ch = course.ch04
    cases = [(float(REF[f"yarn.{c}.factor"]), float(REF[f"yarn.{c}.attention_factor"])) for c in ("qwen3_0_6b", "custom")]  # fmt: skip
    cases.append((1.0, float(REF["yarn_factor_one.attention_factor"])))
    cases.append((0.5, 1.0))  # derived by hand: transformers' get_mscale returns 1.0 whenever factor <= 1
    for factor, want in cases:
        got = call(
            ch.yarn_attention_factor,
            factor,
            what="yarn_attention_factor",
            reread=reread("10. YaRN's attention factor"),
        )
        expect_close(
            np.asarray(got, dtype=np.float64) if got is not None else None,
            want,
            what="yarn_attention_factor",
            inputs=f"factor={factor:g}",
            atol=1e-7,
            mistakes=[
                Mistake(
                    "log base 10 instead of the natural log",
                    0.1 * math.log10(factor) + 1,
                    "Use math.log (natural log): 0.1·ln(4) + 1 = 1.1386.",
                ),
                Mistake("the + 1 is missing", 0.1 * math.log(factor), "The factor is 0.1·ln(factor) + 1."),
                Mistake(
                    "factor <= 1 not special-cased",
                    0.1 * math.log(factor) + 1,
                    "No stretching means no change: return 1.0 when factor <= 1.",
                ),
            ],  # fmt: skip
            reread=reread("10. YaRN's attention factor"),
        )


def test_real_model(course):
    """Your RoPE and YaRN in the real model (YaRN fixture, 72 positions)"""
    # the angle tables come from YOUR yarn_inv_freq, yarn_attention_factor and rope_cos_sin, rotated by YOUR
    # apply_rope (and the weights, embedding and norms are your chapters 2-3)
    model = learner_model(course, upto=4, fixture="dense-yarn")
    expect_logits(
        model,
        "dense-yarn",
        what="logits of the dense-yarn fixture with your RoPE/YaRN (and your chapters 2-3)",
        reread=reread("12. Checkpoint: RoPE in the real model"),
    )
