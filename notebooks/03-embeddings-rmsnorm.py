# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3 · Embeddings and RMSNorm
#
# The tokenizer ([chapter 1](01-tokenization.ipynb)) turns text into integer ids, and the loader
# ([chapter 2](02-loading-weights.ipynb)) gives us the weights. This chapter builds the two simplest pieces of the
# network, and the ones it uses most:
#
# * the **embedding**, the very first step, which turns each id into a vector of `hidden_size` numbers;
# * **RMSNorm**, which rescales a vector to a standard size. Qwen3 calls it before every attention block and every
#   MLP, once at the very end, and on every query and key head ("QK-Norm"). A forward pass of Qwen3-0.6B runs it
#   $28 \times 4 + 1 = 113$ times.
#
# Both fit in two lines of NumPy. Both also have classic mistakes that produce plausible-looking numbers: the wrong
# axis, LayerNorm's mean subtraction, $\varepsilon$ in the wrong place, float16 overflow. We look at each one. At the
# end, our two functions run inside the real model and must reproduce the logits of Hugging Face `transformers`.

# %%
import dataclasses
import json

import matplotlib.pyplot as plt
import numpy as np

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)

# %% [markdown]
# We work with the `dense-tied` fixture from [chapter 2](02-loading-weights.ipynb): a tiny random Qwen3 in the
# official layout, with the outputs transformers computed from it in `reference.npz`. We need its embedding matrix
# and its final norm's weight:

# %%
from tinyqwen.checkpoint import Checkpoint

TIED = FIXTURES / "dense-tied"  # float32, 2 layers, tied embeddings
with Checkpoint(TIED) as ckpt:
    E = ckpt.get("model.embed_tokens.weight")  # [vocab, hidden] = [512, 64]
    final_norm = ckpt.get("model.norm.weight")  # [64]
ref = np.load(TIED / "reference.npz")  # what transformers computed from these weights
config = json.loads((TIED / "config.json").read_text())
E.shape, ref["input_ids"].shape

# %% [markdown]
# ## 1. From ids to vectors: the embedding table
#
# The embedding is a matrix $E$ with one row per token in the vocabulary, `vocab_size` × `hidden_size`. In
# Qwen3-0.6B it is 151,936 × 1024, and in our fixture 512 × 64. The vector of token $t$ is simply row $t$:
#
# $$\text{embed}(t) = E[t, :] \in \mathbb{R}^{H}.$$
#
# Nothing is computed. The rows are learned during training, so that tokens used in similar ways end up with
# similar vectors. Here are the rows our first example sentence picks out of the table:

# %%
ids = ref["input_ids"][0][:6]  # six token ids of the fixture's first input
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [3, 2]})
left.imshow(E[:60].T, aspect="auto", cmap="RdBu", vmin=-1.5, vmax=1.5)
for t in ids[ids < 60]:
    left.axvline(t, color="black", lw=2)
left.set(xlabel="token id (rows 0-59 of E, drawn as columns)", ylabel="hidden dimension", title="The embedding table E (excerpt)")
right.imshow(E[ids].T, aspect="auto", cmap="RdBu", vmin=-1.5, vmax=1.5)
right.set(xticks=range(len(ids)), xticklabels=ids, xlabel="token id", title="E[ids]: one column per token")
plt.show()

# %% [markdown]
# (Only the ids below 60 are marked on the left.) Here is a loop version first, one id at a time:

# %%
def embed_loop(ids, table):
    return np.stack([table[t] for t in ids])  # [T] -> [T, H]


embed_loop(ids, E).shape

# %% [markdown]
# NumPy's integer-array indexing does the same for an array of ids of *any* shape. It appends the hidden axis:
# `[T]` becomes `[T, H]`, and a batch `[B, T]` becomes `[B, T, H]`:

# %%
def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:  # [...] int, [V, H] -> [..., H]
    return table[ids]


assert np.array_equal(embed(ids, E), embed_loop(ids, E))
embed(ref["input_ids"], E).shape  # [B, T] -> [B, T, H]

# %% [markdown]
# ## 2. A lookup is a one-hot matrix product
#
# Why do we call a table lookup a "layer"? Because it is a linear layer in disguise. Write token $t$ as a
# **one-hot** vector $e_t \in \{0, 1\}^V$, all zeros except a 1 at position $t$. Then $e_t^\top E$ adds up the rows
# of $E$ weighted by $e_t$, and the only nonzero weight selects row $t$:
#
# $$e_t^\top E = \sum_{v} (e_t)_v \, E[v, :] = E[t, :].$$

# %%
one_hot = np.eye(E.shape[0], dtype=np.float32)[ids]  # [T, V]: row i has a single 1, at column ids[i]
assert np.array_equal(one_hot @ E, embed(ids, E))  # exactly equal: 1·x + 0·y + ... adds only exact zeros
one_hot.shape, one_hot.sum(axis=1)

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 2.6), gridspec_kw={"width_ratios": [4, 2.2, 2.2]})
axes[0].scatter(ids, range(len(ids)), marker="s", s=40, color="black")  # the only nonzero entries
for i, t in enumerate(ids):
    axes[0].annotate(f" {t}", (t, i), va="center", fontsize=8)
axes[0].set(xlim=(-5, E.shape[0] + 5), ylim=(len(ids) - 0.5, -0.5), title="one-hot [T, V]: a single 1 per row",
            xlabel="vocabulary index (all 512; white = 0)", ylabel="position")
axes[1].imshow(one_hot @ E, aspect="auto", cmap="RdBu", vmin=-1.5, vmax=1.5)
axes[1].set(title="= one_hot @ E  [T, H]", xlabel="hidden dimension")
axes[2].imshow(embed(ids, E), aspect="auto", cmap="RdBu", vmin=-1.5, vmax=1.5)
axes[2].set(title="= E[ids]  [T, H]", xlabel="hidden dimension")
plt.show()

# %% [markdown]
# This view explains training. The gradient of the loss with respect to $E$ is nonzero only in the rows of the
# tokens that occurred. It also explains why nobody computes it this way: the product costs $V \times H$
# multiply-adds per token, where indexing costs $H$ copies. For Qwen3-0.6B that is 155 million operations against
# 1024 copies, for every token.
#
# One trap: NumPy accepts **negative** indices and counts them from the end, so `E[-1]` silently returns the last
# token's vector. A bug that produces id −1 (a padding value, say) gives a plausible vector instead of an error.
# PyTorch's `nn.Embedding` raises an error, and so should we:

# %%
def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:  # [...] int, [V, H] -> [..., H]
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise IndexError(f"token ids must be in [0, {table.shape[0]}), got {ids.min()}..{ids.max()}")
    return table[ids]


# %% [markdown]
# Now a bad id fails loudly, naming the problem:

# %%
try:
    embed(np.array([5, -1]), E)
except IndexError as error:
    print("IndexError:", error)

# %% [markdown]
# **Checkpoint.** `reference.npz` stores `hidden_states[0]`, the output of transformers' `embed_tokens` on the
# fixture's input, captured with a hook. A lookup performs no arithmetic, so the match must be exact:

# %%
assert np.array_equal(embed(ref["input_ids"], E), ref["hidden_states"][0])
print("embed(input_ids, E) == transformers' embed_tokens output, bit for bit:", ref["hidden_states"][0].shape)

# %% [markdown]
# ## 3. Tied embeddings: the same matrix at both ends
#
# At the *end* of the network, the model must turn a vector $h \in \mathbb{R}^H$ back into one score (logit) per
# token, $V$ of them. That is a matrix of the same shape as $E$, and small models simply reuse $E$:
#
# $$\text{logits} = h\, E^\top, \qquad \text{logit}_v = \langle h, E[v, :] \rangle .$$
#
# The score of token $v$ is the dot product of the final vector with $v$'s own embedding. This is **weight tying**,
# switched on by `tie_word_embeddings: true` in `config.json`. Such checkpoints have no `lm_head.weight` tensor
# at all:

# %%
with Checkpoint(TIED) as ckpt:
    print("tie_word_embeddings:", config["tie_word_embeddings"], "| lm_head.weight in the file:", "lm_head.weight" in ckpt)

# %% [markdown]
# In Qwen3-0.6B, tying saves 151,936 × 1024 = 156 million parameters (311 MB in bf16), a quarter of the model.
# The larger models (8B and up) have their own `lm_head`. Tied means *one shared array*. A model that copies $E$
# into a separate head array doubles that memory, and during training the two copies would drift apart.
# [Chapter 6](06-dense-model.ipynb) builds the head. In section 9 we use $h E^\top$ to check our RMSNorm against
# transformers' logits.
#
# ## 4. Why normalise? The residual stream grows
#
# Each decoder layer *adds* its attention and MLP outputs to the running vector, the **residual stream**
# ([chapter 6](06-dense-model.ipynb)). Nothing ever shrinks it, so its size drifts upward layer by layer.
# `reference.npz` has the residual stream after every layer for each fixture. Here is its root-mean-square size
# per token:

# %%
def rms(x: np.ndarray) -> np.ndarray:  # [..., d] -> [...]
    return np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1))


# %% [markdown]
# For each fixture we plot the mean RMS over all tokens after each layer, with a band from the smallest to the
# largest token:

# %%
plt.figure(figsize=(7, 3.2))
for name in ("dense-tied", "dense-untied-bf16-sharded", "moe-sparse-step"):
    hidden = np.load(FIXTURES / name / "reference.npz")["hidden_states"]  # [L+1, B, T, H]
    r = rms(hidden).reshape(len(hidden), -1)
    plt.plot(r.mean(axis=1), "o-", label=f"{name} (mean over tokens)")
    plt.fill_between(range(len(r)), r.min(axis=1), r.max(axis=1), alpha=0.15)
plt.gca().set(xlabel="layer (0 = embedding output)", ylabel="RMS of the residual stream", yscale="log",
              title="The residual stream grows with depth (transformers, fixture models)")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# These fixtures have random weights. Trained models show the same drift, and often much more. If you have an
# official checkpoint (set `TINYQWEN_MODEL` to its folder, or have `Qwen/Qwen3-0.6B` in your Hugging Face cache),
# this cell measures the real thing on a sentence. Loading 0.6B parameters widened to float32 takes about 2.4 GB
# of RAM and a few seconds:

# %%
from tinyqwen.hub import official_checkpoint

from tinyqwen.config import load_config
from tinyqwen.config import count_parameters

real = official_checkpoint()
size = count_parameters(load_config(real)) if real is not None else 0
if real is None:
    print("No official checkpoint found (set TINYQWEN_MODEL or cache Qwen/Qwen3-0.6B); the fixture curves above stand in.")
elif size > 2e9:
    print(f"{real.name} has {size / 1e9:.1f} B parameters ({4 * size / 1e9:.0f} GB in float32): skipped here.")
else:
    from tinyqwen import Tokenizer, load_model

    big = load_model(real, progress=False)
    sentence = Tokenizer.qwen3().encode("The capital of France is Paris, and the capital of Italy is Rome.")
    hidden = big.forward(np.array([sentence]), return_hidden_states=True).hidden_states  # L+1 arrays [1, T, H]
    r = np.stack([rms(h[0]) for h in hidden])  # [L+1, T]
    plt.figure(figsize=(7, 3.2))
    plt.semilogy(r[:, 0], "s--", label="the first token")
    plt.semilogy(r[:, 1:].mean(axis=1), "o-", label="the other tokens (mean)")
    plt.gca().set(xlabel="layer (0 = embedding output)", ylabel="RMS of the residual stream",
                  title=f"The residual stream of {real.name}, {len(sentence)} tokens")
    plt.legend()
    plt.show()
    del big, hidden

# %% [markdown]
# Trained LLMs are known to grow a few huge coordinates in the residual stream (Sun et al., 2024, "Massive
# Activations in Large Language Models"). Fed raw into a matrix product, vectors of such unpredictable size would
# make every layer's job depend on depth. So each sublayer first reads a **normalised copy** of the stream (the
# "pre-norm" design):
#
# ```
#  x ──┬──────────────────────────(+)──┬─────────────────────(+)──▶
#      └─ RMSNorm ─ attention ─────┘   └─ RMSNorm ─ MLP ──────┘
# ```
#
# The stream itself is never normalised, only the copies that enter attention and the MLP. The one exception is
# the final `model.norm`, applied once before the output head.
#
# ## 5. RMSNorm: the math
#
# RMSNorm divides a vector $x \in \mathbb{R}^d$ by its root mean square, then scales each coordinate by a learned
# weight $w \in \mathbb{R}^d$:
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac{1}{d}\sum_{i=1}^{d} x_i^2 + \varepsilon}} \odot w .$$
#
# Before the weight, the output has RMS 1 (up to $\varepsilon$), whatever the size of $x$. The older
# **LayerNorm** also subtracts the mean and adds a bias $b$:
#
# $$\mathrm{LayerNorm}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \varepsilon}} \odot w + b, \qquad
#   \mu = \tfrac{1}{d}\textstyle\sum_i x_i,\ \ \sigma^2 = \tfrac{1}{d}\sum_i (x_i - \mu)^2 .$$
#
# Zhang & Sennrich (2019, "Root Mean Square Layer Normalization") found that the re-*scaling* does the useful work and
# the re-*centering* adds little. Dropping it saves a reduction over $d$ and the bias, and models train as well.
# Llama, Qwen and most recent LLMs use RMSNorm.
#
# What the two do differs most clearly in two dimensions. RMSNorm keeps a vector's *direction* and puts it on the
# circle of radius $\sqrt{2}$ (RMS 1). LayerNorm first removes the mean, which in 2-D leaves $(a, -a)$. So every
# point lands on one of just two points, $(1, -1)$ or $(-1, 1)$, and nearly all information is lost:

# %%
points = np.random.default_rng(0).normal(0, 1.2, size=(40, 2)) + [0.8, 0.3]
by_rms = points / np.sqrt(np.mean(points**2, axis=-1, keepdims=True))
centred = points - points.mean(axis=-1, keepdims=True)
by_layer = centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True))

# %% [markdown]
# The picture: each input point (gray) moves to its output (red). The dotted circle has radius $\sqrt{2}$, where
# vectors of RMS 1 lie.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharex=True, sharey=True)
for ax, out, title in ((axes[0], by_rms, "RMSNorm: x / rms(x)"), (axes[1], by_layer, "LayerNorm: (x - mean) / std")):
    ax.scatter(*points.T, s=12, color="gray", label="input")
    ax.scatter(*out.T, s=18, color="tab:red", label="output", zorder=3)
    for p, q in zip(points, out):
        ax.annotate("", q, p, arrowprops=dict(arrowstyle="->", color="tab:red", alpha=0.25))
    ax.add_patch(plt.Circle((0, 0), np.sqrt(2), fill=False, ls=":"))
    ax.set(title=title, xlabel="$x_1$", aspect="equal", xlim=(-4, 4), ylim=(-4, 4))
axes[0].set_ylabel("$x_2$")
axes[0].legend(loc="lower right")
plt.show()

# %% [markdown]
# In 1024 dimensions LayerNorm loses only one direction out of 1024, not half of them. But the picture shows what
# the mean subtraction *is*: a projection that throws away the component along $(1, 1, \dots, 1)$. RMSNorm
# keeps it.
#
# ## 6. From a loop to NumPy
#
# First the definition, one vector at a time, written out:

# %%
def rms_norm_loop(rows, weight, eps):
    out = []
    for x in rows:  # each row is one vector of length d
        mean_square = sum(float(v) * float(v) for v in x) / len(x)
        out.append([float(v) / (mean_square + eps) ** 0.5 * float(w) for v, w in zip(x, weight)])
    return np.array(out, dtype=np.float32)


rms_norm_loop(np.array([[3.0, 4.0]]), np.ones(2), eps=0.0)  # RMS of (3, 4) is sqrt(12.5) = 3.5355

# %% [markdown]
# The vectorised version normalises over the **last** axis, and only that axis, whatever comes before it.
# `keepdims=True` keeps the reduced axis as size 1, so the division broadcasts one RMS over its whole vector.
# The weight of shape `[d]` broadcasts over all leading axes:

# %%
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    x = x.astype(np.float32)  # compute in float32 whatever x is (section 8)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return x / np.sqrt(mean_square + np.float32(eps)) * weight


x = ref["hidden_states"][1]  # the residual stream after layer 0: [B, T, H] = [2, 12, 64]
assert np.allclose(rms_norm(x, final_norm, 1e-6).reshape(-1, 64), rms_norm_loop(x.reshape(-1, 64), final_norm, 1e-6), atol=1e-6)
rms_norm(x, final_norm, 1e-6).shape

# %% [markdown]
# A shape check across every way the model calls it: one vector, a sequence, a batch, and per-head vectors for
# QK-Norm (section 9):

# %%
w64, w32 = np.ones(64, np.float32), np.ones(32, np.float32)
for shape, w in (((64,), w64), ((12, 64), w64), ((2, 12, 64), w64), ((2, 12, 4, 32), w32)):
    y = rms_norm(np.random.default_rng(1).normal(size=shape), w, 1e-6)
    assert y.shape == shape and np.allclose(rms(y), 1, atol=1e-5)  # every vector now has RMS 1
    print(f"{str(shape):<16} -> {y.shape}, RMS of every vector = 1")

# %% [markdown]
# The classic axis mistake is `np.mean(x * x)` without `axis=-1`. It computes *one* RMS for the whole batch, so a
# long, loud sentence quietly changes how a short, quiet one is normalised. On a single vector the two agree, which
# is why this bug survives small tests. Always test on a batch.
#
# ## 7. ε goes inside the square root
#
# $\varepsilon$ (`rms_norm_eps` in `config.json`, $10^{-6}$ for Qwen3) guards the division. For the all-zero
# vector, which padding can produce, the RMS is 0, and without $\varepsilon$ the output is $0/0$ = NaN. One NaN
# then spreads through every later layer:

# %%
zero = np.zeros((1, 4), np.float32)
with np.errstate(invalid="ignore"):
    print("eps = 1e-6:", rms_norm(zero, np.ones(4), 1e-6), "  eps = 0:", rms_norm(zero, np.ones(4), 0.0))

# %% [markdown]
# $\varepsilon$ also sets a floor. When $\tfrac1d\sum x_i^2 \ll \varepsilon$, tiny vectors are *not* scaled up to RMS 1,
# so noise does not get amplified. Where exactly that happens depends on where $\varepsilon$ sits. Qwen3 (and
# transformers) put it **inside** the root, $x / \sqrt{\text{ms} + \varepsilon}$. Some code writes
# $x / (\sqrt{\text{ms}} + \varepsilon)$ instead. For a vector of RMS $s$, the output has RMS
# $s / \sqrt{s^2 + \varepsilon}$ with the first and $s / (s + \varepsilon)$ with the second:

# %%
s = np.logspace(-8, 1, 200)
eps = 1e-6
plt.figure(figsize=(7, 3.2))
plt.semilogx(s, s / np.sqrt(s**2 + eps), label=r"$\varepsilon$ inside: $x/\sqrt{ms+\varepsilon}$ (Qwen3)")
plt.semilogx(s, s / (s + eps), "--", label=r"$\varepsilon$ outside: $x/(\sqrt{ms}+\varepsilon)$")
plt.axvline(np.sqrt(eps), color="gray", ls=":")
plt.text(np.sqrt(eps) * 1.3, 0.1, r"$\sqrt{\varepsilon} = 10^{-3}$", color="gray")
plt.gca().set(xlabel="RMS of the input vector", ylabel="RMS of the output",
              title=r"Where $\varepsilon$ sits decides which vectors count as 'tiny' ($\varepsilon = 10^{-6}$)")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# With $\varepsilon$ inside, the cut-off is at RMS $\sqrt{\varepsilon} = 10^{-3}$. Outside, it is at $10^{-6}$.
# For ordinary activations, with RMS around 1, the two differ by about $5 \times 10^{-7}$, a few float32 rounding
# steps and below any sensible test tolerance. That is why this bug passes tests on random normal inputs. On
# activations of size $10^{-3}$ the outputs differ by tens of percent. The graded exercises include such a case.
#
# ## 8. Compute in float32
#
# Checkpoints are stored in bf16, and on GPUs models often *run* in bf16 or float16. RMSNorm is the operation where
# that hurts most, because it squares its input and averages over thousands of values.
#
# **float16 overflows.** Its largest value is 65,504, so any coordinate above $\sqrt{65504} \approx 256$ squares to
# infinity. The mean is then infinite, and the output is $x / \infty = 0$: the whole vector is silently erased.

# %%
loud = np.array([[300.0, -50.0, 20.0, 1.0]], dtype=np.float16)
with np.errstate(over="ignore"):  # silence NumPy's overflow warning: the point is what it produces
    in_f16 = loud / np.sqrt(np.mean(loud * loud, axis=-1, keepdims=True) + np.float16(1e-6))
print("computed in float16:", in_f16, "  in float32:", rms_norm(loud, np.ones(4), 1e-6))

# %% [markdown]
# **bf16 loses the small terms.** bf16 cannot overflow here (its range is float32's, [chapter 2](02-loading-weights.ipynb)),
# but it has only 8 significant bits. Let us add up the squares of 1024 coordinates one by one, as a simple loop
# would, rounding the running sum to bf16 after each addition. Once the sum is large, adding a small square
# changes it by less than half a bf16 step, so the addition rounds away to nothing:

# %%
from tinyqwen.bf16 import bf16_to_float32, float32_to_bf16


def to_bf16(v):
    return bf16_to_float32(float32_to_bf16(np.asarray(v, dtype=np.float32)))


# %% [markdown]
# We simulate bf16 arithmetic by rounding to bf16 after every operation, with the two conversions of chapter 2.
# The experiment: 1024 coordinates drawn from a standard normal, their squares summed one at a time.

# %%
v = np.random.default_rng(3).normal(0, 1, 1024).astype(np.float32)
running32, running16 = np.cumsum(v.astype(np.float64) ** 2), [0.0]
for sq in to_bf16(v * v):
    running16.append(float(to_bf16(running16[-1] + sq)))

# %% [markdown]
# The running sums, exact and in bf16:

# %%
plt.figure(figsize=(7, 3.2))
plt.plot(running32, label="exact (float64)")
plt.plot(running16[1:], label="running sum rounded to bf16")
plt.gca().set(xlabel="coordinates added", ylabel=r"$\sum x_i^2$ so far", title="Summing 1024 squares in bfloat16 loses the small terms")
plt.legend()
plt.show()
print(f"mean square: exact {running32[-1] / 1024:.4f}, bf16 loop {running16[-1] / 1024:.4f}")

# %% [markdown]
# Real kernels add in a smarter order, so the error is smaller, but the lesson holds. transformers' `Qwen3RMSNorm`
# therefore **upcasts to float32** and computes the mean square and the division there. It casts the normalised
# vector back to the model's dtype only before multiplying by the weight. Our functions take the simplest safe
# route: they compute in float32 and return float32.
#
# How big is the bf16 cast at the end? `exercises/references/ch03_embeddings_rmsnorm.npz` holds Qwen3RMSNorm run by
# transformers on bf16 inputs and weights (`rms.bf16`), next to our float32 computation on the same values:

# %%
ref3 = np.load(REPO / "exercises" / "references" / "ch03_embeddings_rmsnorm.npz")
x16, w16, out16 = ref3["rms.bf16.x"], ref3["rms.bf16.weight"], ref3["rms.bf16.out"]
ours = rms_norm(x16, w16, 1e-6)
rel = np.abs(out16 - ours) / np.abs(ours)
print(f"transformers in bf16 vs float32: median relative difference {np.median(rel):.1e}, max {rel.max():.1e} "
      f"(a bf16 step is at most 2^-7 = {2**-7:.1e} of the value)")

# %% [markdown]
# That gap, a few tenths of a percent per norm, is the price of running in bf16. It is why all of this course's
# references are computed in float32.
#
# ## 9. QK-Norm: the same function on every head
#
# Qwen3 adds two more RMSNorms per layer, on the **queries and keys** of attention, one vector per head. After the
# projection, queries have shape `[B, T, H_q, head_dim]`, and `q_norm.weight` has shape `[head_dim]`. Because our
# `rms_norm` normalises the last axis only, the same function does it. We do not need a new one.
# [Chapter 5](05-attention.ipynb) explains why: it keeps the dot products $q \cdot k$ in a stable range, whatever
# the size of the residual stream.

# %%
with Checkpoint(TIED) as ckpt:
    layer0 = {n: ckpt.get(f"model.layers.0.{n}.weight") for n in ("input_layernorm", "self_attn.q_proj", "self_attn.q_norm")}
h = rms_norm(ref["hidden_states"][0], layer0["input_layernorm"], eps=1e-6)  # [B, T, H]
q = (h @ layer0["self_attn.q_proj"].T).reshape(2, 12, config["num_attention_heads"], config["head_dim"])  # [B, T, Hq, d]
q_normed = rms_norm(q, layer0["self_attn.q_norm"], eps=1e-6)  # normalises each head's 32 numbers
print("q:", q.shape, "\nRMS of the 4 head vectors of token 0, before:", rms(q)[0, 0].round(2),
      "\n                          after (weight divided out):", rms(q_normed / layer0["self_attn.q_norm"])[0, 0].round(4))

# %% [markdown]
# ## 10. Checkpoint: against transformers
#
# First the stored references. `make_ch03_embeddings_rmsnorm.py` ran transformers' own `Qwen3RMSNorm` (in float32)
# on fixed-seed inputs chosen to catch each classic mistake:
#
# * `vector`: one vector;
# * `batch`: a non-zero mean, where LayerNorm's centring shows;
# * `heads`: QK-Norm shapes;
# * `tiny`: size $10^{-3}$ plus an all-zero row, where $\varepsilon$ matters;
# * `large`: float16 input of size 300–3000, where computing in float16 overflows.
#
# Both sides compute in float32 and differ only in rounding (transformers multiplies by `rsqrt`, we divide by
# `sqrt`). That is a few float32 ulps on outputs of size ~1, so $10^{-5}$ is a safe bound.

# %%
reference_deltas = {}
for case in ("vector", "batch", "heads", "tiny", "large"):
    x, w, e, want = (ref3[f"rms.{case}.{k}"] for k in ("x", "weight", "eps", "out"))
    reference_deltas[case] = np.abs(rms_norm(x, w, float(e)) - want).max()
    print(f"{case:<7} x {str(list(x.shape)):<16} {str(x.dtype):<8} max |Δ| = {reference_deltas[case]:.1e}")

# %% [markdown]
# Now the real model. Our `embed` gave transformers' embedding output exactly (section 2). The last step of the
# network is the final norm and the tied head, $\text{logits} = \mathrm{RMSNorm}(h_L)\,E^\top$. Applied to the
# residual stream after the last layer, $h_L$, which is stored in `reference.npz`, it must give transformers'
# logits. Then we put our `rms_norm` into tinyqwen's model as the kernel behind *all* of its norms (input,
# post-attention, QK and final) and run the whole network. Matrix products in different summation orders put the
# bound for logits of size ~10 at $10^{-4}$.

# %%
eps = config["rms_norm_eps"]
head = rms_norm(ref["hidden_states"][-1], final_norm, eps) @ E.T  # [B, T, V]
d_head = np.abs(head - ref["logits"]).max()
print(f"RMSNorm(h_L) @ E.T vs transformers' logits: max |Δ| = {d_head:.1e}")

# %% [markdown]
# Our function also agrees with tinyqwen's own `rms_norm` (`tinyqwen/norm.py`), the one the model uses by default:

# %%
from tinyqwen.norm import rms_norm as tinyqwen_rms_norm

d_tiny = max(np.abs(rms_norm(ref3[f"rms.{c}.x"], ref3[f"rms.{c}.weight"], 1e-6)
                    - tinyqwen_rms_norm(ref3[f"rms.{c}.x"], ref3[f"rms.{c}.weight"], 1e-6)).max() for c in ("batch", "heads"))
print(f"ours vs tinyqwen.norm.rms_norm: max |Δ| = {d_tiny:.1e}")

# %% [markdown]
# Finally the whole network. A model's `backend` holds the kernels it calls (see `backends/contract.py`).
# We swap in our `rms_norm` and run both fixtures on the inputs transformers used:

# %%
from tinyqwen.model import load_model

results = {}
for name in ("dense-tied", "dense-untied-bf16-sharded"):
    model = load_model(FIXTURES / name, progress=False)
    model.backend = dataclasses.replace(model.backend, rms_norm=rms_norm)  # every norm is now ours
    fixture_ref = np.load(FIXTURES / name / "reference.npz")
    results[name] = np.abs(model(fixture_ref["input_ids"]) - fixture_ref["logits"]).max()
    print(f"{name:<26} max |Δ| = {results[name]:.1e}")

# %% [markdown]
# All together, as this chapter's final check:

# %%
assert np.array_equal(embed(ref["input_ids"], E), ref["hidden_states"][0])
assert max(reference_deltas.values()) <= 1e-5 and d_tiny <= 1e-6
assert d_head <= 1e-4 and all(d <= 1e-4 for d in results.values())
print("embed == transformers' embed_tokens output exactly")
print(f"rms_norm vs transformers' Qwen3RMSNorm on 5 stored cases: max |Δ| = {max(reference_deltas.values()):.1e} ≤ 1e-5")
print(f"RMSNorm(h_L) @ E.T vs transformers' logits: max |Δ| = {d_head:.1e} ≤ 1e-4")
for name, d in results.items():
    print(f"{name:<26} with our rms_norm in every layer: max |Δ| = {d:.1e} ≤ 1e-4 against transformers")

# %% [markdown]
# ## Summary
#
# * An embedding is row indexing, $E[\text{ids}]$, which equals the product of one-hot vectors with $E$. It is
#   exact, and it works for ids of any shape. Refuse negative ids, which NumPy would silently wrap.
# * Tied embeddings use the *same* matrix as the output head: $\text{logits} = h E^\top$, and no `lm_head.weight`.
# * RMSNorm is $x / \sqrt{\text{mean}(x^2) + \varepsilon} \odot w$ over the **last** axis. It has no mean subtraction
#   and no bias. It keeps the vector's direction, while LayerNorm also projects out the mean.
# * $\varepsilon$ goes inside the square root. It keeps the zero vector finite and sets the "tiny" cut-off at
#   $\sqrt{\varepsilon}$.
# * Compute in float32: float16 squares overflow above 256, and bf16 sums lose the small terms.
# * QK-Norm is the same function, over `head_dim`.
#
# ## Exercises
#
# Fill in `exercises/ch03_embeddings_rmsnorm.py` (`embed`, `rms_norm`; the docstrings have worked examples), then run
#
# ```bash
# pytest exercises/test_ch03_embeddings_rmsnorm.py
# ```
#
# The last checkpoint runs the fixture models with *your* `embed` and *your* `rms_norm` in every layer.
