"""Chapter 3 checkpoints: the embedding lookup and RMSNorm.

Expected values come from torch's nn.Embedding and transformers' own Qwen3RMSNorm on fixed-seed inputs
(exercises/references/make_ch03_embeddings_rmsnorm.py → ch03_embeddings_rmsnorm.npz), and from transformers'
outputs stored with the fixtures (tests/fixtures/*/reference.npz: `hidden_states[0]` is the embedding output,
`logits` the model's). The classic wrong answers (Mistake) are derived by hand in this file.

Tolerances: RMSNorm outputs are of size ~1-4 and both sides compute in float32 (transformers multiplies by rsqrt,
we may divide by sqrt): a few float32 ulps, so atol = rtol = 1e-5. A lookup does no arithmetic: exact.
"""

from __future__ import annotations

import functools

import numpy as np

from exercises.grading import (
    FIXTURES,
    GradeError,
    Mistake,
    expect,
    expect_close,
    expect_logits,
    learner_model,
    notebook,
    reference,
    reference_file,
)

REF = reference_file("ch03_embeddings_rmsnorm.npz")
ATOL = RTOL = 1e-5


# reread("...") -> 'notebooks/03-embeddings-rmsnorm.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 3)


def _fixture_table(fixture: str) -> np.ndarray:
    from tinyqwen.checkpoint import Checkpoint

    with Checkpoint(FIXTURES / fixture) as checkpoint:
        return np.array(checkpoint.get("model.embed_tokens.weight"))


def _gemma_scale(ids: np.ndarray, table: np.ndarray) -> Mistake:
    return Mistake(
        f"the vectors were multiplied by sqrt(hidden) = {table.shape[1] ** 0.5:.4g}, Gemma's embedding scale",
        lambda: table[ids] * np.float32(table.shape[1] ** 0.5),
        "Qwen3 (like Llama) uses the table's rows as they are: no scale.",
    )


# ------------------------------------------------------------------------------------------ RMSNorm's classic bugs


def _rms_mistakes(x: np.ndarray, w: np.ndarray, eps: float) -> list[Mistake]:
    """The outputs of the classic RMSNorm bugs on this input, derived by hand."""
    x32 = x.astype(np.float32)
    ms = np.mean(x32 * x32, axis=-1, keepdims=True)

    def layer_norm():
        centred = x32 - x32.mean(axis=-1, keepdims=True)
        return centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + eps) * w

    def over(axes):
        return x32 / np.sqrt(np.mean(x32 * x32, axis=axes, keepdims=True) + eps) * w

    def in_half():
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            h = x.astype(np.float16)
            return (
                h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + np.float16(eps)) * w.astype(np.float16)
            ).astype(np.float32)

    mistakes = [
        Mistake("the mean was subtracted (that is LayerNorm)", layer_norm,
                "RMSNorm divides x itself by its root mean square: no centring, no bias."),
        Mistake("the weight was left out", lambda: x32 / np.sqrt(ms + eps),
                "Multiply the normalised vector by `weight`, one learned scale per coordinate."),
        Mistake("the square root is missing", lambda: x32 / (ms + eps) * w,
                "Divide by sqrt(mean(x**2) + eps), the root mean square, not by the mean square."),
        Mistake("eps was added outside the square root", lambda: x32 / (np.sqrt(ms) + eps) * w,
                "Eps goes inside the square root: x / sqrt(mean(x**2) + eps)."),
        Mistake("eps is missing", lambda: x32 / np.sqrt(ms) * w,
                "Add eps under the square root; without it an all-zero vector gives 0/0 = NaN."),
        Mistake("computed in float16", in_half,
                "Convert x to float32 first: float16 squares overflow above 256 (and lose precision)."),
        Mistake("the weight was applied as (1 + weight), Gemma's convention", lambda: x32 / np.sqrt(ms + eps) * (1 + w),
                "Qwen3 (like Llama) stores the scale itself: multiply by weight, not by 1 + weight."),
        Mistake("the squares were summed, not averaged (sum instead of mean)",
                lambda: x32 / np.sqrt(np.sum(x32 * x32, axis=-1, keepdims=True) + eps) * w,
                "The root MEAN square: np.mean(x * x, axis=-1), i.e. the sum divided by d."),
    ]  # fmt: skip
    if x.ndim > 1:
        mistakes.append(
            Mistake(
                "the mean square was taken over the whole array, not per vector (no axis)",
                lambda: over(None),
                "Average over the last axis only: np.mean(x * x, axis=-1, keepdims=True).",
            )  # fmt: skip
        )
        for axis in range(x.ndim - 1):
            mistakes.append(
                Mistake(
                    f"the mean square was taken over axis {axis} instead of the last axis",
                    lambda a=axis: over(a),
                    "Normalise each vector along the last axis: axis=-1.",
                )  # fmt: skip
            )
    if x.ndim == 4:
        mistakes.append(
            Mistake(
                "all heads of a token were normalised together",
                lambda: over((-2, -1)),
                "QK-Norm normalises each head's head_dim vector on its own: only the last axis.",
            )  # fmt: skip
        )
    return [Mistake(m.cause, _quiet(m.wrong), m.hint) for m in mistakes]


def _quiet(compute):
    """Run a wrong variant without NumPy's overflow / 0-by-0 warnings: producing inf or NaN is its point."""

    def run():
        with np.errstate(all="ignore"):
            return compute()

    return run


def _check_rms(ch, case: str, what: str, reread: str, extra=()) -> np.ndarray:
    x, w, eps, want = (REF[f"rms.{case}.{k}"] for k in ("x", "weight", "eps", "out"))
    eps = float(eps)
    given = x.copy()
    got = ch.rms_norm(given, w.copy(), eps)
    expect_close(
        got,
        want,
        atol=ATOL,
        rtol=RTOL,
        what=what,
        inputs=f"x {list(x.shape)} {x.dtype}, weight {list(w.shape)}, eps {eps:g}",
        mistakes=[*extra, *_rms_mistakes(x, w, eps)],
        reread=reread,
    )
    expect(
        np.array_equal(given, x), what=what, problem="rms_norm changed its input x in place", reread=reread
    )
    return np.asarray(got)


# ------------------------------------------------------------------------------------------ checkpoints


def test_embed_sequence(course):
    """Embedding lookup for a sequence"""
    ch = course.ch03
    ids, table, want = (REF[f"embed.one.{k}"] for k in ("ids", "table", "out"))
    expect_close(
        ch.embed(ids.copy(), table.copy()),
        want,
        atol=0.0,
        what="embed(ids, table) vs torch.nn.Embedding",
        inputs=f"ids {ids.tolist()}, table [20, 8]",
        mistakes=[
            Mistake(
                "the table's columns were indexed",
                lambda: table.T[ids % table.shape[1]].T,
                "The table is [vocab, hidden]: token t is row t, table[t].",
            ),  # fmt: skip
            _gemma_scale(ids, table),
        ],
        reread=reread("1. From ids to vectors: the embedding table"),
    )


def test_embed_batch(course):
    """A batch of ids keeps its shape"""
    ch = course.ch03
    ids, table, want = (REF[f"embed.batch.{k}"] for k in ("ids", "table", "out"))
    expect_close(
        ch.embed(ids.copy(), table.copy()),
        want,
        atol=0.0,
        what="embed(ids [2, 5], table [20, 8]) → [2, 5, 8], vs torch.nn.Embedding",
        inputs=f"ids {ids.tolist()}",
        reread=reread("1. From ids to vectors: the embedding table"),
    )


def test_embed_real_table(course):
    """The embedding of a real checkpoint equals transformers'"""
    ch = course.ch03
    ref = reference("dense-tied")
    expect_close(
        ch.embed(ref["input_ids"], _fixture_table("dense-tied")),
        ref["hidden_states"][0],
        atol=0.0,
        mistakes=[_gemma_scale(ref["input_ids"], _fixture_table("dense-tied"))],
        what="embed(input_ids, model.embed_tokens.weight) vs transformers' embed_tokens output",
        inputs="fixture dense-tied, input_ids [2, 12], table [512, 64]",
        reread=reread("2. A lookup is a one-hot matrix product"),
    )


def test_embed_refuses_bad_ids(course):
    """Ids outside the vocabulary are refused"""
    ch = course.ch03
    table = REF["embed.one.table"]  # 20 rows
    section = reread("2. A lookup is a one-hot matrix product")
    for ids, why in (
        (
            [3, -1],
            "NumPy reads table[-1] as the LAST row: a padding id of -1 would silently get a real vector",
        ),
        ([3, 20], "id 20 does not exist in a 20-row table (ids are 0..19)"),
    ):
        try:
            out = ch.embed(np.array(ids), table)
        except NotImplementedError:
            raise
        except (IndexError, ValueError):
            continue
        except Exception as error:  # an error, but not the one promised by the docstring
            raise GradeError(
                f"embed(ids={ids}) raised {type(error).__name__}: {error}; raise IndexError or ValueError instead"
                f"\n  re-read: {section}"
            ) from None
        expect(
            False,
            what=f"embed(ids={ids}, table [20, 8])",
            problem=f"it returned an array of shape {list(np.shape(out))} instead of raising an error: {why}. "
            "Check that every id is in [0, vocab) and raise IndexError otherwise",
            reread=section,
        )


def test_rms_norm_vector(course):
    """RMSNorm of one vector"""
    _check_rms(course.ch03, "vector", "rms_norm(x [8]) vs transformers' Qwen3RMSNorm",
               reread("6. From a loop to NumPy"))  # fmt: skip


def test_rms_norm_batch(course):
    """RMSNorm of each vector in a batch"""
    _check_rms(course.ch03, "batch", "rms_norm(x [2, 5, 64] with mean 1.5) vs transformers' Qwen3RMSNorm",
               reread("5. RMSNorm: the math"))  # fmt: skip


def test_rms_norm_heads(course):
    """QK-Norm: RMSNorm on every head"""
    _check_rms(course.ch03, "heads", "rms_norm(q [B, T, heads, head_dim] = [2, 5, 4, 32], weight [32]) vs Qwen3RMSNorm",
               reread("9. QK-Norm: the same function on every head"))  # fmt: skip


def test_rms_norm_tiny(course):
    """Tiny activations: ε inside the square root"""
    _check_rms(course.ch03, "tiny", "rms_norm(x [3, 16] of size ~1e-3, last row all zeros) vs Qwen3RMSNorm",
               reread("7. ε goes inside the square root"))  # fmt: skip


def test_rms_norm_float16_input(course):
    """float16 input is computed in float32"""
    ch = course.ch03
    section = reread("8. Compute in float32")
    want, w = REF["rms.large.out"], REF["rms.large.weight"]
    got = _check_rms(
        ch, "large", "rms_norm(x [4, 64] float16 of size 300-3000) vs Qwen3RMSNorm in float32", section,
        extra=[
            Mistake("the result was cast to float16", lambda: want.astype(np.float16).astype(np.float32),
                    "Return the float32 result; do not cast back to the input's dtype."),
            Mistake("the normalised vector was cast to float16 before the weight",
                    lambda: (want / w).astype(np.float16).astype(np.float32) * w,
                    "Keep everything in float32, the weight product included."),
        ],
    )  # fmt: skip
    expect(got.dtype == np.float32, what="rms_norm(float16 x)", reread=section,
           problem=f"expected a float32 result, got {got.dtype}: compute in float32 and return that")  # fmt: skip


def test_real_model(course):
    """Your embedding and RMSNorm in the real model"""
    section = reread("10. Checkpoint: against transformers")
    for fixture in ("dense-tied", "dense-untied-bf16-sharded"):
        # weights read by your chapter-2 loader; the lookup runs your embed, every norm is your rms_norm
        model = learner_model(course, upto=3, fixture=fixture)
        expect_logits(
            model,
            fixture,
            what=f"logits of {fixture} with your embed and rms_norm (input, post-attention, QK and final norms)",
            reread=section,
        )
