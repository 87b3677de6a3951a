"""Chapter 6 checkpoints: SwiGLU, the decoder block, tied embeddings, the whole dense model.

Expected values come from transformers (exercises/references/ch06_dense_model.npz, made by
exercises/references/make_ch06_dense_model.py, and the fixtures' reference.npz). The wrong variants in the same
file (post-norm, a forgotten residual, …) only name a classic mistake when your output equals one of them.

Tolerances (float32 on both sides; only the summation order differs): 1e-6 absolute + 1e-6 relative for SiLU,
1e-5 for linear / SwiGLU (values of size ~1-5), 1e-4 for a decoder layer (values up to ~10, through attention and
four norms); whole-model logits: grading.expect_logits (|Δ| <= 1e-5 · max(1, max |logit|), grading.LOGITS_RTOL). Every classic mistake below moves the output by 0.1 or more.
"""

from __future__ import annotations

import functools

import numpy as np

from exercises.grading import (
    REFERENCES,
    Mistake,
    call,
    expect,
    expect_close,
    expect_equal,
    expect_logits,
    learner_model,
    notebook,
    reference,
    reference_file,
)
from tinyqwen.checkpoint import Checkpoint
from tinyqwen.config import CONFIG_DIR, load_config

REF = reference_file("ch06_dense_model.npz")
FIXTURES = REFERENCES.parent.parent / "tests" / "fixtures"
# reread("...") -> 'notebooks/06-dense-model.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 6)
SILU = reread("1.1 SiLU, a smooth switch")
LINEAR = reread("1.3 `linear`, and the `[out, in]` layout")
SWIGLU = reread("1.2 Gate × up: the GLU")
BLOCK = reread("2. The decoder block")
TIED = reread("3.1 Tied embeddings: one array, not two")
MODEL = reread("3. The whole model")
PARAMS = reread("4. How big is it? Parameters and memory")
FINAL = reread("6. Checkpoint: our dense model against transformers")
LAYER_KEYS = [k.removeprefix("decoder.w.") for k in REF if k.startswith("decoder.w.")]


def _fixture_weights(fixture: str) -> dict[str, np.ndarray]:
    """Every tensor of a fixture checkpoint as a fresh float32 array (BF16 widened exactly)."""
    with Checkpoint(FIXTURES / fixture) as ckpt:
        return {name: np.array(ckpt.get(name), dtype=np.float32) for name in sorted(ckpt.keys())}


def _layer(weights: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    prefix = f"model.layers.{i}."
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def _decoder_inputs() -> tuple:
    w = {k: REF["decoder.w." + k].copy() for k in LAYER_KEYS}
    return REF["decoder.x"].copy(), w, REF["decoder.cos"], REF["decoder.sin"], REF["decoder.mask"]


def layer_by_hand(x, w, cos, sin, mask, head_dim: int, eps: float, qk_norm: bool = True) -> np.ndarray:
    """Qwen3's decoder layer written out in NumPy (pre-norm; QK-Norm per head; split-half RoPE; GQA), with the
    QK-Norm optionally left out — a Llama or Qwen2 layer has none. Derived by hand, for the mistake below."""

    def norm(v, weight):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * weight

    def rope(v):  # [B, H, T, d]
        half = v.shape[-1] // 2
        turned = np.concatenate([-v[..., half:], v[..., :half]], axis=-1)
        return v * cos[:, None] + turned * sin[:, None]

    B, T, _ = x.shape
    a = "self_attn."
    h = norm(x, w["input_layernorm.weight"])
    q, k, v = (
        (h @ w[f"{a}{n}_proj.weight"].T).reshape(B, T, -1, head_dim) for n in ("q", "k", "v")
    )  # [B, T, H, d]
    if qk_norm:
        q, k = norm(q, w[a + "q_norm.weight"]), norm(k, w[a + "k_norm.weight"])
    q, k, v = rope(q.transpose(0, 2, 1, 3)), rope(k.transpose(0, 2, 1, 3)), v.transpose(0, 2, 1, 3)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.where(mask[:, None], q @ k.swapaxes(-1, -2) / np.sqrt(head_dim), np.finfo(np.float32).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, -1) @ w[a + "o_proj.weight"].T
    h = x + out
    m = norm(h, w["post_attention_layernorm.weight"])
    gate, up = m @ w["mlp.gate_proj.weight"].T, m @ w["mlp.up_proj.weight"].T
    return (h + (gate / (1 + np.exp(-gate)) * up) @ w["mlp.down_proj.weight"].T).astype(np.float32)


# ------------------------------------------------------------------------------------------ SwiGLU


def test_silu(course):
    """SiLU, also at ±1000"""
    z = REF["silu.z"]
    got = call(course.ch06.silu, z.copy(), reread=SILU, what="silu")
    expect_close(
        got, REF["silu.out"], what="silu(z) against torch.nn.functional.silu", atol=1e-6, rtol=1e-6, reread=SILU,
        inputs="z: 49 values from -12 to 12, then -1000, -100, 100, 1000",
        mistakes=[
            Mistake("you computed sigmoid(z), the switch alone", REF["silu.sigmoid"],
                    "SiLU multiplies z by its own sigmoid: z * sigmoid(z) = z / (1 + exp(-z))."),
            Mistake("you computed GELU (GPT-2's activation)", REF["silu.gelu"],
                    "Qwen3's config says hidden_act = 'silu': z / (1 + exp(-z))."),
            Mistake("you computed relu(z)", np.maximum(z, 0), "SiLU is smooth: z / (1 + exp(-z))."),
        ],
    )  # fmt: skip


def test_linear(course):
    """linear: x · wᵀ, the weight in the [out, in] layout"""
    hint = "the weight is stored [out, in] = [5, 6] and x is [..., 6]: compute x @ w.T, not x @ w"
    got = call(
        course.ch06.linear,
        REF["linear.x"],
        REF["linear.w"],
        hint=hint,
        reread=LINEAR,
        what="linear(x [2, 3, 6], w [5, 6])",
    )
    expect_close(got, REF["linear.out"], what="linear against torch.nn.functional.linear", atol=1e-5, reread=LINEAR,
                 inputs="x [2, 3, 6], w [5, 6] (out 5, in 6)")  # fmt: skip
    got = call(
        course.ch06.linear,
        REF["linear_sq.x"],
        REF["linear_sq.w"],
        reread=LINEAR,
        what="linear(x [4, 6], w [6, 6])",
    )
    expect_close(
        got, REF["linear_sq.out"], what="linear with a square weight", atol=1e-5, reread=LINEAR,
        inputs="x [4, 6], w [6, 6] (square, so a missing transpose does not fail on shapes)",
        mistakes=[Mistake("x @ w: the weight was used without transposing it", REF["linear_sq.no_transpose"],
                          "Checkpoints store each weight as [out, in] (row j = output channel j): y = x @ w.T.")],
    )  # fmt: skip


def _swiglu_mistakes(index) -> list[Mistake]:
    return [
        Mistake("SiLU applied to the up projection instead of the gate", REF["swiglu.silu_on_up"][index],
                "It is silu(x @ w_gate.T) * (x @ w_up.T): the gate goes through SiLU, up does not."),
        Mistake("sigmoid instead of SiLU on the gate", REF["swiglu.sigmoid_gate"][index],
                "The gate's activation is silu(g) = g * sigmoid(g), not sigmoid(g) alone."),
    ]  # fmt: skip


def test_swiglu_one_token(course):
    """SwiGLU on one token"""
    x = REF["swiglu.x"][0, 0]
    ws = (REF["swiglu.w_gate"], REF["swiglu.w_up"], REF["swiglu.w_down"])
    got = call(course.ch06.swiglu, x.copy(), *ws, reread=SWIGLU, what="swiglu on one token")
    expect_close(got, REF["swiglu.out"][0, 0], what="swiglu(x) against transformers' Qwen3MLP", atol=1e-5,
                 inputs="x [16], w_gate [40, 16], w_up [40, 16], w_down [16, 40]",
                 mistakes=_swiglu_mistakes((0, 0)), reread=SWIGLU)  # fmt: skip


def test_swiglu_batch(course):
    """SwiGLU on a batch [2, 4, 16]"""
    ws = (REF["swiglu.w_gate"], REF["swiglu.w_up"], REF["swiglu.w_down"])
    got = call(
        course.ch06.swiglu,
        REF["swiglu.x"].copy(),
        *ws,
        reread=SWIGLU,
        hint="every leading axis is a batch axis: `x @ w.T` works for [..., d] as it is",
        what="swiglu on x [2, 4, 16]",
    )
    expect_close(got, REF["swiglu.out"], what="swiglu(x) against transformers' Qwen3MLP", atol=1e-5,
                 inputs="x [2, 4, 16] (batch, time, hidden), MLP width 40", mistakes=_swiglu_mistakes(...),
                 reread=SWIGLU)  # fmt: skip


# ------------------------------------------------------------------------------------------ the block


def test_decoder_layer(course):
    """One decoder layer against transformers' Qwen3DecoderLayer"""
    x, w, cos, sin, mask = _decoder_inputs()
    x_before = x.copy()
    got = call(course.ch06.decoder_layer, x, w, cos, sin, mask, 16, 1e-6, reread=BLOCK, what="decoder_layer")
    expect(np.array_equal(x, x_before), what="decoder_layer", reread=BLOCK,
           problem="your decoder_layer changed its input x in place (x += … or x[...] = …): the caller's "
                   "residual stream is not yours to modify; write h = x + … instead")  # fmt: skip
    expect_close(
        got, REF["decoder.out"], what="decoder_layer against transformers' Qwen3DecoderLayer", atol=1e-4, reread=BLOCK,
        inputs="x [2, 6, 48], 4 query / 2 kv heads of head_dim 16, MLP width 96, causal mask; row 1 at positions 4..9",
        mistakes=[
            Mistake("post-norm wiring: out = norm(x + sublayer(x))", REF["decoder.post_norm"],
                    "Qwen3 is pre-norm: normalise a copy going INTO each sublayer, and add its output to the "
                    "un-normalised x: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."),
            Mistake("the attention residual is missing (h = attn(norm1(x)) instead of x + attn(norm1(x)))",
                    REF["decoder.no_attn_residual"], "Add the attention output to x."),
            Mistake("the MLP residual is missing (out = mlp(norm2(h)) instead of h + mlp(norm2(h)))",
                    REF["decoder.no_mlp_residual"], "Add the MLP output to h."),
            Mistake("x itself was normalised before the residual (x = norm(x); x = x + attn(x))",
                    REF["decoder.norm_in_residual"],
                    "Keep the residual stream un-normalised: h = x + attn(norm1(x)) — norm1(x) is a new array."),
            Mistake("the two norms are swapped", REF["decoder.swapped_norms"],
                    "input_layernorm goes before attention, post_attention_layernorm before the MLP."),
            Mistake("QK-Norm is missing (a Llama or Qwen2 layer has none; Qwen3 adds it)",
                    lambda: layer_by_hand(*_decoder_inputs(), 16, 1e-6, qk_norm=False),
                    "Normalise every head's q and k with q_norm and k_norm (RMSNorm over head_dim) before RoPE."),
        ],
    )  # fmt: skip


def test_fixture_layer(course):
    """Layer 0 of a real checkpoint: the dense-tied fixture"""
    weights = _fixture_weights("dense-tied")
    ref = reference("dense-tied")
    x = ref["hidden_states"][0]  # transformers' embedding output, [2, 12, 64]
    B, T, _ = x.shape
    # cos/sin derived by hand from transformers' own inv_freq (stored in the fixture): split-half layout
    angles = np.arange(T, dtype=np.float32)[:, None] * ref["inv_freq"][None, :]
    angles = np.broadcast_to(np.concatenate([angles, angles], axis=-1), (B, T, 2 * ref["inv_freq"].size))
    mask = np.broadcast_to(np.tril(np.ones((T, T), dtype=bool)), (B, T, T))
    got = call(
        course.ch06.decoder_layer,
        x.copy(),
        _layer(weights, 0),
        np.cos(angles),
        np.sin(angles),
        mask,
        32,
        1e-6,
        reread=BLOCK,
        what="decoder_layer on the fixture's layer 0",
    )
    expect_close(got, ref["hidden_states"][1], what="layer 0 output against transformers (fixture dense-tied)",
                 atol=1e-4, reread=BLOCK,
                 inputs="x [2, 12, 64] = the embedding output, hidden 64, 4 query / 2 kv heads, head_dim 32 (≠ 64/4)")  # fmt: skip


# ------------------------------------------------------------------------------------------ the whole model


def test_tied_head(course):
    """Tied embeddings: the head is the embedding array itself"""
    weights = _fixture_weights("dense-tied")
    embed = weights["model.embed_tokens.weight"]
    head = call(
        course.ch06.lm_head_weight,
        weights,
        True,
        reread=TIED,
        what="lm_head_weight(weights, tie_word_embeddings=True)",
    )
    expect_close(head, embed, what="the tied head's values", atol=0.0, reread=TIED,
                 inputs="fixture dense-tied (no lm_head.weight in the file)")  # fmt: skip
    expect(
        np.shares_memory(np.asarray(head), embed), what="the tied head", reread=TIED,
        problem="your head has the right values but is a copy of the embedding (np.shares_memory(head, embed) is "
                "False). Tied means ONE array: return weights['model.embed_tokens.weight'] itself. A copy gives the "
                "same logits today, but doubles that memory (311 MB for Qwen3-0.6B in bf16) and stops following "
                "the embedding as soon as the weights change (fine-tuning).",
    )  # fmt: skip
    untied = _fixture_weights("dense-untied-bf16-sharded")
    head = call(
        course.ch06.lm_head_weight,
        untied,
        False,
        reread=TIED,
        what="lm_head_weight(weights, tie_word_embeddings=False)",
    )
    expect_close(
        head, untied["lm_head.weight"], what="the untied head", atol=0.0, reread=TIED,
        inputs="fixture dense-untied-bf16-sharded (its file has an lm_head.weight)",
        mistakes=[Mistake("the embedding was used as the head of an untied model", untied["model.embed_tokens.weight"],
                          "Untied checkpoints (Qwen3-8B and up) have their own 'lm_head.weight': use it.")],
    )  # fmt: skip


def test_count_parameters(course):
    """Parameter counts of Qwen3-0.6B, 4B and 8B"""
    for name in ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B"):
        c = load_config(CONFIG_DIR / f"{name}.json")
        want = int(REF[f"params.{name}"])
        got = call(course.ch06.count_parameters, c, reread=PARAMS, what=f"count_parameters({name})")
        VH, L, H = c.vocab_size * c.hidden_size, c.num_hidden_layers, c.hidden_size
        norms = 2 * c.head_dim * L + 2 * H * L + H
        mistakes = [
            Mistake("q_norm and k_norm ([head_dim] each, in every layer) are not counted", want - 2 * c.head_dim * L),
            Mistake("the RMSNorm weights are not counted", want - norms),
            Mistake("q_proj and o_proj sized hidden × hidden", want - 2 * H * c.q_size + 2 * H * H,
                    "Their size is hidden × (num_attention_heads · head_dim) — head_dim is its own number in Qwen3."),
            Mistake("the MLP counted with two matrices", want - L * H * c.intermediate_size,
                    "SwiGLU has three: gate, up and down."),
        ]  # fmt: skip
        if c.tie_word_embeddings:
            mistakes.append(Mistake("the tied head was counted a second time", want + VH,
                                    "Tied: the head is the embedding, counted once."))  # fmt: skip
        else:
            mistakes.append(Mistake("the untied head (lm_head) is not counted", want - VH))
        got = int(got) if isinstance(got, (int, np.integer)) else got
        expect_equal(got, want, what=f"count_parameters({name}) against transformers' model", mistakes=mistakes,
                     reread=PARAMS, inputs=f"tinyqwen/data/configs/{name}.json")  # fmt: skip


def _forward(course, fixture: str):
    weights = _fixture_weights(fixture)
    ref = reference(fixture)
    config = load_config(FIXTURES / fixture)
    return call(
        course.ch06.forward,
        ref["input_ids"].copy(),
        weights,
        config,
        reread=MODEL,
        what=f"forward on fixture {fixture}",
    )


def test_forward_tied(course):
    """The whole model: logits of the tied fixture"""
    expect_logits(
        _forward(course, "dense-tied"), "dense-tied", what="forward: logits against transformers", reread=MODEL,
        mistakes=[Mistake("the final RMSNorm (model.norm) is missing", REF["forward.dense-tied.no_final_norm"],
                          "After the last layer: logits = rms_norm(x, model.norm.weight) @ head.T.")],
    )  # fmt: skip


def test_forward_untied(course):
    """The whole model: an untied, BF16, sharded checkpoint"""
    fixture = "dense-untied-bf16-sharded"
    expect_logits(
        _forward(course, fixture), fixture, what="forward: logits against transformers", reread=MODEL,
        mistakes=[
            Mistake("the final RMSNorm (model.norm) is missing", REF[f"forward.{fixture}.no_final_norm"]),
            Mistake("the embedding was used as the head", REF[f"forward.{fixture}.embed_as_head"],
                    "This model is untied (tie_word_embeddings false): its head is 'lm_head.weight'."),
        ],
    )  # fmt: skip


def test_real_model(course):
    """Your code in the real model: chapters 3-6 run Qwen3"""
    for fixture in ("dense-tied", "dense-untied-bf16-sharded"):
        model = learner_model(course, upto=6, fixture=fixture)
        expect_logits(model, fixture, what=f"the fixture {fixture} running your code of chapters 2-6 (loader, "
                      "embed, norms, RoPE, mask, attention, swiglu, linear)", reread=FINAL)  # fmt: skip
