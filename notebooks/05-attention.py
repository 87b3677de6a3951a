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
# # Chapter 5 · Attention
#
# Every layer of Qwen3 starts with **attention**, the one place where tokens exchange information. Each token asks
# a question (its *query*), every earlier token offers a label (its *key*) and some content (its *value*); the
# token reads a weighted average of the contents, weighted by how well each label answers its question.
#
# The idea fits in one line, and most of this chapter is about what makes it work on real hardware and a real
# checkpoint: a softmax that never overflows, the $1/\sqrt{d}$ scale, masks (causal, with a KV cache, with left
# padding), Qwen3's **grouped-query attention** (several query heads share one key/value head) and **QK-Norm**.
# At the end we look at what a real model attends to, and run a fixture checkpoint with our own attention.
#
# **What you will build** (the same functions as `exercises/ch05_attention.py`)
#
# 1. `softmax` — numerically stable, along any axis;
# 2. `causal_mask` — which keys each query may see, also when the keys come from a cache;
# 3. `attention` — scaled dot-product attention with grouped-query heads and a boolean mask.

# %%
import dataclasses
import json

import matplotlib.pyplot as plt
import numpy as np

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
REF = np.load(REPO / "exercises" / "references" / "ch05_attention.npz")  # made by transformers


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())

# %% [markdown]
# `REF` holds what torch and transformers compute on small seeded inputs: `torch.softmax`, the masks of
# `transformers.masking_utils`, and Qwen3's `eager_attention_forward` (the generator is
# `exercises/references/make_ch05_attention.py`).
#
# ## 1. Attention in one picture
#
# One query $q$ and three keys and values, two dimensions each. The query scores each key by a dot product, the
# scores become weights that sum to 1, and the output is the weighted average of the values:

# %%
q = np.array([1.0, 0.0])
K = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # keys: "same direction", "orthogonal", "opposite"
V = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
scores = np.array([q @ k for k in K])
weights = np.exp(scores) / np.exp(scores).sum()
print("scores", scores, "-> weights", weights.round(3), "-> output", (weights[:, None] * V).sum(0).round(2))

# %% [markdown]
# The key pointing the query's way wins most of the weight. Stacking all queries into a matrix $Q$ (one row per
# token) gives the whole layer at once:
#
# $$\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\Big(\frac{QK^\top}{\sqrt{d}} + M\Big)\,V$$
#
# with $d$ = `head_dim` and a mask $M$ that is $0$ where a query may look and very negative where it may not.
# Sections 2–4 take the pieces one at a time.
#
# ## 2. Softmax, and why we subtract the max
#
# $\operatorname{softmax}(x)_j = e^{x_j} / \sum_l e^{x_l}$. Written exactly like that, it breaks on large inputs:
# float32 overflows above $e^{88.7}$, and then it computes $\infty/\infty$:

# %%
def softmax_naive(x, axis=-1):
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)

x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    print(softmax_naive(x), softmax_naive(x + 1000))

# %% [markdown]
# The fix costs one line. Adding the same number $c$ to every entry changes nothing,
# $e^{x_j - c} / \sum_l e^{x_l - c} = e^{x_j} / \sum_l e^{x_l}$, so choose $c = \max_l x_l$: the largest
# exponent is then $e^0 = 1$ and nothing can overflow. `keepdims=True` keeps the reduced axis (size 1) so the max and
# the sum broadcast back against `x`, whichever axis we reduce:

# %%
def softmax(x, axis=-1):  # [...] -> [...]
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

print(softmax(x), softmax(x + 1000))

# %% [markdown]
# Masked scores (section 4) are float32's most negative number. A row where *everything* is masked is the harsh
# case: without the max subtraction every $e^{x}$ is 0, and $0/0$ is NaN; with it, the row becomes uniform.
# Against `torch.softmax` on all four reference inputs (ordinary rows, a middle axis, $x + 1000$, masked rows):

# %%
for case in ("rows", "middle", "large", "masked"):
    x_ref, axis = REF[f"softmax.{case}.x"], int(REF[f"softmax.{case}.axis"])
    delta = maxdiff(softmax(x_ref, axis), REF[f"softmax.{case}.out"])
    print(f"{case:>7}: x {x_ref.shape}, axis {axis:>2}: max |Δ| = {delta:.1e}")

# %% [markdown]
# ## 3. Scaled dot products: why 1/√d
#
# If the entries of $q$ and $k$ are independent with mean 0 and variance 1, their dot product is a sum of $d$
# such products: mean 0, **variance $d$**. With `head_dim` = 128 the scores spread over ±30, the softmax puts
# nearly all weight on one key, and its gradient almost vanishes. Dividing by $\sqrt{d}$ brings the variance back
# to 1 whatever the head size:

# %%
rng = np.random.default_rng(0)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for d in (16, 128):
    qs, ks = rng.standard_normal((2, 4000, d))
    raw = (qs * ks).sum(-1)
    axes[0].hist(raw, bins=60, alpha=0.6, label=f"d = {d}: std {raw.std():.1f}")
    axes[1].hist(raw / np.sqrt(d), bins=60, alpha=0.6, label=f"d = {d}: std {(raw / np.sqrt(d)).std():.2f}")
axes[0].set(title="q·k", xlabel="score", ylabel="count")
axes[1].set(title="q·k / √d", xlabel="score")
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# What that does to the attention weights: the largest weight among 64 keys, averaged over many random queries.
# Unscaled, the softmax turns into an arg-max as $d$ grows; scaled, it keeps its spread:

# %%
dims = [4, 8, 16, 32, 64, 128, 256]
peak = {"q·k": [], "q·k / √d": []}
for d in dims:
    s = (rng.standard_normal((500, 1, d)) * rng.standard_normal((500, 64, d))).sum(-1)  # [500 queries, 64 keys]
    peak["q·k"].append(softmax(s).max(-1).mean())
    peak["q·k / √d"].append(softmax(s / np.sqrt(d)).max(-1).mean())
plt.figure(figsize=(5.5, 3.2))
for name, values in peak.items():
    plt.semilogx(dims, values, "o-", base=2, label=name)
plt.xlabel("head_dim d"), plt.ylabel("mean largest weight"), plt.title("Softmax saturation, 64 keys")
plt.legend()
plt.show()

# %% [markdown]
# ## 4. The causal mask
#
# Qwen3 generates text left to right, so while it is trained to predict token $t+1$ the query at position $t$ must
# not see the keys after it. The **causal mask** allows key $j$ for query $i$ only when $j \le i$. As a loop:

# %%
T = 5
mask_loop = np.zeros((T, T), dtype=bool)
for i in range(T):
    for j in range(T):
        mask_loop[i, j] = j <= i
print(mask_loop.astype(int))

# %% [markdown]
# With a **KV cache** ([chapter 8](08-kv-cache-generation.ipynb)) the keys of earlier tokens are kept, and a forward
# pass only brings the new tokens: $n_q$ queries against $n_k$ keys, and the queries are the **last** $n_q$ of
# the $n_k$ positions. Query $i$ sits at position $i + (n_k - n_q)$. One comparison of two `arange`s covers both
# cases:

# %%
def causal_mask(n_q, n_k):  # -> [n_q, n_k] bool, True = may attend
    query_positions = np.arange(n_k - n_q, n_k)  # the queries are the last n_q positions
    return np.arange(n_k)[None, :] <= query_positions[:, None]

print(np.array_equal(causal_mask(T, T), mask_loop))
print(causal_mask(2, 5).astype(int))

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [1, 1]})
for ax, (n_q, n_k) in zip(axes, [(8, 8), (3, 8)]):
    ax.imshow(causal_mask(n_q, n_k), cmap="Greens", vmin=0, vmax=1.4)
    ax.set(xlabel="key position j", ylabel="query", xticks=range(n_k),
           yticks=range(n_q), yticklabels=[f"{i} (pos {i + n_k - n_q})" for i in range(n_q)])
axes[0].set_title("prefill: 8 queries, 8 keys")
axes[1].set_title("with a cache: 3 new queries, 8 keys")
plt.tight_layout()
plt.show()

# %% [markdown]
# The same masks as transformers builds them (`masking_utils.sdpa_mask` with `q_offset = n_k − n_q`):

# %%
for key in ("causal.4x4", "causal.1x6", "causal.3x8"):
    n_q, n_k = map(int, key.split(".")[1].split("x"))
    print(key, "equal:", np.array_equal(causal_mask(n_q, n_k), REF[key]))

# %% [markdown]
# How is a mask applied? Not by multiplying scores by 0 — a score of 0 still gets weight $e^{0 - \max}$. A masked
# score must become so negative that its weight is exactly 0. transformers adds float32's most negative number
# (`torch.finfo(float32).min` ≈ −3.4·10³⁸); we write it with `np.where`. Section 6 shows why not $-\infty$.

# %%
MASKED = np.finfo(np.float32).min

def attention_one_head(q, k, v, mask):  # [T, d], [S, d], [S, d], [T, S] -> [T, d]
    scores = q @ k.T / np.sqrt(q.shape[-1])  # [T, S]
    scores = np.where(mask, scores, MASKED)
    return softmax(scores) @ v

r = {n: REF[f"attn.one_head.{n}"] for n in ("q", "k", "v", "mask", "out")}
out = attention_one_head(r["q"][0, 0], r["k"][0, 0], r["v"][0, 0], r["mask"][0])
print(out.shape, "max |Δ| vs transformers' eager attention:", maxdiff(out, r["out"][0, 0]))

# %% [markdown]
# ## 5. Grouped-query attention
#
# A layer has several **heads**, each with its own queries, keys and values of `head_dim` channels, attending
# independently; their outputs are concatenated. In classic multi-head attention every head has its own keys and
# values. During generation those are kept in the KV cache for every past token — and the cache, not the weights,
# becomes the memory bottleneck for long contexts.
#
# **Grouped-query attention** (GQA, Ainslie et al. 2023) keeps all the query heads but fewer key/value heads: each
# kv head serves a *group* of consecutive query heads. The Qwen3 family, read from the configs:

# %%
from tinyqwen.config import CONFIG_DIR, load_config  # CONFIG_DIR: the official config.json files tinyqwen ships

print(f"{'model':<14} {'layers':>6} {'q heads':>8} {'kv heads':>9} {'group':>6}   KV cache per token (bf16)")
for name in ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-30B-A3B"):
    c = load_config(CONFIG_DIR / f"{name}.json")
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # k and v, 2 bytes each
    group = c.num_attention_heads // c.num_key_value_heads
    print(f"{name:<14} {c.num_hidden_layers:>6} {c.num_attention_heads:>8} {c.num_key_value_heads:>9} {group:>6} "
          f"{per_token / 1024:>10.0f} KiB (one kv head per query head: {group * per_token / 1024:.0f} KiB)")

# %% [markdown]
# At Qwen3's trained context of 32,768 tokens, the 0.6B model's cache is 112 KiB × 32,768 = 3.5 GiB per sequence
# — larger than its weights (1.2 GB in bf16). Without GQA it would be twice that; for the 30B-A3B, eight times.
#
# Which query head uses which kv head? Consecutive ones share: with $H_q$ query heads and $H_{kv}$ kv heads the
# group size is $g = H_q / H_{kv}$ and **query head $h$ uses kv head $\lfloor h / g \rfloor$**. (That is what
# transformers' `repeat_kv` does: it repeats each kv head $g$ times *in place*, like `np.repeat(k, g, axis=1)` —
# not `np.tile`, which would cycle through them and give head $h$ the kv head $h \bmod H_{kv}$.)

# %%
def draw_groups(ax, n_q, n_kv, kv_of, title):
    for h in range(n_q):
        ax.plot([h, (kv_of(h) + 0.5) * n_q / n_kv - 0.5], [1, 0], color=plt.cm.tab10(kv_of(h)), lw=2)
    ax.scatter(range(n_q), [1] * n_q, s=120, c=[plt.cm.tab10(kv_of(h)) for h in range(n_q)], zorder=3)
    ax.scatter([(j + 0.5) * n_q / n_kv - 0.5 for j in range(n_kv)], [0] * n_kv, s=300, marker="s",
               c=[plt.cm.tab10(j) for j in range(n_kv)], zorder=3)
    ax.set(yticks=[0, 1], yticklabels=["kv heads", "query heads"], xticks=range(n_q), title=title)

fig = plt.figure(figsize=(10, 4.6))
grid = fig.add_gridspec(2, 2)
draw_groups(fig.add_subplot(grid[0, :]), 16, 8, lambda h: h // 2, "Qwen3-0.6B: 16 query heads share 8 kv heads")
draw_groups(fig.add_subplot(grid[1, 0]), 4, 2, lambda h: h // 2, "right: head h uses kv head h // 2 (repeat)")
draw_groups(fig.add_subplot(grid[1, 1]), 4, 2, lambda h: h % 2, "wrong: head h uses kv head h % 2 (tile)")
plt.tight_layout()
plt.show()

# %% [markdown]
# First as a loop over query heads, which says exactly that:

# %%
def attention_loop(q, k, v, mask):  # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] -> [B, Hq, T, d]
    B, Hq = q.shape[:2]
    group = Hq // k.shape[1]
    out = np.empty_like(q)
    for b in range(B):
        for h in range(Hq):
            out[b, h] = attention_one_head(q[b, h], k[b, h // group], v[b, h // group], mask[b])
    return out

# %% [markdown]
# The vectorised form never copies the keys: view the queries as `[B, Hkv, group, T, d]`, so the group axis
# broadcasts against a kv head that is shared, and the mask gets its two head axes the same way:

# %%
def attention(q, k, v, mask):  # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] bool -> [B, Hq, T, d]
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, T, d)  # heads h = kv * group + g: consecutive heads share a kv head
    scores = qg @ k[:, :, None].swapaxes(-1, -2) * np.float32(d**-0.5)  # [B, Hkv, group, T, S]
    scores = np.where(mask[:, None, None], scores, MASKED)
    return (softmax(scores) @ v[:, :, None]).reshape(B, Hq, T, d)

# %% [markdown]
# Shapes, the loop, and transformers — on 4 query heads over 2 kv heads, and on Qwen3-0.6B's 16 over 8:

# %%
for case in ("gqa", "qwen3_0_6b", "cache"):
    r = {n: REF[f"attn.{case}.{n}"] for n in ("q", "k", "v", "mask", "out")}
    o = attention(r["q"], r["k"], r["v"], r["mask"])
    print(f"{case:>10}: q {r['q'].shape} k {r['k'].shape} -> {o.shape}; "
          f"vs loop {maxdiff(o, attention_loop(r['q'], r['k'], r['v'], r['mask'])):.1e}, "
          f"vs transformers {maxdiff(o, r['out']):.1e}")

# %% [markdown]
# (`cache` is the KV-cache case: 3 new queries against 8 keys, with the mask `causal_mask(3, 8)`.)
#
# ## 6. Padding masks
#
# To run prompts of different lengths as one batch, the short ones are **left-padded** with a filler token to a
# rectangle, and an `attention_mask` marks the real tokens (1) and the padding (0). Left, so that every row's
# newest token sits in the last column when generating. The fixture's batch, as transformers ran it:

# %%
batch = json.loads((FIXTURES / "dense-tied" / "generate.json").read_text())["batch"]
key_mask = np.array(batch["attention_mask"], dtype=bool)  # [B, S]
print(np.array(batch["input_ids"]))
print(key_mask.astype(int))

# %% [markdown]
# The mask a layer uses is the causal mask AND the padding mask of the keys — no real token may look at a pad:

# %%
T = key_mask.shape[1]
full_mask = causal_mask(T, T)[None] & key_mask[:, None, :]  # [B, T, S]
fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
for b, ax in enumerate(axes):
    ax.imshow(full_mask[b], cmap="Greens", vmin=0, vmax=1.4)
    ax.set(title=f"row {b}: {int(key_mask[b].sum())} real tokens", xlabel="key", ylabel="query",
           xticks=range(0, T, 2), yticks=range(0, T, 2))
plt.tight_layout()
plt.show()

# %% [markdown]
# Look at row 0: its first 8 queries are padding, and they may see **no key at all** — every score of those rows is
# masked. Their outputs are thrown away, but they are still computed, and what the mask writes there matters:
#
# - **0** (or multiplying scores by the mask): masked keys keep a real weight. Wrong everywhere.
# - **−∞**: real rows are fine, but a fully masked row is $e^{-\infty}/\sum e^{-\infty} = 0/0$ = **NaN**.
# - **float32 min**: a fully masked row becomes a uniform average — meaningless, finite, harmless.
#
# On the reference's padding case (row 0 left-padded by 2):

# %%
def attention_fill(q, k, v, mask, fill):
    group = q.shape[1] // k.shape[1]
    s = q @ np.repeat(k, group, axis=1).swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    with np.errstate(invalid="ignore"):
        return softmax(np.where(mask[:, None], s, fill)) @ np.repeat(v, group, axis=1)

r = {n: REF[f"attn.padding.{n}"] for n in ("q", "k", "v", "mask", "out")}
for fill in (0.0, -np.inf, MASKED):
    o = attention_fill(r["q"], r["k"], r["v"], r["mask"], np.float32(fill))
    nan, delta = int(np.isnan(o).sum()), np.nanmax(np.abs(o - r["out"]))
    print(f"fill {fill:>10.3g}: NaN values {nan:>3}, max |Δ| on the finite values {delta:.1e}")

# %% [markdown]
# Why not let the padding rows be NaN, if nobody reads them? Because the next layer does. The NaN rows become the
# padding positions' keys and values; a real query gives them weight exactly 0 — and $0 \times \text{NaN}$ is
# NaN. Run the fixture model on the padded batch with each version:

# %%
from tinyqwen.model import load_model

model = load_model(FIXTURES / "dense-tied")
ids = np.array(batch["input_ids"])
for fill in (-np.inf, MASKED):
    kernel = lambda q, k, v, mask, fill=fill: attention_fill(q, k, v, mask, np.float32(fill)).astype(np.float32)
    model.backend = dataclasses.replace(model.backend, attention=kernel)
    with np.errstate(invalid="ignore"):
        logits = model.forward(ids, attention_mask=key_mask).logits
    print(f"fill {fill:.3g}: NaN logits per row {np.isnan(logits).any(-1).sum(-1)} (of {T} positions)")

# %% [markdown]
# With −∞ the padded rows are NaN everywhere, even at their real tokens. With float32 min every real token is
# right. A NumPy detail: `np.where(mask, scores, MASKED)` *replaces* the score; transformers *adds* the minimum to
# it, which in float32 rounds to the same number (a score of size ~10 is far below the spacing of floats near
# 3·10³⁸), so both give exactly 0 weight.
#
# ## 7. QK-Norm: bounded logits
#
# Qwen3 adds one step before RoPE: every query head and every key head goes through an RMSNorm over its
# `head_dim` channels ([chapter 3](03-embeddings-rmsnorm.ipynb)), with learned weights `q_norm` and `k_norm`.
#
# Why? After RMSNorm a head vector has length $\sqrt{d}$ (times its weights), so by Cauchy–Schwarz
#
# $$\Big|\frac{q\cdot k}{\sqrt d}\Big| \le \frac{\lVert q\rVert\,\lVert k\rVert}{\sqrt d}
#   \le \sqrt{d}\;\max_j|w^{q}_j|\;\max_j|w^{k}_j|$$
#
# — a bound that no longer depends on the projection weights. Without it, when `q_proj` and `k_proj` grow during
# training, the logits grow with the *square* of their scale, the softmax saturates into one-hot rows, and
# training becomes unstable. We can simulate that growth with layer 0 of the fixture:

# %%
from tinyqwen.norm import rms_norm

layer = model.weights.layers[0]
h = rms_norm(model.weights.embed[ids[2]], layer.input_norm, 1e-6)  # row 2's input to attention, [T, hidden]
d = model.config.head_dim
growth = np.geomspace(0.25, 16, 20)  # pretend the projections grew by this factor
logit_max = {"without QK-Norm": [], "with QK-Norm": []}
for g in growth:
    qh = (h @ (g * layer.attn.q_proj).T).reshape(T, -1, d)[:, 0]  # head 0, [T, d]
    kh = (h @ (g * layer.attn.k_proj).T).reshape(T, -1, d)[:, 0]
    logit_max["without QK-Norm"].append(np.abs(qh @ kh.T).max() / np.sqrt(d))
    qn, kn = rms_norm(qh, layer.attn.q_norm, 1e-6), rms_norm(kh, layer.attn.k_norm, 1e-6)
    logit_max["with QK-Norm"].append(np.abs(qn @ kn.T).max() / np.sqrt(d))

# %%
plt.figure(figsize=(5.5, 3.3))
for name, values in logit_max.items():
    plt.loglog(growth, values, "o-", label=name)
plt.xlabel("scale of q_proj and k_proj"), plt.ylabel("largest |logit|")
plt.title("QK-Norm keeps attention logits bounded")
plt.legend()
plt.show()

# %% [markdown]
# ## 8. An attention map from a real model
#
# What do the heads actually look at? We wrap the model's attention kernel so that it also keeps the probabilities
# of every layer and head. With an official Qwen3 checkpoint on this machine the sentence is real text; otherwise
# the fixture's random tokens show the structure (causal triangle, heads that differ) but no meaning.

# %%
import tinyqwen.hub

captured = []

def capturing_attention(q, k, v, mask):
    B, Hq, T, d = q.shape
    group = Hq // k.shape[1]
    s = q @ np.repeat(k, group, axis=1).swapaxes(-1, -2) * np.float32(d**-0.5)
    captured.append(softmax(np.where(mask[:, None], s, MASKED))[0])  # [Hq, T, S] of the first row
    return attention(q, k, v, mask)

# %%
official = tinyqwen.hub.official_checkpoint()
if official is None:
    print("no official Qwen3 checkpoint on this machine: using the dense-tied fixture's random tokens")
    real, tokens = model, np.array(batch["input_ids"][2])
    labels = [str(t) for t in tokens]
else:
    from tinyqwen.tokenizer import Tokenizer

    print(f"using the official checkpoint in {official}")
    real, tok = load_model(official), Tokenizer.from_pretrained(official)
    tokens = np.array(tok.encode("The cat sat on the mat because the cat was tired."))
    labels = [tok.decode([t]) for t in tokens]
real.backend = dataclasses.replace(real.backend, attention=capturing_attention)
captured.clear()
_ = real(tokens)
print(len(captured), "layers, probabilities", captured[0].shape, "(heads, queries, keys)")

# %%
layers_to_show = sorted({0, len(captured) // 2, len(captured) - 1})
n_heads = min(4, captured[0].shape[0])
size = (3 * n_heads, 3 * len(layers_to_show))
fig, axes = plt.subplots(len(layers_to_show), n_heads, figsize=size, squeeze=False)
for row, layer_index in enumerate(layers_to_show):
    for head in range(n_heads):
        ax = axes[row, head]
        ax.imshow(captured[layer_index][head], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer_index}, head {head}", fontsize=9)
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6), ax.set_yticklabels(labels, fontsize=6)
fig.supxlabel("key (what is read)"), fig.supylabel("query (who reads)")
plt.tight_layout()
plt.show()

# %% [markdown]
# Every map is lower-triangular (the causal mask), every row sums to 1, and the first token often collects weight
# that has nowhere better to go (an "attention sink"). Heads of the same layer look at different things — that is
# what having many heads buys.
#
# ## 9. Checkpoint: your attention in the real model
#
# Our `attention` should equal tinyqwen's module (`tinyqwen/attention.py`) and, put into a model, give
# transformers' logits. Two fixtures: `dense-tied` (dense, 4 query heads over 2 kv heads) and `moe-norm-topk`
# (a mixture-of-experts Qwen3, same attention):

# %%
from tinyqwen import attention as tq_attention

r = {n: REF[f"attn.qwen3_0_6b.{n}"] for n in ("q", "k", "v", "mask")}
print("equals tinyqwen's attention:", maxdiff(attention(**r), tq_attention.attention(**r)))
logit_delta = {}
for name in ("dense-tied", "moe-norm-topk"):
    m = load_model(FIXTURES / name)
    m.backend = dataclasses.replace(m.backend, attention=attention)
    ref_fixture = np.load(FIXTURES / name / "reference.npz")
    logit_delta[name] = maxdiff(m(ref_fixture["input_ids"]), ref_fixture["logits"])
    print(f"{name}: logits max |Δ| vs transformers = {logit_delta[name]:.1e}")

# %% [markdown]
# And the hardest test of the masks: greedy generation of a left-padded batch, with a KV cache (so after the first
# step every call is 1 query against all the cached keys), must give the tokens transformers' `generate` gave:

# %%
from tinyqwen.generation import generate_batch

spec = json.loads((FIXTURES / "dense-tied" / "generate.json").read_text())
model.backend = dataclasses.replace(model.backend, attention=attention)
new_tokens = generate_batch(model, spec["prompts"], spec["max_new_tokens"], eos_token_ids=())
for prompt, got, want in zip(spec["prompts"], new_tokens, spec["batch"]["new_tokens"]):
    print(f"prompt of {len(prompt):>2} tokens: {got} {'==' if got == want else '!='} transformers")

# %% [markdown]
# ## Summary
#
# - Attention is $\operatorname{softmax}(QK^\top/\sqrt{d} + M)\,V$: scores, weights that sum to 1, a weighted
#   average of values. The $1/\sqrt{d}$ keeps the scores' spread independent of `head_dim`.
# - Softmax subtracts the row maximum first: nothing overflows, and fully masked rows stay finite.
# - The causal mask allows key $j$ for query $i$ when $j \le i + (n_k - n_q)$ — the queries are the last $n_q$
#   positions, which is what a KV cache needs. Padding masks AND into it; masked scores become float32's minimum,
#   not 0 (leaks) and not $-\infty$ (NaN that spreads through the next layer).
# - Grouped-query attention: query head $h$ uses kv head $h // (H_q/H_{kv})$ — repeat, not tile. It cuts the KV
#   cache by the group size (2× for Qwen3-0.6B, 8× for Qwen3-30B-A3B).
# - QK-Norm (RMSNorm per head, before RoPE) bounds the logits however large the projections grow.
#
# **Exercises:** run `pytest exercises/test_ch05_attention.py` and fill in `exercises/ch05_attention.py` until every
# checkpoint passes. The last two run your attention inside a fixture model, prefill and batched decoding.
#
# The final check of this notebook, against the stored transformers outputs:

# %%
checks = {  # name: (max |Δ| against transformers, bound)
    "softmax of x + 1000": (maxdiff(softmax(REF["softmax.large.x"]), REF["softmax.large.out"]), 1e-6),
    **{f"attention, {case}": (maxdiff(attention(*(REF[f"attn.{case}.{n}"] for n in ("q", "k", "v", "mask"))),
                                      REF[f"attn.{case}.out"]), 1e-5)
       for case in ("one_head", "gqa", "qwen3_0_6b", "cache", "padding")},
    **{f"{name} logits": (delta, 1e-4) for name, delta in logit_delta.items()},
}
for name, (delta, bound) in checks.items():
    assert delta <= bound, (name, delta, bound)
    print(f"{name:<26} max |Δ| = {delta:.1e} <= {bound:g} against transformers")
assert new_tokens == spec["batch"]["new_tokens"]
print(f"batched greedy generation, left padding: all {sum(map(len, new_tokens))} tokens equal transformers'")
