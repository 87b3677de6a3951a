"""Chapter 10 checkpoints: bfloat16 widening and rounding, the bytes a decode step reads, a GEMV on bf16 weights.

Expected values come from torch's bfloat16 (exercises/references/make_ch10_numba.py → ch10_numba.npz): torch's
float32 value of every bf16 pattern (the official widening), torch's rounding of float32 to bf16, and products of
bf16 weights with a vector summed in float64. The weights-per-token counts are derived by hand in this file from
the official config.json files (the arithmetic is written out next to each number), and so are the classic wrong
answers (Mistake). The last checkpoint compares a fixture model's logits with transformers'.

Grading is on correctness only, never on speed. Tolerances: widening and rounding are exact (bit patterns). A GEMV
sums n products in float32 (in any order: `fastmath` reorders); against the float64 sum of the same bf16 weights that
leaves ~1e-7 per addition, so sums of size ~1-3 over n ≤ 1024 products stay within atol = rtol = 1e-5.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from exercises.grading import (
    Mistake,
    call,
    config_json,
    expect,
    expect_close,
    expect_equal,
    expect_logits,
    learner_model,
    notebook,
    reference_file,
)

REF = reference_file("ch10_numba.npz")
ATOL = RTOL = 1e-5

# reread("...") -> 'notebooks/10-numba.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 10)
BF16 = reread("3. bfloat16 is the top half of a float32")
ROOFLINE = reread("2. The roofline: bytes per token")
KERNEL = reread("4. A GEMV kernel that reads bf16")


def _widen(u16: np.ndarray) -> np.ndarray:  # the correct widening, for the wrong variants below
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _widen_mistakes(u16: np.ndarray) -> list[Mistake]:
    """What the classic widening bugs give on this input, derived by hand."""
    return [
        Mistake("the patterns were converted as integers (u16.astype(np.float32)): values, not bits",
                lambda: u16.astype(np.float32),
                "Shift the bits into the top half of a uint32 and reinterpret them: "
                "(u16.astype(np.uint32) << 16).view(np.float32)."),
        Mistake("the patterns were shifted by 8 bits instead of 16", lambda: (u16.astype(np.uint32) << 8).view(np.float32),
                "bf16 is the top HALF of a float32: shift left by 16."),
        Mistake("the patterns were put in the low half of the float32 (no shift)",
                lambda: u16.astype(np.uint32).view(np.float32),
                "Shift left by 16, so the bf16 sign and exponent land on float32's."),
    ]  # fmt: skip


def _truncate(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _ties_away(x: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, np.float32).view(np.uint32).astype(np.uint64) + 0x8000) >> 16).astype(np.uint16)


def _narrow_mistakes(x: np.ndarray) -> list[Mistake]:
    return [
        Mistake("the low 16 bits were dropped (truncation, rounding toward zero)", lambda: _truncate(x).tolist(),
                "Round to nearest: add 0x7FFF + ((bits >> 16) & 1) to the 32-bit pattern before shifting right by 16."),
        Mistake("ties were rounded away from zero (+0x8000) instead of to even", lambda: _ties_away(x).tolist(),
                "At an exact tie (low half 0x8000) keep the even pattern: add 0x7FFF plus the lowest kept bit."),
    ]  # fmt: skip


def _check_gemv(ch, case: str, what: str, section: str, extra=()) -> np.ndarray:
    w, x, want = (REF[f"gemv.{case}.{k}"] for k in ("w", "x", "y"))
    w_given, x_given = w.copy(), x.copy()
    inputs = f"w [{w.shape[0]}, {w.shape[1]}] uint16 (bf16 patterns), x [{x.size}] float32"
    got = call(ch.gemv_bf16, w_given, x_given, what=what, inputs=inputs, reread=section,
               hints={"Cannot determine Numba type": "Numba compiles only NumPy arrays and numbers: check the "
                      "arguments' types and what your loop indexes.",
                      "TypingError": "Numba could not compile the kernel; its message names the line."})  # fmt: skip
    wide = _widen(w).astype(np.float64)
    got_a = np.asarray(got) if got is not None else None
    if got_a is not None and got_a.shape == want.shape:
        off = ~np.isclose(got_a.astype(np.float64), want, atol=ATOL, rtol=RTOL)
        done = w.shape[0] // 64 * 64
        if off.any() and 0 < done < w.shape[0] and not off[:done].any():
            expect(False, what=what, inputs=inputs, reread=section,
                   problem=f"rows 0..{done - 1} are right but the last {w.shape[0] - done} rows are not: the loop "
                   "over blocks of 64 rows stops early. Use ceil(m / 64) blocks, (m + 63) // 64, and clip the last "
                   "block at m")  # fmt: skip
    expect_close(
        got, want, atol=ATOL, rtol=RTOL, what=what, inputs=inputs, reread=section,
        mistakes=[
            *extra,
            Mistake("the weights were used as integers (their bit patterns' values), not widened",
                    lambda: (w.astype(np.float64) @ x).astype(np.float32),
                    "Widen each weight: np.uint32(w[o, i]) << 16, read as float32 through a .view of the buffer."),
            Mistake("the weights were shifted by 8 bits instead of 16",
                    lambda: ((w.astype(np.uint32) << 8).view(np.float32).astype(np.float64) @ x).astype(np.float32),
                    "bf16 is the top half of a float32: shift left by 16."),
            Mistake("the sum was taken in bfloat16 precision (each product rounded to bf16)",
                    lambda: _widen(_truncate(wide * x)).astype(np.float64).sum(axis=1),
                    "Widen to float32 and keep the accumulator a float32."),
        ],
    )  # fmt: skip
    expect(np.array_equal(w_given, w) and np.array_equal(x_given, x), what=what, inputs=inputs, reread=section,
           problem="gemv_bf16 changed its input w or x in place")  # fmt: skip
    expect(np.asarray(got).dtype == np.float32, what=what, inputs=inputs, reread=section,
           problem=f"expected a float32 result, got {np.asarray(got).dtype}: sum in float32 and return that")  # fmt: skip
    return np.asarray(got)


# ------------------------------------------------------------------------------------------ checkpoints


def test_widen_by_hand(course):
    """Widening the bf16 patterns of 1, -2, 1.5 and inf"""
    u16 = np.array([0x3F80, 0xC000, 0x3FC0, 0x7F80], dtype=np.uint16)
    # by hand: 0x3F80 << 16 = 0x3F800000 = 1.0, 0xC0000000 = -2.0, 0x3FC00000 = 1.5, 0x7F800000 = +inf
    expect_close(
        course.ch10.bf16_to_float32(u16.copy()), np.array([1.0, -2.0, 1.5, np.inf], np.float32), atol=0.0,
        what="bf16_to_float32([0x3F80, 0xC000, 0x3FC0, 0x7F80])", inputs="4 uint16 patterns",
        mistakes=_widen_mistakes(u16), reread=BF16,
    )  # fmt: skip


def test_widen_every_pattern(course):
    """All 65,536 bf16 patterns widen exactly as torch widens them"""
    bits, want = REF["widen.bits"], REF["widen.f32"]
    what = "bf16_to_float32(every uint16 pattern) vs torch's .view(torch.bfloat16).float()"
    got = course.ch10.bf16_to_float32(bits.copy())
    with np.errstate(
        invalid="ignore"
    ):  # 254 of the patterns are NaNs, some signalling: comparing them is fine
        expect_close(got, want, atol=0.0, what=what, inputs="uint16 [65536]: 0x0000 … 0xFFFF",
                     mistakes=_widen_mistakes(bits), reread=BF16)  # fmt: skip
    got = np.asarray(got)
    expect(got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32)), what=what,
           problem="the values agree but not every bit pattern does (signed zeros or NaN payloads): widen by "
           "shifting the bits, never by arithmetic", reread=BF16)  # fmt: skip


def test_round_by_hand(course):
    """Rounding to bf16: nearest, ties to even"""
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 1.5 * 2**-8, -(1 + 1.5 * 2**-8)], np.float32)
    # by hand: 1 + 2**-8 = 0x3F808000 is a tie between 0x3F80 and 0x3F81 -> even 0x3F80; 1 + 3 * 2**-8 = 0x3F818000
    # a tie between 0x3F81 and 0x3F82 -> even 0x3F82; 1 + 1.5 * 2**-8 = 0x3F80C000 is above half -> 0x3F81
    want = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xBF81]
    expect_equal(
        np.asarray(course.ch10.float32_to_bf16(x.copy())).astype(np.int64).tolist(), want,
        what="float32_to_bf16([1, 1 + 2**-8, 1 + 3·2**-8, 1 + 1.5·2**-8, -(1 + 1.5·2**-8)]) as integers",
        inputs="5 float32 values near 1", mistakes=_narrow_mistakes(x), reread=BF16,
    )  # fmt: skip


def test_round_like_torch(course):
    """Rounding to bf16 equals torch's, ties, overflow and subnormals included"""
    x, want = REF["narrow.x"], REF["narrow.bits"]
    got = course.ch10.float32_to_bf16(x.copy())
    expect_equal(
        np.asarray(got).astype(np.int64).tolist(), want.astype(np.int64).tolist(),
        what="float32_to_bf16(x) vs torch's x.to(torch.bfloat16), as bit patterns",
        inputs=f"x [{x.size}] float32: ties, neighbours of ties, ±0, ±inf, overflow, subnormals, random normals",
        mistakes=_narrow_mistakes(x), reread=BF16,
    )  # fmt: skip
    expect(np.asarray(got).dtype == np.uint16, what="float32_to_bf16(x)", reread=BF16,
           problem=f"expected uint16 bit patterns, got {np.asarray(got).dtype}")  # fmt: skip


def _count(ch, name: str, want: int, mistakes: list[Mistake]) -> None:
    config = config_json(name)
    got = call(ch.weights_per_token, json.loads(json.dumps(config)), what=f"weights_per_token({name})",
               reread=ROOFLINE)  # fmt: skip
    expect_equal(int(got) if isinstance(got, (int, np.integer)) else got, want,
                 what=f"weights_per_token(config of {name}), derived by hand", mistakes=mistakes,
                 reread=ROOFLINE)  # fmt: skip


def test_weights_per_token_dense(course):
    """Weights read per decode token, dense models"""
    # Qwen3-0.6B, by hand: attention 1024·128·(2·16 + 2·8) = 6,291,456; MLP 3·1024·3072 = 9,437,184;
    # 28 layers · 15,728,640 = 440,401,920; the (tied) head 151,936·1024 = 155,582,464 -> 595,984,384
    head = 151_936 * 1024
    _count(course.ch10, "Qwen3-0.6B", 595_984_384, [
        Mistake("the output head was left out", 595_984_384 - head,
                "The head [vocab_size, hidden_size] multiplies the last hidden state at every step."),
        Mistake("the tied head was counted twice (as the embedding and as the head)", 595_984_384 + head,
                "A tied head IS the embedding matrix: read once per token; the lookup reads only one row."),
        Mistake("head_dim was taken as hidden_size / num_attention_heads",
                28 * (1024 * 64 * 48 + 3 * 1024 * 3072) + head,
                "Qwen3 has its own head_dim (128 for 0.6B, not 1024 / 16 = 64): read config['head_dim']."),
        Mistake("k_proj and v_proj were given as many heads as q_proj", 28 * (1024 * 128 * 64 + 3 * 1024 * 3072) + head,
                "k and v have num_key_value_heads heads (grouped-query attention), q and o num_attention_heads."),
    ])  # fmt: skip
    # Qwen3-8B, by hand: attention 4096·128·(2·32 + 2·8) = 41,943,040; MLP 3·4096·12288 = 150,994,944;
    # 36 · 192,937,984 = 6,945,767,424; the (untied) head 151,936·4096 = 622,329,856 -> 7,568,097,280
    _count(course.ch10, "Qwen3-8B", 7_568_097_280, [
        Mistake("the output head was left out", 6_945_767_424,
                "The head [vocab_size, hidden_size] multiplies the last hidden state at every step."),
        Mistake("the untied embedding was counted too", 7_568_097_280 + 622_329_856,
                "The embedding lookup reads one row per token, not the whole matrix."),
    ])  # fmt: skip


def test_weights_per_token_moe(course):
    """Weights read per decode token, mixture of experts"""
    # Qwen3-30B-A3B, by hand: attention 2048·128·(2·32 + 2·4) = 18,874,368; router 128·2048 = 262,144; 8 routed
    # experts 8·3·2048·768 = 37,748,736; 48 · 56,885,248 = 2,730,491,904; head 151,936·2048 = 311,164,928
    # -> 3,041,656,832 (the "A3B": about 3 billion active weights)
    _count(course.ch10, "Qwen3-30B-A3B", 3_041_656_832, [
        Mistake("every expert was counted, not only the num_experts_per_tok the router picks",
                48 * (18_874_368 + 262_144 + 128 * 3 * 2048 * 768) + 311_164_928,
                "Decoding one token runs only its top-k experts: num_experts_per_tok · 3 matrices."),
        Mistake("the router was left out", 3_041_656_832 - 48 * 262_144,
                "The router [num_experts, hidden_size] runs at every sparse layer."),
        Mistake("the layers were counted as dense (intermediate_size)", 48 * (18_874_368 + 3 * 2048 * 6144) + 311_164_928,
                "A sparse layer has no dense MLP: router + top-k experts of moe_intermediate_size."),
    ])  # fmt: skip
    # fixture moe-sparse-step, by hand: 6 layers, sparse where (i + 1) % 2 == 0 and i not in [3]: layers 1 and 5.
    # attention 64·32·(2·4 + 2·2) = 24,576 each; dense MLP 3·64·96 = 18,432 (layers 0, 2, 3, 4); sparse: router
    # 8·64 = 512 + 2 experts 2·3·64·32 = 12,288; head 512·64 = 32,768 (tied) ->
    # 6·24,576 + 4·18,432 + 2·12,800 + 32,768 = 279,552
    _count(course.ch10, "fixture-moe-sparse-step", 279_552, [
        Mistake("every layer was taken as sparse (decoder_sparse_step and mlp_only_layers ignored)",
                6 * 24_576 + 6 * 12_800 + 32_768,
                "Layer i is sparse only when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers."),
        Mistake("mlp_only_layers was ignored", 6 * 24_576 + 3 * 18_432 + 3 * 12_800 + 32_768,
                "Layers listed in mlp_only_layers keep a dense MLP."),
    ])  # fmt: skip


def test_gemv_by_hand(course):
    """A GEMV on bf16 weights, small enough to check by hand"""
    # by hand: [1·1 + 2·0.5 + 0·2 - 1·4, 0.5·1, 1 + 0.5 + 2 + 4] = [-2, 0.5, 7.5]
    _check_gemv(course.ch10, "small", "gemv_bf16(w = bf16 of [[1, 2, 0, -1], [0.5, 0, 0, 0], [1, 1, 1, 1]], "
                "x = [1, 0.5, 2, 4])", KERNEL)  # fmt: skip


def test_gemv_square(course):
    """GEMV rows are outputs: y[o] = Σ_i W[o, i]·x[i]"""
    w, x = REF["gemv.square.w"], REF["gemv.square.x"]
    _check_gemv(course.ch10, "square", "gemv_bf16(w [64, 64], x [64]) vs torch", KERNEL, extra=[
        Mistake("the product runs over the wrong axis (Wᵀx: transposed weights)",
                lambda: (_widen(w).astype(np.float64).T @ x).astype(np.float32),
                "Weights are [out, in] (nn.Linear): y[o] sums row o of W times x."),
    ])  # fmt: skip


def test_gemv_odd_shape(course):
    """Any number of rows and columns, not only multiples of a block"""
    _check_gemv(course.ch10, "odd", "gemv_bf16(w [300, 257], x [257]) vs torch", KERNEL)


def test_gemv_long_rows(course):
    """Rows as long as Qwen3-0.6B's, in float32"""
    _check_gemv(course.ch10, "long", "gemv_bf16(w [128, 1024], x [1024]) vs torch", KERNEL)


def _bf16_linear(gemv):
    """linear(x, w) for the model: every row of x through `gemv` on w's bf16 bit patterns (exact for bf16 weights)."""
    from tinyqwen.bf16 import float32_to_bf16

    patterns: dict[
        int, tuple[np.ndarray, np.ndarray]
    ] = {}  # id(w) -> (w, its bits): w kept alive, ids unique

    def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [..., n], [m, n] -> [..., m]
        bits = patterns.setdefault(id(w), (w, float32_to_bf16(w)))[1]
        rows = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        out = [np.asarray(gemv(bits, np.ascontiguousarray(r)), np.float32) for r in rows]
        return np.stack(out).reshape(*x.shape[:-1], w.shape[0])

    def swiglu(x, w_gate, w_up, w_down):
        from tinyqwen.mlp import silu

        return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)

    return linear, swiglu


def test_real_model(course):
    """Your GEMV runs every matrix product of the real model"""
    ch = course.ch10
    fixture = "dense-untied-bf16-sharded"
    linear, swiglu = _bf16_linear(ch.gemv_bf16)
    model = learner_model(course, upto=7, fixture=fixture, linear=linear, swiglu=swiglu)
    expect_logits(model, fixture, reread=reread("7. Checkpoint: our kernel in the real model"),
                  what="logits of the bf16 fixture with your gemv_bf16 in every projection, MLP and the head "
                  "(and your kernels of chapters 3-7)")  # fmt: skip
