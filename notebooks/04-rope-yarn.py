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
# # Chapter 4 · RoPE and YaRN
#
# Attention ([chapter 5](05-attention.ipynb)) compares every query with every key by a dot product. A dot product
# knows nothing about *where* the two vectors came from: shuffle the tokens of "the dog bit the man" and every
# score is the same, only in a different place. The model has to be told the order.
#
# Qwen3 does it with **rotary position embeddings** (RoPE, Su et al. 2021): before attention, each query and key
# is *rotated* by an angle proportional to its position. Rotations have one lovely property — the dot product of
# two rotated vectors depends only on the *difference* of their angles — so attention sees how far apart two
# tokens are, not where they sit in absolute terms.
#
# Qwen3 is trained on contexts of 32,768 tokens; the model card stretches it to 131,072 with **YaRN** (Peng et al.
# 2023), a small change to the rotation speeds. We build both, check them against transformers, and then run a
# real checkpoint with them.
#
# **What you will build** (the same functions as `exercises/ch04_rope_yarn.py`)
#
# 1. `rope_inv_freq` — the rotation speed of each channel pair;
# 2. `rope_cos_sin` — the cos/sin tables for a batch of positions;
# 3. `rotate_half` and `apply_rope` — the rotation itself, in Qwen3's split-half layout;
# 4. `yarn_inv_freq` and `yarn_attention_factor` — YaRN's longer context.

# %%
import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
REF = np.load(REPO / "exercises" / "references" / "ch04_rope_yarn.npz")  # made by transformers


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())

# %% [markdown]
# `REF` holds what transformers' `Qwen3RotaryEmbedding` and `apply_rotary_pos_emb` compute on the real Qwen3-0.6B
# configuration (the generator is `exercises/references/make_ch04_rope_yarn.py`). The configuration itself is the
# official `config.json` of Qwen3-0.6B, of which the repo keeps a copy — RoPE needs nothing else from a checkpoint:

# %%
from tinyqwen.config import CONFIG_DIR, load_config  # CONFIG_DIR: the official config.json files tinyqwen ships

config = load_config(CONFIG_DIR / "Qwen3-0.6B.json")
HEAD_DIM, THETA = config.head_dim, config.rope_theta
print(f"head_dim = {HEAD_DIM}, rope_theta = {THETA:g}, context = {config.max_position_embeddings}")

# %% [markdown]
# ## 1. Rotation as complex multiplication
#
# Take one pair of channels $(a, b)$ and read it as the complex number $z = a + ib$. Multiplying by
# $e^{i\theta} = \cos\theta + i\sin\theta$ turns it by the angle $\theta$ and keeps its length:
#
# $$z\,e^{i\theta} = (a\cos\theta - b\sin\theta) + i\,(a\sin\theta + b\cos\theta)
# \quad\Longleftrightarrow\quad
# \begin{pmatrix}\cos\theta & -\sin\theta\\ \sin\theta & \cos\theta\end{pmatrix}\begin{pmatrix}a\\ b\end{pmatrix}$$
#
# NumPy does complex numbers natively, so we can check the two forms agree:

# %%
a, b, angle = 1.0, 0.5, 0.3
print(complex(a, b) * np.exp(1j * angle))
print(np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ [a, b])

# %% [markdown]
# RoPE turns the query at position $m$ by $m\theta$ and the key at position $n$ by $n\theta$. The score is the real
# part of $q\,\overline{k}$, and the rotations meet in the middle:
#
# $$\operatorname{Re}\big[(q e^{im\theta})\,\overline{(k e^{in\theta})}\big]
#   = \operatorname{Re}\big[q\,\overline{k}\,e^{i(m-n)\theta}\big]$$
#
# Only $m - n$ is left. A tiny check with complex numbers:

# %%
q, k, theta = complex(0.8, -0.2), complex(0.3, 0.9), 0.7
score = lambda m, n: (q * np.exp(1j * m * theta) * np.conj(k * np.exp(1j * n * theta))).real
print(score(5, 2), score(105, 102), score(5, 3))  # same distance 3, same score; distance 2 differs

# %% [markdown]
# A head has `head_dim` channels, so it holds `head_dim / 2` such pairs, and each pair turns at its **own speed**:
# the first pairs quickly (fine position, "which neighbour?"), the last ones very slowly (coarse position, "which
# part of the document?"), like the hands of a clock. Here is where the same vector points at positions 0 to 11,
# in pair 0 and in pair 8 of Qwen3-0.6B's 64 pairs (the slowest pairs would not visibly move at all):

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, (pair, speed) in zip(axes, [(0, 1.0), (8, THETA ** (-16 / HEAD_DIM))]):
    for m in range(12):
        z = np.exp(1j * m * speed)
        arrow = dict(arrowstyle="->", color=plt.cm.viridis(m / 11))
        ax.annotate("", (z.real, z.imag), (0, 0), arrowprops=arrow)
        ax.text(1.12 * z.real, 1.12 * z.imag, str(m), ha="center", va="center", fontsize=8)
    ax.set(xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal", xlabel="channel i", ylabel="channel i + head_dim/2",
           title=f"pair {pair}: {speed:.3g} rad per position")
fig.suptitle("The same vector (1, 0) at positions 0..11, for a fast and a slower pair")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The frequency spectrum
#
# Pair $i$ turns by $\omega_i$ radians per position, with
#
# $$\omega_i = \theta^{-2i/d}, \qquad i = 0, 1, \dots, d/2 - 1$$
#
# where $d$ is `head_dim` and $\theta$ is `rope_theta` (the original Transformer used 10,000; Qwen3 uses
# 1,000,000, which slows the slow pairs further for long contexts). transformers calls $\omega$ `inv_freq`. A loop
# first, one pair at a time:

# %%
def inv_freq_loop(head_dim, theta):
    return [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]

print(np.round(inv_freq_loop(8, 10000.0), 6))

# %% [markdown]
# The vectorised version. The exponents are float32, as transformers makes them
# (`torch.arange(0, dim, 2, dtype=torch.float) / dim`); the power is taken in float64 and rounded once to float32 —
# section 7 shows why that last bit matters.

# %%
def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:  # -> [head_dim // 2]
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)  # theta^(2i/d), rounded once
    return np.float32(1.0) / power

inv_freq = rope_inv_freq(HEAD_DIM, THETA)
print(inv_freq.shape, inv_freq.dtype, inv_freq[:3], inv_freq[-1])

# %% [markdown]
# A pair's **wavelength** — the number of positions for one full turn — is $2\pi/\omega_i$. For Qwen3-0.6B they run
# from 6 tokens to about 5 million. Compare them with the context lengths:

# %%
wavelength = 2 * np.pi / inv_freq
plt.figure(figsize=(7, 3.5))
plt.semilogy(wavelength, ".-", label="wavelength $2\\pi/\\omega_i$")
plt.axhline(32768, color="C1", ls="--", label="trained context 32,768")
plt.axhline(131072, color="C3", ls=":", label="YaRN context 131,072")
plt.xlabel("pair index i"), plt.ylabel("positions per full turn")
plt.title(f"RoPE wavelengths of Qwen3-0.6B (head_dim {HEAD_DIM}, theta {THETA:g})")
plt.legend()
plt.show()
print("pairs with no full turn inside 32,768 positions:", int((wavelength > 32768).sum()), "of", inv_freq.size)

# %% [markdown]
# Remember the pairs above the orange line: during training they never made a full turn. They come back in
# section 8.
#
# ## 3. The cos and sin tables
#
# Every position $m$ and pair $i$ get the angle $m\,\omega_i$: an outer product of positions and frequencies.
# The model needs $\cos$ and $\sin$ of those angles, once per position, shared by every head and every layer.
#
# Qwen3 stores them in the **split-half** layout (section 4): the last axis is `head_dim` long and both halves hold
# the same angles, $[\,m\omega_0, \dots, m\omega_{d/2-1},\; m\omega_0, \dots, m\omega_{d/2-1}\,]$. YaRN (section 9)
# also multiplies both tables by an "attention factor"; for plain RoPE it is 1.

# %%
def rope_cos_sin(positions, inv_freq, attention_factor=1.0):  # [..., T], [d/2] -> [..., T, d] x2
    angles = positions.astype(np.float32)[..., None] * inv_freq  # [..., T, d/2], float32 (see section 7)
    angles = np.concatenate([angles, angles], axis=-1)  # split-half: both halves share the angles
    return np.cos(angles) * np.float32(attention_factor), np.sin(angles) * np.float32(attention_factor)

positions = np.arange(256)[None]  # [B=1, T=256]: positions start at 0
cos, sin = rope_cos_sin(positions, inv_freq)
print(cos.shape, cos.dtype)

# %%
plt.figure(figsize=(8, 3.5))
plt.imshow(cos[0].T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
plt.colorbar(label="cos(m ω_i)")
plt.xlabel("position m"), plt.ylabel("channel (two copies of 64 pairs)")
plt.title("The cos table of Qwen3-0.6B: fast pairs flicker, slow pairs barely move")
plt.show()

# %% [markdown]
# ## 4. Split-half pairing
#
# Which two channels form a pair? The RoPE paper pairs neighbours: $(x_0, x_1), (x_2, x_3), \dots$ — the
# "interleaved" layout (GPT-J, Meta's original Llama code). Hugging Face's Llama code, and with it Qwen3, pairs
# channel $j$ with channel $j + d/2$: $(x_0, x_{d/2}), (x_1, x_{d/2+1}), \dots$ — the **split-half** layout.
# For `head_dim = 8`, each channel coloured by the pair it belongs to:

# %%
layouts = {"split-half (Qwen3): x_j with x_(j+d/2)": np.arange(8) % 4,
           "interleaved (GPT-J): x_2i with x_(2i+1)": np.arange(8) // 2}
fig, axes = plt.subplots(2, 1, figsize=(6, 2.4))
for ax, (name, pair) in zip(axes, layouts.items()):
    ax.imshow(pair[None], cmap="Pastel1", vmin=0, vmax=8)
    for j in range(8):
        ax.text(j, 0, f"x{j}\npair {pair[j]}", ha="center", va="center", fontsize=8)
    ax.set(xticks=[], yticks=[], title=name)
plt.tight_layout()
plt.show()

# %% [markdown]
# Both are rotations of the same kind; they differ only by a fixed shuffle of the channels. But the checkpoint's
# `q_proj` and `k_proj` were trained for one layout: rotate the wrong channels together and the model breaks —
# the most common RoPE bug in from-scratch ports.
#
# Turning a pair $(a, b)$ by 90° gives $(-b, a)$. In the split-half layout that is a swap of the two halves with
# a minus on the (moved) second half — transformers calls it `rotate_half`:

# %%
def rotate_half(x):  # [..., d] -> [..., d]
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)

print(rotate_half(np.arange(1.0, 9.0)))  # pairs (1,5) (2,6) (3,7) (4,8) -> (-5,1) (-6,2) ...

# %% [markdown]
# ## 5. Applying RoPE
#
# Rotating a pair by $\phi$ is $(a, b) \mapsto (a\cos\phi - b\sin\phi,\; b\cos\phi + a\sin\phi)$: the vector times
# $\cos\phi$ plus its 90°-turned copy times $\sin\phi$. First as a loop — one position, one pair at a time — on
# a query of shape `[B, heads, T, d]`:

# %%
def apply_rope_loop(x, positions, inv_freq):
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[2]):
            for i in range(half):
                phi = np.float32(positions[b, t]) * inv_freq[i]
                a, c = x[b, :, t, i], x[b, :, t, i + half]  # the pair, for every head at once
                out[b, :, t, i] = a * np.cos(phi) - c * np.sin(phi)
                out[b, :, t, i + half] = c * np.cos(phi) + a * np.sin(phi)
    return out

# %% [markdown]
# Vectorised, this is one line: `x * cos + rotate_half(x) * sin`. The tables are `[B, T, d]` and `x` is
# `[B, heads, T, d]`, so they get a heads axis (`cos[:, None]`) — every head at a position turns by the same angles.

# %%
def apply_rope(x, cos, sin):  # [B, H, T, d], [B, T, d] x2 -> [B, H, T, d]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 4, 6, 32)).astype(np.float32)  # B=2, 4 heads, T=6, head_dim 32
pos = np.stack([np.arange(6), np.arange(3, 9)])  # the second row starts at position 3
small_inv = rope_inv_freq(32, 10000.0)
c, s = rope_cos_sin(pos, small_inv)
y = apply_rope(x, c, s)
print("shape", x.shape, "->", y.shape, "| max |loop - vectorised| =", maxdiff(y, apply_rope_loop(x, pos, small_inv)))

# %% [markdown]
# A rotation keeps lengths, so RoPE changes no vector's norm — only its direction:

# %%
print("norms before:", np.linalg.norm(x[0, 0], axis=-1).round(4))
print("norms after: ", np.linalg.norm(y[0, 0], axis=-1).round(4))

# %% [markdown]
# And the first reference check: transformers' `apply_rotary_pos_emb` on the same kind of input (4 query heads and
# 2 key heads, positions `[[0..5], [3..8]]`), stored in `REF`:

# %%
for name in ("q", "k"):
    mine = apply_rope(REF[f"rope.heads.{name}"], REF["rope.heads.cos"], REF["rope.heads.sin"])
    print(name, REF[f"rope.heads.{name}"].shape, "max |Δ| vs transformers:", maxdiff(mine, REF[f"rope.heads.{name}_embed"]))

# %% [markdown]
# ## 6. Only the distance matters
#
# The property from section 1, now with our real functions: the score of a query at position $m$ with a key at
# position $n$ is the same for $(7, 3)$, $(107, 103)$ and $(10007, 10003)$.

# %%
def rope_score(q, k, m, n, inv_freq):
    cq, sq = rope_cos_sin(np.array([[m]]), inv_freq)
    ck, sk = rope_cos_sin(np.array([[n]]), inv_freq)
    return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

qv, kv = rng.standard_normal((2, 1, 1, 1, HEAD_DIM)).astype(np.float32)
for m, n in [(7, 3), (107, 103), (10007, 10003), (7, 4)]:
    print(f"q at {m:>5}, k at {n:>5} (distance {m - n}): score {rope_score(qv, kv, m, n, inv_freq):.5f}")

# %% [markdown]
# (The last digits wobble at position 10,007: the angles are float32, whose spacing there is about 0.001 rad.)
#
# What the score does as the distance grows: for a query and key that point the same way (all ones), the pairs
# start in step and drift out of phase, fast pairs first. The score shrinks with distance — a mild bias towards
# nearby tokens that RoPE gives for free:

# %%
ones = np.ones((1, 1, 1, HEAD_DIM), dtype=np.float32)
dist = np.unique(np.round(np.logspace(0, np.log10(32768), 800)).astype(np.int64))  # 1 … 32,768
cos_d, sin_d = rope_cos_sin(dist[None], inv_freq)  # rotate the key by the distance, keep the query at 0
scores = (apply_rope(np.broadcast_to(ones, (1, 1, dist.size, HEAD_DIM)), cos_d, sin_d) * ones).sum(-1)[0, 0]
plt.figure(figsize=(7, 3))
plt.plot(dist, scores / HEAD_DIM)
plt.xscale("log"), plt.xlabel("distance m − n (log scale)"), plt.ylabel("q·k / head_dim")
plt.title("RoPE score of two identical all-ones vectors vs their distance (Qwen3-0.6B frequencies)")
plt.show()

# %% [markdown]
# ## 7. Float32 angles
#
# transformers computes the angles as `position_ids.float() * inv_freq`: **float32**. A float32 number near
# 40,000 is only accurate to about 0.004, so at long positions the angle it gets differs from the exact one.
# Is that a bug? No — it is what the model runs with (and, for the real weights, trained with), so it is what we
# must reproduce. Computing the angles in float64 is *more* accurate and exactly for that reason *different*:

# %%
pos_long = np.array([0, 100, 1000, 8191, 32767, 40959])
angle32 = pos_long.astype(np.float32)[:, None] * inv_freq  # what transformers does
angle64 = pos_long.astype(np.float64)[:, None] * inv_freq.astype(np.float64)
for p, d in zip(pos_long, np.abs(np.cos(angle32) - np.cos(angle64)).max(axis=1)):
    print(f"position {p:>6}: max |cos(float32 angle) - cos(float64 angle)| = {d:.1e}")

# %% [markdown]
# One NumPy trap makes float64 angles easy to get by accident: positions are integers, and **int64 × float32 is
# float64** in NumPy. Hence the `positions.astype(np.float32)` in `rope_cos_sin`:

# %%
print((np.arange(3) * inv_freq[:3]).dtype, (np.arange(3).astype(np.float32) * inv_freq[:3]).dtype)

# %% [markdown]
# The same sensitivity reaches back to `inv_freq`. One float32 ulp of pair 3's frequency (about 6e-8 of it)
# moves its angle at position 40,959 by 40,959 × 0.52 × 6e-8 ≈ 1e-3 rad. And float32 `**` is *not* bit-identical
# across libraries: NumPy's and torch's disagree in the last bit for 14 of Qwen3-0.6B's 64 pairs. Taking the power
# in float64 and rounding once gives the correctly rounded float32 value — what torch's pow returns for all but
# one pair (pair 37, slow enough that its ulp costs only ~1e-5 rad even at 131,072):

# %%
exponent = np.arange(0, HEAD_DIM, 2, dtype=np.float32) / np.float32(HEAD_DIM)
naive = np.float32(1.0) / np.float32(THETA) ** exponent  # float32 pow in NumPy
for name, candidate in [("NumPy float32 pow", naive), ("float64 pow, rounded", rope_inv_freq(HEAD_DIM, THETA))]:
    differ = np.nonzero(candidate != REF["freq.qwen3_0_6b.inv_freq"])[0]
    c32, _ = rope_cos_sin(REF["cos_sin.long.positions"], candidate)
    print(f"{name:<21}: {differ.size:>2} pairs differ from transformers' inv_freq; "
          f"cos table up to position 40,959 off by {np.abs(c32 - REF['cos_sin.long.cos']).max():.1e}")

# %% [markdown]
# Both effects are far below what the model itself can resolve (its bf16 weights carry 3 significant digits),
# but they decide whether "equal to transformers" holds at 1e-5 or only at 1e-2 — and a check is only useful
# if it is tight. With the same `inv_freq`, our tables at positions 0 … 40,959 against transformers'
# (the reference's `cos_sin.long` case):

# %%
mine_cos, mine_sin = rope_cos_sin(REF["cos_sin.long.positions"], REF["cos_sin.long.inv_freq"])
print("float32 angles: max |Δ| =", max(maxdiff(mine_cos, REF["cos_sin.long.cos"]), maxdiff(mine_sin, REF["cos_sin.long.sin"])))
a64 = REF["cos_sin.long.positions"][..., None] * REF["cos_sin.long.inv_freq"].astype(np.float64)
print("float64 angles: max |Δ| =", maxdiff(np.cos(np.concatenate([a64, a64], -1)), REF["cos_sin.long.cos"]))

# %% [markdown]
# ## 8. Why long context breaks plain RoPE
#
# Back to the slow pairs of section 2. A pair with a wavelength of a million positions turned through only a
# small arc of its circle during training on 32,768-token documents. Run the model at position 131,072 and that
# pair points in directions **no key or query ever had in training**; the attention weights that relied on it are
# extrapolating, and quality collapses (perplexity shoots up past the trained length).
#
# How much of its circle each pair covered in training, and how much it would need at 4× the length:

# %%
L = 32768
covered = lambda omega, length: np.minimum(length * omega / (2 * np.pi), 1.0)  # fraction of a full turn
plt.figure(figsize=(7, 3.5))
plt.plot(covered(inv_freq, L), label="seen in training (0 … 32,768)")
plt.plot(covered(inv_freq, 4 * L), "--", label="needed at 131,072")
plt.fill_between(np.arange(inv_freq.size), covered(inv_freq, L), covered(inv_freq, 4 * L),
                 color="C3", alpha=0.2, label="never-seen angles")
plt.xlabel("pair index i"), plt.ylabel("fraction of a full turn")
plt.title("Plain RoPE past its trained length: the slow pairs leave familiar ground")
plt.legend()
plt.show()

# %% [markdown]
# The fast pairs (left) are fine: they went round thousands of times, every angle is familiar. The trouble is only
# in the slow pairs.
#
# ## 9. YaRN: stretch only the slow pairs
#
# The simplest fix, *position interpolation*, divides every frequency by the stretch factor $s$ (here 4): position
# 131,072 then turns exactly as far as 32,768 did. But it also squashes the fast pairs — neighbouring tokens,
# one radian apart in pair 0, become a quarter radian apart, and the model's sense of "right next to me" blurs.
#
# YaRN ("NTK-by-parts") treats the pairs differently according to **how many full turns** $r$ they make inside
# the original window $L$:
#
# - pairs with more than $\beta_{fast} = 32$ turns keep their frequency (extrapolate: all angles were seen),
# - pairs with fewer than $\beta_{slow} = 1$ turn are divided by $s$ (interpolate: stay inside the trained arc),
# - in between, a linear **ramp** blends the two.
#
# The pair index with exactly $r$ turns inside $L$ solves $L\,\omega_i = 2\pi r$:
#
# $$\operatorname{dim}(r) = \frac{d\,\ln\!\big(L / (2\pi r)\big)}{2\ln\theta}$$
#
# transformers rounds the ends outward (`floor` for the fast end, `ceil` for the slow end) and clamps them into
# $[0, d-1]$. For Qwen3-0.6B-yarn ($s = 4$, $L = 32768$):

# %%
yarn_config = load_config(FIXTURES / "configs" / "Qwen3-0.6B-yarn.json")
S = yarn_config.rope_scaling
print(S)
L = S.original_max_position_embeddings
dim = lambda r: HEAD_DIM * math.log(L / (r * 2 * math.pi)) / (2 * math.log(THETA))
low, high = max(math.floor(dim(S.beta_fast)), 0), min(math.ceil(dim(S.beta_slow)), HEAD_DIM - 1)
print(f"dim(32 turns) = {dim(S.beta_fast):.2f} -> low = {low}")
print(f"dim(1 turn)   = {dim(S.beta_slow):.2f} -> high = {high}")

# %% [markdown]
# The ramp, pair by pair (0 = keep the frequency, 1 = divide it by $s$), as a loop:

# %%
ramp_loop = []
for i in range(HEAD_DIM // 2):
    r = (i - low) / (high - low)
    ramp_loop.append(min(max(r, 0.0), 1.0))
print(np.round(ramp_loop, 2))

# %% [markdown]
# and vectorised, in float32 like transformers, as the whole of `yarn_inv_freq`:

# %%
def yarn_inv_freq(head_dim, theta, factor, original_max_position_embeddings, beta_fast=32.0, beta_slow=1.0):
    L = original_max_position_embeddings
    dim = lambda r: head_dim * math.log(L / (r * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: never divide by zero
    i = np.arange(head_dim // 2, dtype=np.float32)
    ramp = np.clip((i - np.float32(low)) / np.float32(high - low), 0, 1)  # [d/2]: 0 keep … 1 interpolate
    inv = rope_inv_freq(head_dim, theta)
    return (inv * (1 - ramp) + inv / np.float32(factor) * ramp).astype(np.float32)

yarn_inv = yarn_inv_freq(HEAD_DIM, THETA, S.factor, L, S.beta_fast, S.beta_slow)
ramp = (1 - yarn_inv / inv_freq) / (1 - 1 / S.factor)  # recover the ramp from the result
print("same ramp as the loop:", np.allclose(ramp, ramp_loop, atol=1e-5))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
turns = S.original_max_position_embeddings * inv_freq / (2 * np.pi)
ax1.plot(ramp, ".-")
ax1.axvspan(0, low, color="C2", alpha=0.15, label=f"> {S.beta_fast:g} turns in L: keep")
ax1.axvspan(high, HEAD_DIM // 2 - 1, color="C3", alpha=0.15, label=f"< {S.beta_slow:g} turn in L: ÷ {S.factor:g}")
ax1.set(xlabel="pair index i", ylabel="interpolation weight (ramp)", title="YaRN's ramp, Qwen3-0.6B, factor 4")
ax1.legend(fontsize=8)
ax2.semilogy(inv_freq, label="plain RoPE")
ax2.semilogy(yarn_inv, "--", label="YaRN")
ax2.semilogy(inv_freq / S.factor, ":", label="position interpolation (all ÷ 4)")
ax2.set(xlabel="pair index i", ylabel="ω_i (rad per position)", title="Frequencies")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# With YaRN's frequencies, how much of its circle does each pair cover at 131,072 positions? The slow pairs are
# back inside what they saw in training, and the fast pairs are untouched:

# %%
plt.figure(figsize=(7, 3.5))
plt.plot(covered(inv_freq, L), label="plain RoPE, seen in training (0 … 32,768)")
plt.plot(covered(yarn_inv, 4 * L), "--", label="YaRN at 131,072")
plt.plot(covered(inv_freq, 4 * L), ":", color="C3", label="plain RoPE at 131,072")
plt.xlabel("pair index i"), plt.ylabel("fraction of a full turn")
plt.title("YaRN keeps every pair's angles inside the range seen in training")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# Against transformers, for three settings (the fixture's tiny head, Qwen3-0.6B-yarn, and one with other betas):

# %%
for case in ("fixture", "qwen3_0_6b", "custom"):
    g = lambda key: REF[f"yarn.{case}.{key}"].item()
    mine = yarn_inv_freq(g("head_dim"), g("theta"), g("factor"), g("original"), g("beta_fast"), g("beta_slow"))
    print(f"{case:>10}: max relative |Δ| = {np.abs(mine / REF[f'yarn.{case}.inv_freq'] - 1).max():.1e}")

# %% [markdown]
# ## 10. YaRN's attention factor
#
# Stretching the slow pairs makes the attention distributions a little flatter (softer) at long range. YaRN
# compensates by sharpening the softmax: it multiplies the logits by $t^2$ with
#
# $$t = 0.1\,\ln s + 1 \qquad (t = 1 \text{ when } s \le 1)$$
#
# Multiplying the scores directly would need a change to attention; instead transformers multiplies **both** the
# cos and the sin table by $t$. Queries and keys are both rotated with them, so every score $q\cdot k$ gains
# $t \cdot t = t^2$. For $s = 4$, $t = 1.1386$:

# %%
def yarn_attention_factor(factor):
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

t = yarn_attention_factor(S.factor)
print(f"t = {t:.4f} (transformers: {REF['yarn.qwen3_0_6b.attention_factor']:.4f}); logits scaled by t² = {t * t:.4f}")
s_grid = np.linspace(1, 32, 100)
plt.figure(figsize=(5, 3))
plt.plot(s_grid, [yarn_attention_factor(v) ** 2 for v in s_grid])
plt.xlabel("stretch factor s"), plt.ylabel("logit scale t²"), plt.title("YaRN's softmax sharpening")
plt.show()

# %% [markdown]
# The whole YaRN table of Qwen3-0.6B-yarn at the long positions transformers was asked for (1K, 8K, 32K, 100K,
# 131K), from our own `yarn_inv_freq` and `yarn_attention_factor`:

# %%
yarn_06 = yarn_inv_freq(*(REF[f"yarn.qwen3_0_6b.{k}"].item()
                          for k in ("head_dim", "theta", "factor", "original", "beta_fast", "beta_slow")))
yc, ys = rope_cos_sin(REF["cos_sin.yarn_long.positions"], yarn_06, yarn_attention_factor(4.0))
print("positions", REF["cos_sin.yarn_long.positions"].tolist())
print("max |Δ| vs transformers:", max(maxdiff(yc, REF["cos_sin.yarn_long.cos"]), maxdiff(ys, REF["cos_sin.yarn_long.sin"])))

# %% [markdown]
# ## 11. YaRN at long range
#
# So far we compared frequency *tables*. Does a whole model with YaRN really agree with transformers thousands of
# positions past its original window? `tests/data/long-yarn` is a tiny random Qwen3 whose config asks for YaRN
# with factor 4 on an original window of $L = 2048$ (so its context is $4L = 8192$, the same ratio as Qwen3's
# 32,768 → 131,072), with rope_theta 10,000 so that both ends of the ramp are in play. With it comes a 6,144-token
# prompt and transformers' float32 logits at 80 of its positions (made by `tests/fixtures/make_long_context.py`).
#
# Two things to notice before running it:
#
# - A YaRN model uses its stretched frequencies at **every** position, also below $L$: the slow pairs were
#   fine-tuned that way. Forgetting YaRN is therefore wrong everywhere, not only past $L$ (only position 0, which
#   attends to itself alone, cannot tell).
# - Thousands of positions mean $T^2$ attention scores: tinyqwen switches to tile-by-tile attention there
#   ([chapter 8](08-kv-cache-generation.ipynb) explains how), so this also checks that.
#
# We run the first 4,100 tokens (twice the original window) with YaRN, and again with the mistake — plain RoPE
# frequencies and no attention factor:

# %%
from tinyqwen.model import load_model

long_model = load_model(REPO / "tests" / "data" / "long-yarn")
long_ref = np.load(REPO / "tests" / "data" / "long-yarn" / "reference.npz")
N = 4100
at = long_ref["positions"] < N
pos, want = long_ref["positions"][at], long_ref["logits"][at]
yarn_logits = long_model(long_ref["input_ids"][:N])[pos]

forgot = dataclasses.replace(long_model)  # the same weights, plain RoPE
forgot.inv_freq = rope_inv_freq(long_model.config.head_dim, long_model.config.rope_theta)
forgot.attention_factor = 1.0
plain_logits = forgot(long_ref["input_ids"][:N])[pos]

# %%
tol = 1e-5 * max(1.0, np.abs(want).max())  # tinyqwen/verify.py's "equal"
plt.figure(figsize=(7, 3.5))
plt.semilogy(pos, np.abs(yarn_logits - want).max(-1), ".", label="YaRN (as the config says)")
plt.semilogy(pos, np.abs(plain_logits - want).max(-1), ".", label="plain RoPE (YaRN forgotten)")
plt.axhline(tol, color="gray", lw=0.8, ls="--")
plt.text(50, tol * 1.5, "tolerance: 1e-5 of the largest logit", color="gray", fontsize=8)
plt.axvline(long_model.config.rope_scaling.original_max_position_embeddings, color="C3", lw=0.8)
plt.xlabel("position"), plt.ylabel("max |Δ logit| vs transformers")
plt.title("A YaRN model at long range (original window 2048)")
plt.legend(fontsize=8)
plt.show()
print(f"YaRN: max |Δ| = {np.abs(yarn_logits - want).max():.1e} over {len(pos)} positions up to {pos.max()}")

# %% [markdown]
# The YaRN model sits at float32 noise at every position, past the original window included; the plain-RoPE one
# is off by whole logits. `tests/test_long_context.py` runs the full 6,144 tokens, also through a KV cache in
# chunks and token by token, and `tests/test_crosscheck_long.py` compares every position against live
# transformers.
#
# %% [markdown]
# ## 12. Checkpoint: RoPE in the real model
#
# Our functions should equal tinyqwen's own module (`tinyqwen/rope.py`) — and the real test: put them inside a
# model. `tests/fixtures/dense-yarn` is a tiny random Qwen3 with YaRN (factor 4 on an original window of 64
# positions), and transformers' logits for a 72-token input, so the input runs past the original window. We
# swap its RoPE kernel for our `apply_rope` and its frequencies for our `yarn_inv_freq` and attention factor:

# %%
from tinyqwen import rope as tq_rope
from tinyqwen.model import load_model

print("inv_freq equals tinyqwen's:", np.array_equal(inv_freq, tq_rope.default_inv_freq(HEAD_DIM, THETA)))
print("YaRN inv_freq equals tinyqwen's:", np.array_equal(yarn_inv, tq_rope.yarn_inv_freq(HEAD_DIM, THETA, S)))

model = load_model(FIXTURES / "dense-yarn")
c = model.config
model.backend = dataclasses.replace(model.backend, apply_rope=apply_rope)  # our rotation in every layer
s = c.rope_scaling  # factor 4, original window 64
model.inv_freq = yarn_inv_freq(c.head_dim, c.rope_theta, s.factor, s.original_max_position_embeddings)
model.attention_factor = yarn_attention_factor(s.factor)
fixture = np.load(FIXTURES / "dense-yarn" / "reference.npz")
logits = model(fixture["input_ids"])
print("input", fixture["input_ids"].shape, "| logits max |Δ| vs transformers:", maxdiff(logits, fixture["logits"]))

# %% [markdown]
# ## Summary
#
# - RoPE rotates each pair of query/key channels by $m\,\omega_i$; the score then depends only on the distance
#   $m - n$. The pairs turn at speeds $\omega_i = \theta^{-2i/d}$ from 1 rad per token down to ~1e-6.
# - Qwen3 pairs channel $j$ with $j + d/2$ (split-half, `rotate_half`), not neighbours; `cos`/`sin` repeat the
#   angles in both halves, and every head at a position shares one table.
# - Angles are computed in float32, as transformers does — float64 is more exact and therefore different at long
#   positions (watch out for int64 × float32 = float64).
# - Past the trained length, slow pairs reach angles they never saw. YaRN divides only those by the factor, keeps
#   the fast ones, ramps in between, and sharpens the softmax by $t^2$ with $t = 0.1\ln s + 1$.
# - A YaRN model uses the stretched table at every position; with it, a whole model equals transformers thousands
#   of positions past the original window (forgetting it costs whole logits, everywhere).
#
# **Exercises:** run `pytest exercises/test_ch04_rope_yarn.py` and fill in `exercises/ch04_rope_yarn.py` until every
# checkpoint passes. The last one runs your functions inside the YaRN fixture model.
#
# The final check of this notebook, against the stored transformers outputs:

# %%
q_long = apply_rope(REF["rope.yarn_long.q"], REF["rope.yarn_long.cos"], REF["rope.yarn_long.sin"])
checks = {  # name: (max |Δ| against transformers, bound)
    "inv_freq (Qwen3-0.6B), relative": (maxdiff(inv_freq / REF["freq.qwen3_0_6b.inv_freq"], 1), 1e-6),
    "YaRN inv_freq (0.6B-yarn), relative": (maxdiff(yarn_06 / REF["yarn.qwen3_0_6b.inv_freq"], 1), 1e-6),
    "YaRN cos at 0..131071": (maxdiff(yc, REF["cos_sin.yarn_long.cos"]), 1e-5),
    "YaRN sin at 0..131071": (maxdiff(ys, REF["cos_sin.yarn_long.sin"]), 1e-5),
    "RoPE on q at 100K positions": (maxdiff(q_long, REF["rope.yarn_long.q_embed"]), 1e-5),
    "dense-yarn logits": (maxdiff(logits, fixture["logits"]), 1e-4),
}
for name, (delta, bound) in checks.items():
    assert delta <= bound, (name, delta, bound)
    print(f"{name:<36} max |Δ| = {delta:.1e} <= {bound:g} against transformers")
