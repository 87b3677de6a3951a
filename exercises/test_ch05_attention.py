"""Chapter 5 checkpoints: softmax, the causal mask and grouped-query attention, graded against transformers.

The expected values are in exercises/references/ch05_attention.npz (made by make_ch05_attention.py with transformers
5.23.0 / torch 2.13.0: torch.softmax, masking_utils.sdpa_mask / eager_mask, modeling_qwen3.eager_attention_forward),
and, for the last two checkpoints, the fixtures' stored transformers logits and greedy generations.

Tolerances, and why:
- probabilities (size <= 1): atol 1e-6 — one exp and one sum of a handful of terms, ~1e-7 apart between torch and
  NumPy; every classic mistake moves them by 1e-2 or more.
- attention outputs (size ~1-3): atol 1e-5 — a few float32 roundings of values of that size in two matrix products,
  which may be summed in different orders on different CPUs.
- masks and generated token ids: exact.
- the whole model's logits: exercises.grading.expect_logits, |Δ| <= LOGITS_RTOL · max(1, max |logit|) with
  LOGITS_RTOL = 1e-5 (the bound a failure prints: 1.7e-4 for the dense-tied fixture's logits of size 17).
"""

from __future__ import annotations

import functools
import json

import numpy as np

from exercises.grading import (
    FIXTURES,
    GradeError,
    Mistake,
    call,
    expect_close,
    expect_equal,
    expect_logits,
    learner_model,
    notebook,
    reference,
    reference_file,
)

PROB_ATOL = 1e-6
OUT_ATOL = 1e-5
MIN = np.finfo(np.float32).min
REF = reference_file("ch05_attention.npz")


# reread("...") -> 'notebooks/05-attention.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 5)


# ------------------------------------------------------------------ the classic wrong answers, computed honestly


def quiet(fn):
    """Run a deliberately naive computation without NumPy's overflow warnings."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


@quiet
def softmax_ok(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@quiet
def softmax_naive(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def mask_variant(n_q: int, n_k: int, shift: int = 0, offset: bool = True) -> np.ndarray:
    """Query i may see key j <= i + (n_k - n_q) + shift; offset=False forgets the n_k - n_q."""
    past = n_k - n_q if offset else 0
    return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + past + shift


@quiet
def attention_variant(
    q, k, v, mask, *, scale=None, fill=MIN, softmax_axis=-1, grouping="repeat", naive=False, no_softmax=False
):
    """Plain loop-free attention with one knob turned to a classic mistake."""
    d = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    if grouping == "repeat":  # head h -> kv head h // group (right)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    else:  # "tile": head h -> kv head h % Hkv (wrong)
        k, v = np.tile(k, (1, group, 1, 1)), np.tile(v, (1, group, 1, 1))
    scores = q @ k.swapaxes(-1, -2) * np.float32(d**-0.5 if scale is None else scale)
    if fill == "multiply":
        scores = scores * mask[:, None]
    elif fill is not None:
        scores = np.where(mask[:, None], scores, np.float32(fill))
    if no_softmax:  # the scores themselves as weights (masked ones set to 0)
        return (np.where(mask[:, None], scores, 0) @ v).astype(np.float32)
    probs = (softmax_naive if naive else softmax_ok)(scores, softmax_axis)
    return (probs @ v).astype(np.float32)


# ------------------------------------------------------------------ checkpoints


def test_softmax(course):
    """Softmax along an axis"""
    ch = course.ch05
    for case in ("rows", "middle"):
        x, axis = REF[f"softmax.{case}.x"], int(REF[f"softmax.{case}.axis"])
        got = call(ch.softmax, x.copy(), axis, what="softmax", reread=reread("2. Softmax, and why we subtract the max"),
                   hint="Reduce with keepdims=True so the max and the sum broadcast back against x.")  # fmt: skip
        other = (axis + 1) % x.ndim
        expect_close(
            got,
            REF[f"softmax.{case}.out"],
            what="softmax",
            inputs=f"x {list(x.shape)}, axis={axis}",
            atol=PROB_ATOL,
            mistakes=[
                Mistake(
                    "softmax over the wrong axis",
                    softmax_ok(x, other),
                    f"Use the `axis` argument ({axis}) for the max and the sum: these probabilities sum to 1 "
                    f"along axis {other - x.ndim if other else 0} instead.",
                ),
                Mistake(
                    "softmax over the last axis whatever `axis` says",
                    softmax_ok(x, -1),
                    "Pass axis=axis to max and sum (with keepdims=True).",
                ),
                Mistake(
                    "softmax over every entry at once",
                    softmax_ok(x.reshape(-1), 0).reshape(x.shape),
                    "x.max() and e.sum() without an axis reduce the whole array: give them axis=axis.",
                ),
                Mistake(
                    "not normalised",
                    np.exp(x - x.max(axis=axis, keepdims=True)),
                    "Divide by the sum along the axis, so each slice sums to 1.",
                ),
            ],  # fmt: skip
            reread=reread("2. Softmax, and why we subtract the max"),
        )


def test_softmax_stable(course):
    """Softmax of large and masked scores (no overflow, no NaN)"""
    ch = course.ch05
    for case, inputs in (
        ("large", "x = N(0, 2²) + 1000, shape [3, 7]"),
        ("masked", "x [3, 6] with entries set to float32 min; row 1 entirely"),
    ):
        x = REF[f"softmax.{case}.x"]
        with np.errstate(
            all="ignore"
        ):  # the learner's overflow, if any, shows as NaN in the grade, not as a warning
            got = call(
                ch.softmax,
                x.copy(),
                -1,
                what="softmax",
                reread=reread("2. Softmax, and why we subtract the max"),
            )
        expect_close(
            got,
            REF[f"softmax.{case}.out"],
            what="softmax",
            inputs=inputs,
            atol=PROB_ATOL,
            mistakes=[
                Mistake(
                    "no max subtraction",
                    softmax_naive(x, -1),
                    "exp(1000) overflows to inf and inf/inf is NaN; exp(min) is 0 everywhere in a masked row "
                    "and 0/0 is NaN. Subtract x.max(axis, keepdims=True) first — the result is the same "
                    "in exact arithmetic.",
                ),
            ],  # fmt: skip
            reread=reread("2. Softmax, and why we subtract the max"),
        )


def mask_mistakes(n_q: int, n_k: int) -> list[Mistake]:
    return [
        Mistake("the diagonal is excluded (off by one)", mask_variant(n_q, n_k, shift=-1),
                "A token may attend to itself: key j is allowed when j <= i (+ the cache offset), not j < i."),
        Mistake("one future key is included (off by one)", mask_variant(n_q, n_k, shift=+1),
                "Query i must not see key i + 1: allow j <= i (+ the cache offset)."),
        Mistake("the mask is transposed (keys see queries)", mask_variant(n_k, n_q).T,
                "Rows are queries, columns are keys: row i allows the columns j <= i."),
    ]  # fmt: skip


def test_causal_mask(course):
    """Causal mask"""
    ch = course.ch05
    got = call(ch.causal_mask, 4, 4, what="causal_mask", reread=reread("4. The causal mask"))
    expect_equal(
        np.asarray(got).astype(bool) if got is not None else None,
        REF["causal.4x4"],
        what="causal_mask",
        inputs="n_q=4, n_k=4",
        mistakes=mask_mistakes(4, 4),
        reread=reread("4. The causal mask"),
    )


def test_causal_mask_cache(course):
    """Causal mask with a KV cache (queries are the last n_q of n_k)"""
    ch = course.ch05
    for n_q, n_k in ((1, 6), (3, 8)):
        got = call(ch.causal_mask, n_q, n_k, what="causal_mask", reread=reread("4. The causal mask"))
        expect_equal(
            np.asarray(got).astype(bool) if got is not None else None,
            REF[f"causal.{n_q}x{n_k}"],
            what="causal_mask",
            inputs=f"n_q={n_q}, n_k={n_k} ({n_k - n_q} keys come from the cache)",
            mistakes=[
                Mistake(
                    "the cache offset is missing: the queries were placed at positions 0 .. n_q - 1",
                    mask_variant(n_q, n_k, offset=False),
                    "The queries are the *last* n_q positions: query i sits at position i + (n_k - n_q) and "
                    "sees every key up to there (all the cached ones included).",
                ),
                *mask_mistakes(n_q, n_k),
            ],  # fmt: skip
            reread=reread("4. The causal mask"),
        )


def attention_mistakes(q, k, v, mask) -> list[Mistake]:
    d = q.shape[-1]
    return [
        Mistake("scaled by 1/d instead of 1/sqrt(d)", attention_variant(q, k, v, mask, scale=1 / d),
                f"Divide the scores by sqrt(head_dim) = {d**0.5:g}, not by head_dim = {d}."),
        Mistake("the scores were not scaled", attention_variant(q, k, v, mask, scale=1.0),
                f"Multiply q·k by 1/sqrt(head_dim) = {d**-0.5:.4g} before the softmax."),
        Mistake("softmax over the queries (axis -2) instead of the keys",
                attention_variant(q, k, v, mask, softmax_axis=-2),
                "Each query's weights over the keys must sum to 1: softmax over the last axis of [.., T, S]."),
        Mistake("the mask was not applied", attention_variant(q, k, v, mask, fill=None),
                "Where mask is False set the score to np.finfo(np.float32).min before the softmax."),
        Mistake("masked scores set to 0 instead of a very negative number", attention_variant(q, k, v, mask, fill=0.0),
                "A score of 0 still gets weight exp(0 - max) > 0: masked keys need the most negative float32 "
                "(np.finfo(np.float32).min) so their weight is exactly 0."),
        Mistake("the masked scores were used as weights without a softmax (scores, not probabilities)",
                attention_variant(q, k, v, mask, no_softmax=True),
                "Turn each query's scores into probabilities over the keys with softmax(scores, axis=-1) "
                "before multiplying by v."),
        Mistake("the scores were multiplied by the mask (masked scores become 0)",
                attention_variant(q, k, v, mask, fill="multiply"),
                "Multiplying by a 0/1 mask leaves masked scores at 0, which still get weight: use "
                "np.where(mask, scores, np.finfo(np.float32).min)."),
    ]  # fmt: skip


def shape_hint(q, k, mask) -> str:
    hint = (f"Shapes: q {list(q.shape)}, k and v {list(k.shape)}, mask {list(mask.shape)}. The scores are "
            "q @ k.swapaxes(-1, -2) -> [B, heads, T, S]; the mask needs a heads axis to match (mask[:, None]).")  # fmt: skip
    if q.shape[1] != k.shape[1]:
        group = q.shape[1] // k.shape[1]
        hint += f" Each kv head serves {group} query heads: head h uses kv head h // {group}."
    return hint


def grade_attention(ch, case: str, inputs: str, section: str, extra: list[Mistake] = ()) -> None:
    r = {n: REF[f"attn.{case}.{n}"] for n in ("q", "k", "v", "mask", "out")}
    q, k, v, mask = r["q"], r["k"], r["v"], r["mask"]
    with np.errstate(all="ignore"):
        got = call(ch.attention, q.copy(), k.copy(), v.copy(), mask.copy(), what="attention", reread=section,
                   hint=shape_hint(q, k, mask))  # fmt: skip
    expect_close(
        got, r["out"], what="attention", inputs=inputs, atol=OUT_ATOL,
        mistakes=[*extra, *attention_mistakes(q, k, v, mask)], reread=section,
    )  # fmt: skip


def test_attention_one_head(course):
    """Scaled dot-product attention, one head"""
    grade_attention(
        course.ch05,
        "one_head",
        "q, k, v [1, 1, 5, 16], causal mask 5x5",
        reread("3. Scaled dot products: why 1/√d"),
    )


def gqa_mistake(case: str) -> Mistake:
    r = {n: REF[f"attn.{case}.{n}"] for n in ("q", "k", "v", "mask")}
    hq, hkv = r["q"].shape[1], r["k"].shape[1]
    return Mistake(
        f"query heads grouped the wrong way (head h used kv head h % {hkv}, as np.tile makes it)",
        attention_variant(r["q"], r["k"], r["v"], r["mask"], grouping="tile"),
        f"Consecutive query heads share a kv head: head h uses kv head h // {hq // hkv} "
        f"(np.repeat(k, {hq // hkv}, axis=1), or reshape q to [B, {hkv}, {hq // hkv}, T, d]) — not h % {hkv}.",
    )


def test_grouped_query_attention(course):
    """Grouped-query attention (4 query heads share 2 kv heads; Qwen3-0.6B's 16/8)"""
    ch = course.ch05
    grade_attention(ch, "gqa", "q [2, 4, 6, 16], k and v [2, 2, 6, 16], causal mask", reread("5. Grouped-query attention"),
                    [gqa_mistake("gqa")])  # fmt: skip
    grade_attention(ch, "qwen3_0_6b", "q [1, 16, 4, 128], k and v [1, 8, 4, 128] (Qwen3-0.6B's heads), causal mask",
                    reread("5. Grouped-query attention"), [gqa_mistake("qwen3_0_6b")])  # fmt: skip


def test_attention_cache(course):
    """Attention with a KV cache (3 new queries, 8 keys)"""
    r = {n: REF[f"attn.cache.{n}"] for n in ("q", "k", "v", "mask")}
    top_left = np.broadcast_to(mask_variant(3, 8, offset=False), (1, 3, 8))
    ignored = Mistake(
        "the `mask` argument was ignored and a causal mask built from the top-left corner",
        attention_variant(r["q"], r["k"], r["v"], top_left),
        "Use the mask you are given: with a cache, the 3 queries are the *last* 3 of 8 positions.",
    )
    grade_attention(course.ch05, "cache", "q [1, 4, 3, 16], k and v [1, 2, 8, 16], mask = causal_mask(3, 8)",
                    reread("4. The causal mask"), [ignored])  # fmt: skip


def test_attention_padding(course):
    """Left padding: queries that may see no key stay finite"""
    r = {n: REF[f"attn.padding.{n}"] for n in ("q", "k", "v", "mask")}
    neg_inf = Mistake(
        "masked with -inf: a padding query that may see no key gets 0/0 = NaN",
        attention_variant(r["q"], r["k"], r["v"], r["mask"], fill=-np.inf),
        "Use np.finfo(np.float32).min, as transformers does: such a row then becomes a harmless average. A NaN "
        "there is not harmless — in the next layer it sits in the keys and values, and 0·NaN = NaN reaches every "
        "real token.",
    )
    grade_attention(course.ch05, "padding",
                    "q [2, 4, 6, 16], k and v [2, 2, 6, 16]; row 0 is left-padded by 2 (attention_mask [0,0,1,1,1,1])",
                    reread("6. Padding masks"), [neg_inf])  # fmt: skip


def tril_mask(n_q: int, n_k: int) -> np.ndarray:
    """The classic cache bug: np.tril of an [n_q, n_k] block puts the queries at positions 0 .. n_q - 1."""
    return np.tril(np.ones((n_q, n_k), dtype=bool))


def model_mask_mistakes(run) -> list[Mistake]:
    """The classic causal-mask bugs, each as the output `run(causal_mask=...)` of tinyqwen's model with that mask."""
    return [
        Mistake("your causal_mask ignores the cache offset (np.tril of [n_q, n_k] without k = n_k - n_q)",
                lambda: run(causal_mask=tril_mask),
                "With a KV cache the new token is the LAST query: causal_mask(1, S) must allow all S keys, but "
                "np.tril(np.ones((1, S))) allows only key 0. Use np.tril(..., k=n_k - n_q) (section \"4. The causal "
                "mask\")."),
        Mistake("your causal_mask excludes the diagonal (a token cannot see itself; off by one)",
                lambda: run(causal_mask=lambda n_q, n_k: mask_variant(n_q, n_k, shift=-1)),
                "Key j is allowed when j <= i (+ the cache offset), not j < i."),
        Mistake("your causal_mask lets each token see one future key (off by one)",
                lambda: run(causal_mask=lambda n_q, n_k: mask_variant(n_q, n_k, shift=+1)),
                "Query i must not see key i + 1."),
    ]  # fmt: skip


def test_real_model(course):
    """Your attention in the real model (logits)"""
    model = learner_model(course, upto=5, fixture="dense-tied")

    def logits_with(causal_mask=None, **knobs):
        """The fixture's logits with tinyqwen's kernels and one classic mistake (only run on failure)."""
        kernels = {"attention": functools.partial(attention_variant, **knobs)} if knobs else {}
        if causal_mask is not None:
            kernels["causal_mask"] = causal_mask
        wrong = learner_model(course, upto=1, fixture="dense-tied", **kernels)
        return wrong(reference("dense-tied")["input_ids"])

    expect_logits(
        model,
        "dense-tied",
        what="logits of the dense-tied fixture with your attention (and your chapters 3-4 kernels)",
        reread=reread("9. Checkpoint: your attention in the real model"),
        mistakes=[
            Mistake(
                "query heads grouped the wrong way (head h used kv head h % Hkv)",
                lambda: logits_with(grouping="tile"),
                "Even position 0 is wrong because its value vector comes from the wrong kv head: head h uses "
                "kv head h // (Hq // Hkv).",
            ),
            Mistake(
                "scaled by 1/d instead of 1/sqrt(d)",
                lambda: logits_with(scale=1 / model.config.head_dim),
                "Divide the scores by sqrt(head_dim).",
            ),
            Mistake(
                "the softmax was taken over the queries (axis -2), not over the keys",
                lambda: logits_with(softmax_axis=-2),
                "Each query's weights over the keys sum to 1: softmax over the last axis of the [.., T, S] scores.",
            ),
            *model_mask_mistakes(logits_with)[1:],
        ],  # fmt: skip
    )


NAN_SPREAD = (
    "masked with -inf: the padding queries' rows became NaN, and the NaN reached the real tokens. A left-padding "
    "query may see no key at all; with -inf its softmax is 0/0 = NaN, which becomes keys and values in the next "
    "layer, and 0·NaN = NaN. Mask with np.finfo(np.float32).min."
)


def test_real_model_batch(course):
    """Your attention and mask in batched greedy generation (left padding + KV cache)"""
    from tinyqwen.errors import TinyQwenError
    from tinyqwen.generation import generate_batch

    fixture = "dense-tied"
    expected = json.loads((FIXTURES / fixture / "generate.json").read_text())
    model = learner_model(course, upto=5, fixture=fixture)
    what = f"8 greedy tokens for 3 prompts of lengths 3, 7, 11 in one left-padded batch ({fixture})"
    try:
        with np.errstate(all="ignore"):
            got = generate_batch(model, expected["prompts"], expected["max_new_tokens"], eos_token_ids=())
    except TinyQwenError as error:  # tinyqwen refuses to pick a token from NaN logits
        cause = f"\n  likely cause: {NAN_SPREAD}" if "nan" in str(error).lower() else ""
        raise GradeError(
            f"{what}\n  generation stopped: {error}{cause}\n  re-read: {reread('6. Padding masks')}"
        ) from None

    def tokens_with(**kernels):
        """The batch's tokens with tinyqwen's kernels and one classic mask mistake (only run on failure)."""
        wrong = learner_model(course, upto=1, fixture=fixture, **kernels)
        with np.errstate(all="ignore"):
            return generate_batch(wrong, expected["prompts"], expected["max_new_tokens"], eos_token_ids=())

    expect_equal(
        got,
        expected["batch"]["new_tokens"],
        what=what,
        inputs="transformers' model.generate(..., do_sample=False) on the same left-padded batch; "
        + model.your_code.report(),
        reread=reread("6. Padding masks"),
        mistakes=model_mask_mistakes(tokens_with),
    )
