# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 6 · SwiGLU, the decoder block and the dense model
#
# Five chapters in, we hold almost every part of Qwen3: the token embedding and RMSNorm
# ([chapter 3](03-embeddings-rmsnorm.ipynb)), rotary position embeddings ([chapter 4](04-rope-yarn.ipynb)) and
# grouped-query attention with QK-Norm ([chapter 5](05-attention.ipynb)). One part is missing — the feed-forward
# network, which Qwen3 builds as a **SwiGLU** — and the parts have never been wired together.
#
# This chapter does both. By its end, a forward pass written in this notebook turns token ids into the same logits
# as Hugging Face transformers' `Qwen3ForCausalLM`, on a real checkpoint file.
#
# **What you will build**
#
# 1. `silu`, `linear` and `swiglu` — the feed-forward network;
# 2. `decoder_layer` — attention and SwiGLU, each behind an RMSNorm and inside a residual connection;
# 3. `forward` — embedding → layers → final norm → output head, with the head *tied* to the embedding;
# 4. a parameter count and memory estimate for the official Qwen3-0.6B, 4B and 8B.

# %%

import matplotlib.pyplot as plt
import numpy as np

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
REF = np.load(REPO / "exercises" / "references" / "ch06_dense_model.npz")  # made by transformers

# %% [markdown]
# `REF` holds what transformers computes on small seeded inputs (its generator is
# `exercises/references/make_ch06_dense_model.py`); `tests/fixtures/` holds tiny random Qwen3 checkpoints in the
# official file layout together with transformers' logits for them. Neither needs torch to read.
#
# ## 1. The feed-forward network
#
# Attention moves information *between* positions: each output is a weighted average of value vectors. What it
# does not do is think hard about any single position — apart from the softmax, it is linear in the values. The
# feed-forward network (the "MLP") is the opposite: it looks at one position at a time, and applies a wide
# non-linear function to it. Every position goes through the same weights.
#
# It is also where most of the parameters live. A quick count for one layer of Qwen3-0.6B (hidden size 1024,
# 16 query heads and 8 key/value heads of 128 dimensions, MLP width 3072):

# %%
hidden, q_size, kv_size, ffn = 1024, 16 * 128, 8 * 128, 3072  # Qwen3-0.6B's config.json
attn_params = hidden * q_size + 2 * hidden * kv_size + q_size * hidden  # q, k, v, o projections
mlp_params = 3 * hidden * ffn  # gate, up, down
print(f"attention {attn_params / 1e6:.1f}M, MLP {mlp_params / 1e6:.1f}M per layer "
      f"-> {mlp_params / (attn_params + mlp_params):.0%} of a layer is MLP")  # fmt: skip

# %% [markdown]
# ### 1.1 SiLU, a smooth switch
#
# The original Transformer's MLP was `relu(x W₁) W₂`. Qwen3 (like Llama, Mistral and most current models) uses the
# **SiLU** (sigmoid linear unit, also called *swish*) instead:
#
# $$\operatorname{silu}(z) = z \cdot \sigma(z) = \frac{z}{1 + e^{-z}}$$
#
# The sigmoid $\sigma(z)$ is a soft on/off switch between 0 and 1, and SiLU multiplies the input by its own switch.
# For large positive $z$ the switch is open and $\operatorname{silu}(z) \approx z$; for large negative $z$ it is
# closed and $\operatorname{silu}(z) \approx 0$. In between it is smooth — unlike ReLU's kink at 0 — and dips
# slightly below zero.

# %%
def silu(z):  # [...] -> [...]
    # z / (1 + e^-z): one exp, one division; for z = -1000, e^1000 overflows to inf and z / inf = -0.0 is right
    with np.errstate(over="ignore"):
        return z / (1 + np.exp(-z))


# %% [markdown]
# Why not ReLU? ReLU's gradient is exactly 0 for every negative input, so a unit that drifts negative for all
# inputs stops learning for good (a "dead" unit). SiLU's gradient is small there but not zero, and its curve has no
# corner. Side by side:

# %%
z = np.linspace(-6, 6, 241, dtype=np.float32)
fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.plot(z, silu(z), lw=2.5, label=r"silu(z) = z·σ(z)")
ax.plot(z, np.maximum(z, 0), "--", label="relu(z)")
ax.plot(z, 1 / (1 + np.exp(-z)), ":", label="σ(z): the switch")
ax.axhline(0, color="k", lw=0.5)
ax.set(title="SiLU is z times a soft switch on z", xlabel="z", ylabel="activation", ylim=(-1.2, 6))
ax.legend()
plt.show()

# %% [markdown]
# The minimum sits near $z = -1.28$, at about $-0.28$. The formula $z/(1+e^{-z})$ also matters numerically: for
# $z = -1000$, $e^{1000}$ overflows to `inf`, and $z / \infty$ correctly gives 0. The other common way to write
# the sigmoid, $e^{z}/(1+e^{z})$, gives $\infty/\infty$ = NaN at $z = +1000$. Two checks against transformers:
# `torch.nn.functional.silu` on values from −12 to 12 and the extreme ±100 and ±1000.

# %%
z, want = REF["silu.z"], REF["silu.out"]
print("silu(-1000), silu(1000) =", silu(z[-4]), silu(z[-1]))
print(f"max |Δ| vs torch: {np.abs(silu(z) - want).max():.1e}")

# %% [markdown]
# ### 1.2 Gate × up: the GLU
#
# SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer") uses *two* projections up to the MLP width $f$
# instead of one. One of them, the **gate**, goes through SiLU and decides, channel by channel, how much of the
# other one, **up**, gets through; **down** then projects back to the model width $d$:
#
# $$\operatorname{SwiGLU}(x) = W_\text{down}\,\big(\operatorname{silu}(W_\text{gate}\,x) \odot W_\text{up}\,x\big),
# \qquad W_\text{gate}, W_\text{up} \in \mathbb{R}^{f\times d},\; W_\text{down} \in \mathbb{R}^{d\times f}$$
#
# ($\odot$ is the element-wise product; Qwen3's projections have no bias.) The product of two projections of the
# same $x$ lets the block compute (roughly) quadratic functions of its input, and in Shazeer's experiments it trains
# to better quality for the same number of parameters. It has three matrices instead of two, so the paper shrinks
# the width from the classic $4d$ to $\tfrac{8}{3}d$ to keep the count equal; Qwen3 picks $3d$ to $3.8d$
# (3072 for $d = 1024$ in the 0.6B model).
#
# First as a loop over one token — every multiply spelled out:

# %%
def swiglu_loop(x, w_gate, w_up, w_down):  # one token: [d] -> [d]
    f, d = w_gate.shape
    a = np.zeros(f, dtype=np.float32)
    for j in range(f):  # each hidden channel
        g = sum(w_gate[j, i] * x[i] for i in range(d))  # row j of W_gate · x
        u = sum(w_up[j, i] * x[i] for i in range(d))
        a[j] = silu(g) * u  # the switch times the value
    return np.array([sum(w_down[k, j] * a[j] for j in range(f)) for k in range(d)], dtype=np.float32)


# %% [markdown]
# ### 1.3 `linear`, and the `[out, in]` layout
#
# The loop reads `w_gate[j, i]`: row $j$ of the weight belongs to *output* channel $j$. That is how PyTorch's
# `nn.Linear` stores a weight and how every Qwen3 checkpoint file holds it: **`[out_features, in_features]`**.
# `gate_proj` of Qwen3-0.6B is `[3072, 1024]`. So for a row vector $x$, the layer computes $x W^\top$:

# %%
def linear(x, w):  # [..., d_in], [d_out, d_in] -> [..., d_out]
    return x @ w.T  # w.T is a view: NumPy hands BLAS the transposed layout, nothing is copied


def swiglu(x, w_gate, w_up, w_down):  # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)


# %% [markdown]
# Forgetting the transpose is the classic bug here. With a non-square weight NumPy refuses (`x @ w` with
# `[.., 6] @ [5, 6]` has mismatched shapes); with a square one — like attention's `o_proj` in some models — it
# silently computes something else. The vectorised version must equal the loop, and both must equal transformers'
# `Qwen3MLP` on the stored input (`x` is `[2, 4, 16]`: batch, time, model width 16; the MLP width is 40):

# %%
x, wg, wu, wd = (REF[f"swiglu.{k}"] for k in ("x", "w_gate", "w_up", "w_down"))
print("shapes:", x.shape, wg.shape, wu.shape, wd.shape, "->", swiglu(x, wg, wu, wd).shape)
print(f"loop vs vectorised, one token: max |Δ| = {np.abs(swiglu_loop(x[0, 0], wg, wu, wd) - swiglu(x[0, 0], wg, wu, wd)).max():.1e}")
print(f"vectorised vs transformers' Qwen3MLP: max |Δ| = {np.abs(swiglu(x, wg, wu, wd) - REF['swiglu.out']).max():.1e}")

# %% [markdown]
# What does the gate do to the signal? Below, for the 8 tokens of that input, are the gate after SiLU, the up
# projection, and their product — the vector that `down` reads. Wherever the gate is near zero (pale), the up value
# is switched off, whatever its size. The gate is computed from the token itself, so each token opens a different
# set of channels.

# %%
tokens = x.reshape(-1, 16)
panels = {"silu(gate · x)": silu(linear(tokens, wg)), "up · x": linear(tokens, wu)}
panels["product"] = panels["silu(gate · x)"] * panels["up · x"]
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8), sharey=True)
for ax, (name, value) in zip(axes, panels.items()):
    lim = np.abs(value).max()
    im = ax.imshow(value, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set(title=name, xlabel="MLP channel (of 40)")
    fig.colorbar(im, ax=ax, fraction=0.05)
axes[0].set_ylabel("token")
fig.suptitle("The gate switches channels of `up` on and off, per token", y=1.04)
plt.show()

# %% [markdown]
# ## 2. The decoder block
#
# A Qwen3 layer (transformers calls it `Qwen3DecoderLayer`) has two sublayers, attention then SwiGLU, and wires
# each of them the same way: normalise a copy of the input, run the sublayer on it, **add** the result back.

# %%
from matplotlib.patches import FancyBboxPatch

fig, ax = plt.subplots(figsize=(6, 7.5))
ax.set(xlim=(0, 10), ylim=(-0.3, 14.2), title="One Qwen3 decoder layer (pre-norm)")
ax.axis("off")
ax.annotate("", xy=(2, 13.4), xytext=(2, 0.4), arrowprops=dict(arrowstyle="-|>", lw=4, color="0.6"))
ax.text(2, -0.1, "x  (the residual stream)", ha="center")
ax.text(2, 13.7, "output", ha="center")
for y0, norm, sub, color in [(1.0, "input_layernorm", "self_attn\n(QK-Norm, RoPE, GQA)", "#cfe2f3"),
                             (7.0, "post_attention_layernorm", "mlp\n(SwiGLU)", "#d9ead3")]:  # fmt: skip
    ax.annotate("", xy=(6.5, y0 + 0.9), xytext=(2, y0 + 0.4),
                arrowprops=dict(arrowstyle="-|>", connectionstyle="angle,angleA=0,angleB=90"))  # fmt: skip
    for k, (label, fc) in enumerate([(f"RMSNorm\n({norm})", "#fff2cc"), (sub, color)]):
        ax.add_patch(FancyBboxPatch((4.0, y0 + 1.0 + 1.9 * k), 5.0, 1.1, boxstyle="round,pad=0.1", fc=fc))
        ax.text(6.5, y0 + 1.55 + 1.9 * k, label, ha="center", va="center", fontsize=9)
    ax.annotate("", xy=(6.5, y0 + 2.8), xytext=(6.5, y0 + 2.2), arrowprops=dict(arrowstyle="-|>"))
    ax.annotate("", xy=(2.3, y0 + 4.8), xytext=(6.5, y0 + 4.1),
                arrowprops=dict(arrowstyle="-|>", connectionstyle="angle,angleA=90,angleB=0"))  # fmt: skip
    ax.text(2, y0 + 4.8, "+", ha="center", va="center", fontsize=18, fontweight="bold",
            bbox=dict(boxstyle="circle", fc="white"))  # fmt: skip
plt.show()

# %% [markdown]
# In symbols, with $x$ the layer's input:
#
# $$h = x + \operatorname{Attention}\big(\operatorname{RMSNorm}_1(x)\big), \qquad
# \text{out} = h + \operatorname{SwiGLU}\big(\operatorname{RMSNorm}_2(h)\big)$$
#
# This is **pre-norm**: the norm sits at the entrance of each branch, and the straight line on the left — the
# *residual stream* — is never normalised inside the layer. Each sublayer only *adds* its contribution to it. The
# original Transformer (2017) was **post-norm**, $\text{out} = \operatorname{Norm}(x + F(x))$: it normalised the
# stream itself after every addition. Pre-norm keeps an untouched path from the embedding to the last layer, so
# gradients reach early layers intact, and deep stacks train without the careful warm-up post-norm needs. The price
# is that the stream's size grows layer after layer — which is why the whole model ends with one more RMSNorm.
#
# ### 2.1 The attention sublayer, from chapter 5's pieces
#
# We import the pieces earlier chapters built (tinyqwen's versions — the notebooks of chapters 3–5 show they equal
# transformers'): RMSNorm, RoPE and grouped-query attention. The weights come as a dictionary with the official
# tensor names, exactly as they appear in a checkpoint file, minus the `model.layers.{i}.` prefix.

# %%
from tinyqwen.attention import attention, causal_mask  # chapter 5
from tinyqwen.norm import rms_norm  # chapter 3
from tinyqwen.rope import apply_rope, rope_cos_sin, rope_parameters  # chapter 4

# %% [markdown]
# The sublayer is chapter 5's attention with its projections: queries, keys and values are projected, split into
# heads, queries and keys get QK-Norm and then RoPE, and after attention the heads are merged and projected back by
# `o_proj`. Note that only q and k are normalised and rotated; v is used as projected.

# %%
def self_attention(x, w, cos, sin, mask, head_dim, eps):  # [B, T, hidden] -> [B, T, hidden]
    B, T, _ = x.shape
    # project, split into heads, QK-Norm each head (over head_dim), then rotate: [B, heads, T, head_dim]
    q = rms_norm(linear(x, w["self_attn.q_proj.weight"]).reshape(B, T, -1, head_dim), w["self_attn.q_norm.weight"], eps)
    k = rms_norm(linear(x, w["self_attn.k_proj.weight"]).reshape(B, T, -1, head_dim), w["self_attn.k_norm.weight"], eps)
    v = linear(x, w["self_attn.v_proj.weight"]).reshape(B, T, -1, head_dim).transpose(0, 2, 1, 3)
    q, k = apply_rope(q.transpose(0, 2, 1, 3), cos, sin), apply_rope(k.transpose(0, 2, 1, 3), cos, sin)
    out = attention(q, k, v, mask)  # [B, Hq, T, head_dim]
    return linear(out.transpose(0, 2, 1, 3).reshape(B, T, -1), w["self_attn.o_proj.weight"])


# %% [markdown]
# ### 2.2 The layer
#
# With both sublayers in hand, the layer is the two equations above, line for line:

# %%
def decoder_layer(x, w, cos, sin, mask, head_dim, eps):  # [B, T, hidden] -> [B, T, hidden]
    h = x + self_attention(rms_norm(x, w["input_layernorm.weight"], eps), w, cos, sin, mask, head_dim, eps)
    mlp = [w[f"mlp.{name}_proj.weight"] for name in ("gate", "up", "down")]
    return h + swiglu(rms_norm(h, w["post_attention_layernorm.weight"], eps), *mlp)


# %% [markdown]
# transformers ran one `Qwen3DecoderLayer` (model width 48, 4 query heads sharing 2 key/value heads of 16
# dimensions, MLP width 96) on a stored input, with its own cos/sin tables and a causal mask. The second sequence of
# the batch sits at positions 4 to 9 — as if it followed a 4-token prefix — so its RoPE angles differ from the
# first's; a layer that computed its own positions from 0 would get it wrong. That is why `decoder_layer` takes
# `cos` and `sin` as inputs instead of making them. Shapes first, then values:

# %%
w = {k.removeprefix("decoder.w."): REF[k] for k in REF.files if k.startswith("decoder.w.")}
x, cos, sin, mask = REF["decoder.x"], REF["decoder.cos"], REF["decoder.sin"], REF["decoder.mask"]
out = decoder_layer(x, w, cos, sin, mask, head_dim=16, eps=1e-6)
print("x", x.shape, "cos", cos.shape, "mask", mask.shape, "->", out.shape)
print(f"max |Δ| vs transformers' Qwen3DecoderLayer: {np.abs(out - REF['decoder.out']).max():.1e}")

# %% [markdown]
# The stored file also holds what the *wrong* wirings give on the same input — post-norm, a forgotten residual —
# made from the same official sublayers. They are not small perturbations: every one of them changes the output
# completely, which is why the graded exercise can tell them apart and name the bug.

# %%
for name in ("post_norm", "no_attn_residual", "no_mlp_residual", "norm_in_residual", "swapped_norms"):
    print(f"{name:>17}: max |Δ| from the right output = {np.abs(REF['decoder.' + name] - REF['decoder.out']).max():.2f}")

# %% [markdown]
# ## 3. The whole model
#
# The dense Qwen3 is now three lines of glue around the layer:
#
# $$x_0 = E[\text{ids}], \qquad x_{i+1} = \operatorname{layer}_i(x_i), \qquad
# \text{logits} = \operatorname{RMSNorm}(x_L)\, W_\text{head}^\top$$
#
# The embedding table $E$ is `[vocab, hidden]`; the head $W_\text{head}$ has the same shape and gives each token of
# the vocabulary a score. Let us load a real checkpoint file: `tests/fixtures/dense-tied` is a 2-layer Qwen3 with
# random weights, written exactly like the official `Qwen/Qwen3-0.6B` files ([chapter 2](02-loading-weights.ipynb)
# reads safetensors byte by byte).

# %%
from tinyqwen.config import load_config
from tinyqwen.safetensors import load_file

config = load_config(FIXTURES / "dense-tied")
weights = load_file(FIXTURES / "dense-tied" / "model.safetensors")  # {official name: float32 array}
for name in list(weights)[:4] + ["model.norm.weight"]:
    print(f"{name:48} {list(weights[name].shape)}")
print(len(weights), "tensors; tie_word_embeddings =", config.tie_word_embeddings, "; 'lm_head.weight' in file:", "lm_head.weight" in weights)

# %% [markdown]
# Note what is *not* in the file: an `lm_head.weight`. We come back to that in a moment. To run the layers we need
# each layer's tensors under the short names `decoder_layer` expects, the RoPE tables for positions $0 \dots T-1$
# (every row of the batch starts at position 0) and a causal mask (each token sees itself and the past).

# %%
def layer_weights(weights, i):  # one layer's tensors, the "model.layers.{i}." prefix removed
    prefix = f"model.layers.{i}."
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


print(sorted(layer_weights(weights, 0)))

# %% [markdown]
# Those are the eleven tensors `decoder_layer` reads. The whole forward pass computes the RoPE tables and the mask
# once and shares them between all layers (every layer sees the same positions):

# %%
def forward(ids, weights, config):  # [B, T] int -> [B, T, vocab]
    B, T = ids.shape
    eps = config.rms_norm_eps
    positions = np.broadcast_to(np.arange(T), (B, T))
    cos, sin = rope_cos_sin(positions, *rope_parameters(config))  # [B, T, head_dim] x2
    mask = np.broadcast_to(causal_mask(T, T), (B, T, T))
    x = weights["model.embed_tokens.weight"][ids]  # [B, T, hidden]
    for i in range(config.num_hidden_layers):
        x = decoder_layer(x, layer_weights(weights, i), cos, sin, mask, config.head_dim, eps)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])  # tied: no lm_head in the file
    return linear(rms_norm(x, weights["model.norm.weight"], eps), head)


# %% [markdown]
# The fixture's `reference.npz` holds transformers' logits for a stored batch of ids (two sequences of 12 random
# token ids — the fixture has no tokenizer). Our forward pass gives one score per vocabulary entry, 512 of them,
# at every position; position $t$'s scores predict token $t+1$:

# %%
ref = np.load(FIXTURES / "dense-tied" / "reference.npz")
logits = forward(ref["input_ids"], weights, config)
print("ids", ref["input_ids"].shape, "-> logits", logits.shape)
print(f"max |Δ| vs transformers: {np.abs(logits - ref['logits']).max():.1e}  (logits up to {np.abs(ref['logits']).max():.0f})")

# %% [markdown]
# ### 3.1 Tied embeddings: one array, not two
#
# Qwen3-0.6B and 4B set `"tie_word_embeddings": true`: their files have **no** `lm_head.weight`. The output head
# *is* the embedding table — the score of token $v$ is the dot product of the final hidden state with $v$'s own
# embedding:
#
# $$\text{logit}_v = \operatorname{RMSNorm}(x_L) \cdot E_v$$
#
# The idea (Press & Wolf, 2017) is that reading a token in and writing it out are two uses of the same map between
# tokens and vectors: a hidden state that "means" token $v$ should point in the direction of $v$'s embedding. For
# Qwen3-0.6B it saves $151936 \times 1024 = 156$ M parameters, a quarter of the model; larger models, where the
# vocabulary is a small share, keep two matrices.
#
# "Is" means the same array in memory. tinyqwen's loader makes the head the very same NumPy object:

# %%
import tinyqwen

model = tinyqwen.load_model(FIXTURES / "dense-tied")
print("model.weights.lm_head is model.weights.embed:", model.weights.lm_head is model.weights.embed)
print("np.shares_memory(lm_head, embed):          ", np.shares_memory(model.weights.lm_head, model.weights.embed))

# %% [markdown]
# A common first attempt is `lm_head = embed.copy()` — or loading the embedding twice. It gives **exactly the same
# logits**, so no output check catches it. But it doubles that memory (311 MB more in bf16 for Qwen3-0.6B), and it
# breaks the model the first time the weights change: fine-tune the embedding and the copy stays behind, so the
# "tied" model now has two different matrices. Here is one simulated training step — nudging the embedding of token
# 7 — applied to the tied weights and to a copy:

# %%
embed = weights["model.embed_tokens.weight"].copy()  # a writable table for the experiment
tied = {**weights, "model.embed_tokens.weight": embed}  # no lm_head: the head is `embed` itself
copied = {**tied, "lm_head.weight": embed.copy()}  # the mistake
print("before the step, logits equal:", np.array_equal(forward(ref["input_ids"], tied, config), forward(ref["input_ids"], copied, config)))
embed[7] += 0.5  # the "gradient step" changes the one shared table
delta = np.abs(forward(ref["input_ids"], tied, config) - forward(ref["input_ids"], copied, config))
print(f"after it: max |Δ| = {delta.max():.2f} — the copy's head never saw the update (score of token 7 changed only in the tied model)")

# %% [markdown]
# ### 3.2 An untied, BF16, sharded checkpoint
#
# Qwen3-8B is untied: its file has an `lm_head.weight` of its own. The fixture `dense-untied-bf16-sharded` is
# like it — 3 layers, bfloat16 tensors split over two files. Our `forward` picks the head from the dictionary, so it
# runs unchanged (BF16 values widen exactly to float32 on loading):

# %%
from tinyqwen.checkpoint import Checkpoint

with Checkpoint(FIXTURES / "dense-untied-bf16-sharded") as ckpt:
    weights_untied = {name: np.asarray(ckpt.get(name), dtype=np.float32) for name in ckpt.keys()}
config_untied = load_config(FIXTURES / "dense-untied-bf16-sharded")
ref_untied = np.load(FIXTURES / "dense-untied-bf16-sharded" / "reference.npz")
logits_untied = forward(ref_untied["input_ids"], weights_untied, config_untied)
print(f"untied: max |Δ| vs transformers = {np.abs(logits_untied - ref_untied['logits']).max():.1e}")

# %% [markdown]
# ### 3.3 The residual stream, sublayer by sublayer
#
# Pre-norm means each sublayer writes *into* the stream. We can watch it: run the untied fixture's 3 layers by
# hand and record, after the embedding and after every sublayer, how large the write was and how large the stream
# has become (root-mean-square over all positions).

# %%
def rms(a):
    return float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))


ids, c, wts = ref_untied["input_ids"], config_untied, weights_untied
B, T = ids.shape
cos, sin = rope_cos_sin(np.broadcast_to(np.arange(T), (B, T)), *rope_parameters(c))
mask = np.broadcast_to(causal_mask(T, T), (B, T, T))

# %% [markdown]
# The loop is `decoder_layer` opened up: the same two lines, with the sublayers' outputs kept for the plot.

# %%
x = wts["model.embed_tokens.weight"][ids]
labels, writes, stream = ["embed"], [rms(x)], [rms(x)]
for i in range(c.num_hidden_layers):
    w = layer_weights(wts, i)
    eps = c.rms_norm_eps
    a = self_attention(rms_norm(x, w["input_layernorm.weight"], eps), w, cos, sin, mask, c.head_dim, eps)
    x = x + a
    m = swiglu(rms_norm(x, w["post_attention_layernorm.weight"], eps), *(w[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
    x = x + m
    labels += [f"attn {i}", f"mlp {i}"]
    writes += [rms(a), rms(m)]
    stream += [rms(x - m), rms(x)]

# %%
fig, ax = plt.subplots(figsize=(7.5, 3.4))
ax.bar(labels, writes, color=["0.6"] + ["#6fa8dc", "#93c47d"] * c.num_hidden_layers, label="what the sublayer adds")
ax.plot(labels, stream, "ko-", label="the residual stream after it")
ax.set(title="Each sublayer adds to the stream; nothing normalises it in between", ylabel="RMS")
ax.legend()
plt.show()
print("the stream after the last layer equals transformers' hidden state:",
      np.allclose(x, ref_untied["hidden_states"][-1], atol=1e-4))  # fmt: skip

# %% [markdown]
# The stream only grows, and its size is arbitrary — the next layer's RMSNorm rescales its input anyway. That is
# why the final `model.norm` comes before the head: without it the logits would scale with whatever size the
# stream reached. (In trained models the growth is far stronger than in these random ones.)
#
# ## 4. How big is it? Parameters and memory
#
# Counting from `config.json` alone, with $d$ = hidden size, $f$ = MLP width, $h_q, h_{kv}$ the head counts,
# $d_h$ = head_dim, $V$ = vocabulary, $L$ = layers:
#
# | part | parameters |
# |---|---|
# | embedding | $V d$ |
# | per layer: attention | $d\,(h_q d_h) + 2\,d\,(h_{kv} d_h) + (h_q d_h)\,d + 2 d_h$ (q, k, v, o, and the two QK-Norm weights) |
# | per layer: SwiGLU | $3\,d f$ |
# | per layer: the two RMSNorms | $2d$ |
# | final norm | $d$ |
# | output head | $V d$ if untied, else 0 |

# %%
def count_parameters(c):  # a tinyqwen Qwen3Config -> {part: number of parameters}
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 2 * c.head_dim
    return {
        "embedding": c.vocab_size * c.hidden_size,
        "attention": c.num_hidden_layers * attn,
        "MLP": c.num_hidden_layers * 3 * c.hidden_size * c.intermediate_size,
        "norms": c.num_hidden_layers * 2 * c.hidden_size + c.hidden_size,
        "output head": 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size,
    }


# %% [markdown]
# The official configs of three dense Qwen3 models ship with tinyqwen (`tinyqwen/data/configs/`, byte-exact copies
# of the Hub files). The generator of `REF` had transformers build each model (on PyTorch's "meta" device: shapes
# only, no memory) and count its parameters, a tied one once:

# %%
from tinyqwen.config import CONFIG_DIR

names = ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B"]
configs = {n: load_config(CONFIG_DIR / f"{n}.json") for n in names}
parts = {n: count_parameters(c) for n, c in configs.items()}
parts["Qwen3-0.6B"]

# %% [markdown]
# Summed, next to transformers' count and tinyqwen's `count_parameters`, with the memory the weights take at 2
# bytes (bf16) and 4 bytes (fp32) each:

# %%
print(f"{'model':11} {'ours':>15} {'transformers':>15} {'non-embedding':>14} {'tied':>5} {'bf16':>8} {'fp32':>8}")
for n, p in parts.items():
    total = sum(p.values())
    assert total == int(REF[f"params.{n}"]) == tinyqwen.config.count_parameters(configs[n])
    body = total - p["embedding"] - p["output head"]
    print(f"{n:11} {total:>15,} {int(REF[f'params.{n}']):>15,} {body / 1e9:>13.2f}B {str(configs[n].tie_word_embeddings):>5} "
          f"{2 * total / 2**30:>6.1f}GiB {4 * total / 2**30:>6.1f}GiB")  # fmt: skip

# %% [markdown]
# The non-embedding counts — 0.44B, 3.63B and 6.95B — are the ones the Qwen3 model cards quote, and the exact
# totals equal transformers' count for every model: the formula misses nothing (not even the two small QK-Norm
# vectors per layer, 256 parameters each). A dense model
# touches every weight for every token, so the memory column is also roughly the bytes read per generated token.
# The checkpoints are bfloat16 (2 bytes a weight); tinyqwen computes in float32 (4 bytes), so it needs twice the
# file size in RAM — 2.2 GiB for Qwen3-0.6B, 30.5 GiB for Qwen3-8B. Where do the parameters sit?

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
totals = np.array([sum(parts[n].values()) for n in names])
bottom = np.zeros(len(names))
for part in ["embedding", "attention", "MLP", "norms", "output head"]:
    share = 100 * np.array([parts[n][part] for n in names]) / totals
    ax1.bar(names, share, bottom=bottom, label=part)
    bottom += share
ax1.set(title="Where the parameters are", ylabel="% of the model's parameters", ylim=(0, 135))
ax1.legend(ncol=3, loc="upper center")
for k, (label, nbytes) in enumerate([("bf16 (the checkpoint)", 2), ("fp32 (tinyqwen)", 4)]):
    ax2.bar(np.arange(3) + 0.4 * k, totals * nbytes / 2**30, width=0.4, label=label)
ax2.set(title="Weight memory", ylabel="GiB", xticks=np.arange(3) + 0.2, xticklabels=names)
ax2.legend()
plt.show()

# %% [markdown]
# In the small model the embedding is a large share (the vocabulary of 151,936 tokens does not shrink with the
# model) — which is exactly where tying pays. From 4B up, the MLP holds two thirds of the whole model, and the norms
# are invisible: a few hundred thousand parameters in total. The weights are not the only memory a model needs —
# the attention keys and values of every past token come on top, which [chapter 8](08-kv-cache-generation.ipynb)
# measures.
#
# ## 5. A real checkpoint
#
# If an official Qwen3 checkpoint is on this machine (`$TINYQWEN_MODEL`, or `Qwen/Qwen3-0.6B` in the Hugging Face
# cache), tinyqwen's model — the same equations as above — continues a prompt with it. Otherwise this cell says so
# and the fixtures stand in.

# %%
from tinyqwen.hub import official_checkpoint

path = official_checkpoint()
if path is None:
    print("No official Qwen3 checkpoint on this machine ($TINYQWEN_MODEL or the Hugging Face cache): the fixtures stand in.")
else:
    real = tinyqwen.load_model(path)
    tok = tinyqwen.Tokenizer.from_pretrained(path)
    ids = np.array(tok.encode("The capital of France is"))
    top = np.argsort(-real(ids)[-1])[:5]
    print(f"{path.name}: tied = {real.weights.lm_head is real.weights.embed}, "
          f"{sum(count_parameters(real.config).values()):,} parameters by our formula")  # fmt: skip
    print("most likely next tokens:", [tok.decode([int(t)]) for t in top])

# %% [markdown]
# ## 6. Checkpoint: our dense model against transformers
#
# The `forward` written in this notebook — SwiGLU, the pre-norm block and the tied head, on top of chapters 3–5 —
# must give transformers' logits on both dense fixtures: the tied float32 one and the untied, sharded bfloat16 one.
# The bound is 1e-4 on logits of size ~10–30: both sides compute in float32, and only the order of the sums in
# matrix products differs (a wrong wiring moves logits by whole units, as section 2.2 showed).

# %%
for fixture in ["dense-tied", "dense-untied-bf16-sharded"]:
    ref = np.load(FIXTURES / fixture / "reference.npz")
    with Checkpoint(FIXTURES / fixture) as ckpt:
        wts = {name: np.asarray(ckpt.get(name), dtype=np.float32) for name in ckpt.keys()}
    got = forward(ref["input_ids"], wts, load_config(FIXTURES / fixture))
    err = np.abs(got - ref["logits"]).max()
    assert got.shape == ref["logits"].shape and err <= 1e-4, (fixture, err)
    print(f"{fixture}: logits {list(got.shape)}, max |Δ| = {err:.1e} ≤ 1e-4 against transformers")

# %% [markdown]
# ## Summary
#
# - **SwiGLU** is $W_\text{down}(\operatorname{silu}(W_\text{gate}x) \odot W_\text{up}x)$: the SiLU of the
#   gate switches the up projection's channels on and off, per token.
# - Checkpoint weights are stored **`[out, in]`**: a linear layer is `x @ w.T`.
# - A decoder layer is **pre-norm**: $h = x + \operatorname{Attn}(\operatorname{Norm}(x))$, then
#   $h + \operatorname{MLP}(\operatorname{Norm}(h))$. The residual stream is never normalised inside the stack —
#   only once at the end, before the head.
# - With **tied embeddings**, the head is the embedding array itself — the same object, not a copy.
# - Qwen3-0.6B / 4B / 8B have 0.60 / 4.02 / 8.19 billion parameters: 1.1 / 7.5 / 15.3 GiB in bf16.
#
# Next, [chapter 7](07-mixture-of-experts.ipynb) replaces the SwiGLU of some layers with *many* SwiGLUs and a router
# that picks a few of them per token.
#
# ## Exercises
#
# Fill in `exercises/ch06_dense_model.py` (`silu`, `linear`, `swiglu`, `decoder_layer`, `lm_head_weight`,
# `forward`, `count_parameters`) and run
#
# ```bash
# pytest exercises/test_ch06_dense_model.py
# ```
#
# The last checkpoint runs the real fixture model with *your* `rms_norm`, `apply_rope`, `attention`, `swiglu` and
# `linear` from chapters 3–6 inside it, and compares its logits with transformers'.
#
# ### Beyond fill-in-the-function: the capstone
#
# Once chapter 7 is done too, close the book and write the model again, this time with no scaffolding:
# `exercises/ch15_capstone_model.py` asks for one decoder layer (dense *or* mixture of experts) and the whole
# forward pass, given only the weights by their official names, the config and the positions — no formula, no
# worked example. `pytest exercises/test_ch15_capstone_model.py` grades it against transformers' own decoder layer
# and the logits of five fixtures (tied and untied, YaRN, two Qwen3-MoE).
