# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
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
# # Chapter 8 · The KV cache and generation
#
# The model of [chapter 6](06-dense-model.ipynb) and [chapter 7](07-mixture-of-experts.ipynb) answers one question:
# given these tokens, how likely is each possible next token? A chatbot asks that question over and over, appending
# one token each time. This chapter turns the model into a *generator*:
#
# 1. the **KV cache**, which makes each new token cost one position instead of the whole text — and how to
#    *measure* that it does (a cache that is never read looks exactly like one that is, until you count);
# 2. what the cache costs in **memory**, per official Qwen3 model — and how 32K- and 131K-token prompts fit:
#    attention tile by tile (the online softmax), a bf16 cache, chunked prefill;
# 3. **greedy** decoding and the **sampling** knobs — temperature, top-k, top-p, min-p, repetition penalty — each
#    shown on a distribution before and after;
# 4. **streaming** tokens to the screen, and **batching** prompts of different lengths with left padding.
#
# Everything is checked against Hugging Face transformers: its logits, its logits processors and its `generate`.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
import tinyqwen  # noqa: E402
from tinyqwen.kv_cache import KVCache  # noqa: E402


# %% [markdown]
# We work on the `dense-tied` fixture: a tiny random Qwen3 (2 layers, 4 query heads, 2 key/value heads, a vocabulary
# of 512) in the official file layout. Its folder also holds what transformers computed on it: `reference.npz`
# (logits) and `generate.json` (greedy generations).

# %%
model = tinyqwen.load_model(FIXTURES / "dense-tied")
official = json.loads((FIXTURES / "dense-tied" / "generate.json").read_text())
reference = np.load(FIXTURES / "dense-tied" / "reference.npz")
prompt = official["prompts"][1]
prompt

# %% [markdown]
# ## Why generation needs a cache
#
# The simplest generator runs the model on the whole text, takes the arg-max of the *last* row of logits, appends
# it, and repeats. We count how many positions go through the model.


# %%
def naive_greedy(model, prompt, n):
    ids, fed = list(prompt), 0
    for _ in range(n):
        logits = model(np.array(ids))  # [T, vocab]: the whole text, every step
        fed += len(ids)
        ids.append(int(np.argmax(logits[-1])))
    return ids[len(prompt) :], fed


# %%
tokens, fed = naive_greedy(model, prompt, 8)
print("ours:        ", tokens, f"({fed} positions through the model)")
print("transformers:", official["single"][1])

# %% [markdown]
# The tokens are right — but look at the bill. Step $s$ runs all $P + s$ positions again, so $N$ new tokens after a
# $P$-token prompt cost $\sum_{s=0}^{N-1} (P + s) = NP + N(N-1)/2$ positions: quadratic in the length. Yet almost
# all of that work is repeated. In a causal model, position $t$ only looks at positions $\le t$, so everything the
# model computed for the old positions is *exactly the same* at the next step. Only the newest position is new.
#
# What does the newest position need from the old ones? Look at attention for one head: the new query $q_t$ is
# compared with every key and mixes every value,
#
# $$\text{out}_t = \sum_{j \le t} \operatorname{softmax}_j\!\left(\frac{q_t \cdot k_j}{\sqrt{d}}\right) v_j .$$
#
# So it needs the **keys and values** of all earlier positions, in every layer — and nothing else (old queries are
# never used again). Store them once, and each new token only computes its own $q, k, v$.
#
# ## Prefill and decode
#
# Generation with a cache has two phases:
#
# - **prefill**: the whole prompt goes through the model in one pass, filling the cache with its keys and values
#   (a big, parallel matrix product — fast per token);
# - **decode**: one position per step; it appends its own key and value and attends over the cache.
#
# The picture shows which positions are computed at each step, without and with the cache.

# %%
P, N = 6, 8
naive = np.zeros((N, P + N))
cached = np.zeros((N, P + N))
for s in range(N):
    naive[s, : P + s] = 1  # everything so far, again
    if s == 0:
        cached[s, :P] = 1  # prefill: the prompt, once
    else:
        cached[s, P + s - 1] = 1  # decode: only the newest token
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for ax, grid, title in [(axes[0], naive, "without a cache"), (axes[1], cached, "with a KV cache")]:
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.3)
    ax.axvline(P - 0.5, color="gray", ls="--", lw=1)
    ax.set_title(f"{title}: {int(grid.sum())} positions computed")
    ax.set_xlabel("position in the text (prompt | generated)")
axes[0].set_ylabel("generation step")
axes[1].text(P / 2 - 0.5, 0, "prefill", ha="center", va="center", color="white", fontsize=9)
axes[1].text(P + 3, 4, "decode:\none position\nper step", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The KV cache
#
# The cache holds, for every layer, a keys array and a values array of shape `[batch, kv_heads, max_len, head_dim]`.
# It is **preallocated** at the largest length the job needs (prompt + new tokens), so nothing is copied as it
# grows; a counter `length` says how many positions are filled. It stores the `num_key_value_heads` heads of
# grouped-query attention ([chapter 5](05-attention.ipynb)), not one per query head — that halves (0.6B) or
# quarters (4B, 8B) its size.
#
# A tiny loop version first: a list per layer that we append to.

# %%
toy_keys = []  # one layer, one head, head_dim 2: a growing list of key vectors
for step, k in enumerate([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]):
    toy_keys.append(np.array(k))
    print(f"step {step}: the query attends over {len(toy_keys)} keys")

# %% [markdown]
# Appending to lists reallocates and copies. The real one writes the new keys into the next free slots of the
# preallocated array and hands back a *view* of everything filled so far — no copy:


# %%
def kv_cache_update(cache_k, cache_v, k, v, length):
    # [B, Hkv, max_len, d] x2, [B, Hkv, T, d] x2, int -> [B, Hkv, length + T, d] x2 (views into the cache)
    end = length + k.shape[2]
    cache_k[:, :, length:end] = k
    cache_v[:, :, length:end] = v
    return cache_k[:, :, :end], cache_v[:, :, :end]


# %%
cache_k, cache_v = np.zeros((1, 1, 5, 2)), np.zeros((1, 1, 5, 2))
keys, _ = kv_cache_update(
    cache_k, cache_v, np.ones((1, 1, 3, 2)), np.ones((1, 1, 3, 2)), length=0
)  # prefill 3
keys, _ = kv_cache_update(
    cache_k, cache_v, 2 * np.ones((1, 1, 1, 2)), np.ones((1, 1, 1, 2)), length=3
)  # decode 1
print(keys.shape, keys[0, 0, :, 0], "| a view of the cache:", np.shares_memory(keys, cache_k))

# %% [markdown]
# tinyqwen's `KVCache` (`tinyqwen/kv_cache.py`) is exactly this, plus the bookkeeping: `update(layer, k, v)` is our
# function for one layer, and the model advances `length` once, after its last layer. To run *our* update inside
# the real model we subclass it:


# %%
class MyCache(KVCache):
    def update(self, layer, k, v):
        return kv_cache_update(self.keys[layer], self.values[layer], k, v, self.length)


def new_cache(model, batch, max_len):
    c = model.config
    return MyCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)


# %% [markdown]
# Prefill: the prompt goes through `model.forward` with the cache. `last_only=True` asks for the last position's
# logits only — the others are never used in generation (and at a 151,936-word vocabulary they are not free).

# %%
cache = new_cache(model, batch=1, max_len=len(prompt) + 8)
out = model.forward(np.array([prompt]), cache=cache, last_only=True)
print("logits", out.logits.shape, "| cache length", cache.length, "of", cache.max_len)
print("layer 0 keys:", cache.keys[0].shape, "= [batch, kv_heads, max_len, head_dim]")

# %% [markdown]
# ## Positions in decode
#
# A decode step feeds one token. Which *position* is it? RoPE ([chapter 4](04-rope-yarn.ipynb)) rotates its query
# and key by its position in the text — and that is `cache.length` (7 here), **not** 0, even though the array we
# feed has length 1. Getting this wrong is a classic bug: the tokens still come out, just the wrong ones. Compare
# both against the full forward on prompt + token:

# %%
token = int(np.argmax(out.logits[0, -1]))
full = model(np.array(prompt + [token]))[-1]  # the truth: the whole text at once

for label, pos in [("position = cache.length", len(prompt)), ("position restarted at 0", 0)]:
    trial = new_cache(model, 1, len(prompt) + 1)
    model.forward(np.array([prompt]), cache=trial)
    step = model.forward(np.array([[token]]), cache=trial, positions=np.array([[pos]])).logits[0, -1]
    print(f"{label:24}  max |Δ| vs full forward = {np.abs(step - full).max():.2e}")

# %% [markdown]
# (Left alone, `forward` computes positions itself from the cache length — below we pass them explicitly, because
# for a batch they also depend on padding.)
#
# ## Checking the cache against transformers
#
# The strongest test of a cache: feed a sequence **one token at a time** and the logits must equal those of the
# full forward pass — which for this fixture transformers computed and stored (`single_logits`).

# %%
ids = reference["single_input_ids"]  # [9]
cache = new_cache(model, 1, len(ids))
rows = []
for t, token in enumerate(ids):
    step = model.forward(np.array([[token]]), cache=cache, positions=np.array([[t]]))
    rows.append(step.logits[0, -1])
stepwise = np.stack(rows)  # [9, vocab]
print(
    f"token by token vs transformers' full forward: max |Δ| = {np.abs(stepwise - reference['single_logits']).max():.1e}"
)

# %% [markdown]
# ## Measuring that the cache helps
#
# A cache can be written correctly and never used — the loop still passes the whole text, or forgets to pass the
# cache — and the tokens are still right! Wall time will not tell you reliably either: on a tiny model the cost is
# Python overhead, and on a big one it depends on the machine. **Count the work instead.** A thin wrapper counts the
# positions each call feeds:


# %%
class Counting:
    def __init__(self, model):
        self.model, self.config, self.positions = model, model.config, 0

    def __call__(self, ids):
        self.positions += np.asarray(ids).shape[-1]
        return self.model(ids)

    def forward(self, ids, **kwargs):
        self.positions += ids.shape[0] * ids.shape[1]
        return self.model.forward(ids, **kwargs)


# %% [markdown]
# Now a greedy loop *with* the cache — prefill once, then one position per step (one prompt for now; batches come
# at the end of the chapter):


# %%
def cached_greedy(model, prompt, n):
    cache = new_cache(model, 1, len(prompt) + n)
    logits = model.forward(np.array([prompt]), cache=cache, last_only=True).logits[0, -1]
    new = []
    for _ in range(n):
        new.append(int(np.argmax(logits)))
        if len(new) == n:
            break
        position = np.array([[cache.length]])
        logits = model.forward(np.array([new[-1:]]), cache=cache, positions=position, last_only=True).logits[
            0, -1
        ]
    return new


# %%
counter_naive, counter_cached = Counting(model), Counting(model)
same = naive_greedy(counter_naive, prompt, 8)[0] == cached_greedy(counter_cached, prompt, 8)
print(
    f"same tokens: {same}; positions fed: naive {counter_naive.positions}, cached {counter_cached.positions}"
)

# %% [markdown]
# With the cache: $P + N - 1$ positions (the last token is never fed back). Without it: $NP + N(N-1)/2$. The gap
# grows quadratically:

# %%
lengths = [1, 2, 4, 8, 16, 32, 64]
counts = {"naive": [], "cached": []}
for n in lengths:
    naive_counter, cached_counter = Counting(model), Counting(model)
    naive_greedy(naive_counter, prompt, n)
    cached_greedy(cached_counter, prompt, n)
    counts["naive"].append(naive_counter.positions)
    counts["cached"].append(cached_counter.positions)
plt.figure(figsize=(6, 3.6))
plt.plot(lengths, counts["naive"], "o-", label="naive: the whole text every step")
plt.plot(lengths, counts["cached"], "s-", label="KV cache: prefill + one per step")
plt.xlabel("new tokens generated")
plt.ylabel("positions through the model")
plt.title(f"Work to generate after a {len(prompt)}-token prompt")
plt.legend()
plt.show()

# %% [markdown]
# In FLOPs: every position costs about $2 \times$ (parameters outside the embedding) multiply-adds in the matrix
# products (plus attention, which grows with the context). For Qwen3-0.6B, 500 new tokens after a 1,000-token prompt:

# %%
from tinyqwen.config import CONFIG_DIR, load_config  # noqa: E402
from tinyqwen.config import count_parameters  # noqa: E402

c = load_config(CONFIG_DIR / "Qwen3-0.6B.json")  # CONFIG_DIR: the official config.json files tinyqwen ships
# multiply-adds of the matrix products; the embedding is a lookup (and the output head, which in 0.6B is the
# same matrix, runs only on the last position with last_only=True)
per_position = 2 * (count_parameters(c) - c.vocab_size * c.hidden_size)
P0, N0 = 1000, 500
for name, positions in [("naive", N0 * P0 + N0 * (N0 - 1) // 2), ("cached", P0 + N0 - 1)]:
    print(f"{name:7} {positions:>9,} positions ≈ {positions * per_position / 1e12:6.1f} TFLOPs")

# %% [markdown]
# ## How much memory the cache takes
#
# Each token leaves behind one key and one value vector per kv head per layer:
#
# $$\text{bytes per token} = 2 \times \text{layers} \times \text{kv\_heads} \times \text{head\_dim} \times
# \text{bytes per number}$$
#
# (the 2 is K and V). Let us read it off the official config files:


# %%
def kv_cache_bytes(config, n_tokens, bytes_per_value):
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]
    return per_token * n_tokens * bytes_per_value


names = ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-30B-A3B"]
configs = {n: json.loads((CONFIG_DIR / f"{n}.json").read_text()) for n in names}
print(
    f"{'model':14} {'layers':>6} {'kv heads':>8} {'q heads':>7} {'KiB/token bf16':>14} {'without GQA':>11} {'40,960 tokens':>13}"
)
for n, cfg in configs.items():
    per_token = kv_cache_bytes(cfg, 1, 2)
    mha = per_token * cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    full = kv_cache_bytes(cfg, cfg["max_position_embeddings"], 2)
    print(
        f"{n:14} {cfg['num_hidden_layers']:>6} {cfg['num_key_value_heads']:>8} {cfg['num_attention_heads']:>7} "
        f"{per_token / 1024:>14.0f} {mha / 1024:>11.0f} {full / 2**30:>10.2f} GiB"
    )

# %% [markdown]
# Two surprises. The 30B mixture-of-experts model has the *smallest* cache per token: it has only 4 kv heads.
# And at its full context, the 0.6B model's cache (4.4 GiB in bf16) is **bigger than its own weights**
# (0.6 B parameters × 2 bytes = 1.2 GB). That is why the cache is sized for the job, not the maximum context, and
# why grouped-query attention exists. Our NumPy cache is float32, twice the bf16 numbers:

# %%
context = np.linspace(0, 40960, 200)
plt.figure(figsize=(7, 4))
labels = {"Qwen3-4B": "Qwen3-4B and 8B (same cache)", "Qwen3-8B": None}
for n, cfg in configs.items():
    if n in labels and labels[n] is None:
        continue  # 8B's cache is 4B's: same layers, kv heads and head_dim
    line = plt.plot(context, kv_cache_bytes(cfg, context, 2) / 2**30, label=labels.get(n, n))[0]
    plt.plot(context, kv_cache_bytes(cfg, context, 4) / 2**30, ls="--", color=line.get_color())
weights = count_parameters(c) * 2 / 2**30  # Qwen3-0.6B in bf16
plt.axhline(weights, color="gray", lw=0.8)
plt.text(25000, weights - 0.6, "Qwen3-0.6B's weights (bf16)", color="gray", fontsize=8)
plt.xlabel("context length (tokens)")
plt.ylabel("KV cache, one sequence (GiB)")
plt.title("KV-cache memory vs context (solid bf16, dashed fp32)")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Long context: 32K and 131K tokens
#
# Qwen3 reads 32,768 tokens natively and 131,072 with YaRN ([chapter 4](04-rope-yarn.ipynb)). At that length three
# things that did not matter so far decide whether a prompt fits in memory at all:
#
# 1. the **KV cache**, which grows with every token (above);
# 2. the **attention scores**: the plain attention of [chapter 5](05-attention.ipynb) builds the whole
#    $[T, S]$ matrix of scores per head — for a 32K prompt of Qwen3-0.6B, $16 \times 32768^2 \times 4$ bytes =
#    64 GiB in *one* layer;
# 3. the **activations** of the prompt's tokens inside a layer: MLP temporaries of $[T, \text{ffn}]$ floats.
#
# Each has its fix. The cache can be stored in **2 bytes** instead of 4; attention can be computed **one tile at a
# time**; and the prompt can go through the model in **chunks** (a chunk of 2,048 tokens attends to the cache of
# everything before it — exactly what decode does for one token). Let us take them in turn.
#
# ### Computing attention tile by tile: the online softmax
#
# One query row's attention is $\sum_s p_s v_s$ with $p_s = e^{x_s - m} / \sum_{s'} e^{x_{s'} - m}$ and $m$ the
# row's largest score. The catch: $m$ and the sum need *all* scores before the first $p_s$ is known. The **online
# softmax** walks the keys in blocks and keeps three running quantities — the largest score so far $m$, the sum of
# exponentials $\ell$ and the weighted sum of values $a$. When a new block raises the maximum to $m'$, everything
# summed so far was computed relative to the old $m$, so it is rescaled by $e^{m - m'}$:
#
# $$m' = \max(m, \max_{s \in \text{block}} x_s), \qquad
#   \ell' = \ell\, e^{m - m'} + \sum_{s} e^{x_s - m'}, \qquad
#   a' = a\, e^{m - m'} + \sum_{s} e^{x_s - m'} v_s,$$
#
# and at the end the output is $a / \ell$. Here it is for one query, a loop over blocks of 3 keys:

# %%
rng = np.random.default_rng(0)
x, vals = rng.standard_normal(10), rng.standard_normal((10, 4))  # 10 scores, 10 value vectors
m, l, a = -np.inf, 0.0, np.zeros(4)
for s0 in range(0, 10, 3):
    xb, vb = x[s0 : s0 + 3], vals[s0 : s0 + 3]
    m_new = max(m, xb.max())
    l = l * np.exp(m - m_new) + np.exp(xb - m_new).sum()
    a = a * np.exp(m - m_new) + np.exp(xb - m_new) @ vb
    m = m_new
p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
print("online:", (a / l).round(6), "\nplain: ", (p @ vals).round(6))

# %% [markdown]
# Same numbers, and the loop never held more than one block of scores. `tinyqwen.attention.blockwise_attention`
# does this for every head and every query at once, in tiles of 512 queries × 1,024 keys, and skips the tiles that
# lie wholly in the future of a causal prompt (their mask is all False). This picture shows which tiles a
# 4,096-token prompt computes:

# %%
from tinyqwen.attention import KEY_BLOCK, QUERY_BLOCK  # noqa: E402

T_demo = 4096
tiles = np.array([[s0 <= t0 + QUERY_BLOCK - 1 for s0 in range(0, T_demo, KEY_BLOCK)]
                  for t0 in range(0, T_demo, QUERY_BLOCK)])  # fmt: skip
plt.figure(figsize=(3.6, 4.2))
plt.pcolormesh(np.arange(0, T_demo + 1, KEY_BLOCK), np.arange(0, T_demo + 1, QUERY_BLOCK), tiles,
               cmap="Blues", vmin=0, vmax=1.4, edgecolors="white", linewidth=1)  # fmt: skip
plt.plot([0, T_demo], [0, T_demo], color="crimson", lw=1, label="causal boundary")
plt.gca().invert_yaxis()
plt.xlabel("key position")
plt.ylabel("query position")
plt.legend(loc="upper right", fontsize=7)
plt.title(f"{tiles.sum()} of {tiles.size} tiles computed")
plt.show()

# %% [markdown]
# The model switches to the blockwise version when a layer's scores exceed $1024 \times 1024$ per head — measured:
# below that the plain version is as fast, above it the blockwise one is *faster* as well as bounded (it skips the
# future half). Both give the same result up to float32 rounding — here on a left-padded GQA batch whose second row
# starts with padding:

# %%
from tinyqwen.attention import CausalMask, attention, blockwise_attention, causal_mask  # noqa: E402

B, Hq, Hkv, T, d = 2, 8, 2, 300, 16
q = rng.standard_normal((B, Hq, T, d)).astype(np.float32)
k, v = rng.standard_normal((2, B, Hkv, T, d)).astype(np.float32)
key_mask = np.ones((B, T), bool)
key_mask[1, :40] = False
tiled = blockwise_attention(q, k, v, CausalMask(key_mask, past=0), query_block=64, key_block=96)
plain = attention(q, k, v, causal_mask(T, T)[None] & key_mask[:, None, :])
print(f"max |blockwise - plain| = {np.abs(tiled - plain).max():.1e}")

# %% [markdown]
# ### A narrower cache: bfloat16 and float16
#
# The cache is written once and read at every later step, so storing it in 2 bytes halves its memory (and the
# bytes a decode step reads). NumPy has no bfloat16, so tinyqwen stores **bf16 as uint16 bit patterns** — the top
# half of a float32 ([chapter 2](02-loading-weights.ipynb)), rounded to nearest-even when written as torch does,
# and widened exactly when read. float16 keeps more precision (11 bits against 8) but overflows above 65,504.
# `model.new_cache(batch, length, dtype="bfloat16")`, `generate(..., kv_dtype="bfloat16")` and the CLI's
# `--kv-dtype bfloat16` choose it. The price is a small error in the logits:

# %%
yarn_model = tinyqwen.load_model(FIXTURES / "dense-yarn")
ids = rng.integers(0, 512, (1, 200))
for dtype in ["float32", "bfloat16", "float16"]:
    cache = yarn_model.new_cache(1, 200, dtype=dtype)
    logits = yarn_model.forward(ids, cache=cache).logits
    if dtype == "float32":
        exact = logits
    err = np.abs(logits - exact).max() / np.abs(exact).max()
    print(f"{dtype:9} cache {cache.nbytes / 1024:6.0f} KiB   max |Δ logits| = {err:.1e} of the largest logit")

# %% [markdown]
# ### The memory of a long prompt, for every Qwen3 model
#
# `tinyqwen.kv_cache.memory_estimate` adds it all up for a prefill in chunks of 2,048 tokens: the weights, the
# cache (per dtype), one chunk's activations (the largest set of temporaries alive at once, counted from the code
# and checked with `tracemalloc`), and the interpreter. `tinyqwen info --model PATH --context 32768` prints the same
# numbers for one checkpoint. Here is every Qwen3 model at the native 32K and the YaRN 131K, weights in bf16 as
# shipped. `tinyqwen.config.published_configs()` gives all eight configs, as in [chapter 0](00-tour.ipynb): 0.6B, 4B
# and 8B from copies of their official config.json, the other five from published values (30B-A3B's file, and four
# written as changes from a sibling's file), which are not byte-verified:

# %%
from tinyqwen.config import published_configs  # noqa: E402
from tinyqwen.kv_cache import memory_estimate  # noqa: E402

family = published_configs()

# %%
GiB = 2**30
print(f"{'model':16}{'weights':>9} │{'KV fp32':>9}{'KV bf16':>9}{'activ.':>8}{'total':>8} │"
      f"{'KV fp32':>9}{'KV bf16':>9}{'total':>8}")  # fmt: skip
print(f"{'':16}{'(bf16)':>9} │{'── 32,768 tokens ──':>34} │{'── 131,072 tokens ──':>26}")
for n, cfg in family.items():
    w = count_parameters(cfg) * 2
    row = [w / GiB]
    for ctx in (32768, 131072):
        m32, m16 = (memory_estimate(cfg, ctx, dt, weight_bytes=w) for dt in ("float32", "bfloat16"))
        row += [m32["kv_cache"] / GiB, m16["kv_cache"] / GiB]
        row += [m16["activations"] / GiB] if ctx == 32768 else []
        row += [sum(m16.values()) / GiB]
    print(f"{n:16}{row[0]:>9.1f} │" + "".join(f"{v:>9.1f}" for v in row[1:3]) + f"{row[3]:>8.2f}{row[4]:>8.1f} │"
          + "".join(f"{v:>9.1f}" for v in row[5:7]) + f"{row[7]:>8.1f}")  # fmt: skip

# %% [markdown]
# (GiB; totals use the bf16 cache.) At 131K tokens the bf16 cache outweighs the weights of every model up to 8B
# (the 0.6B model's 14 GiB of cache against 1.1 GiB of weights), and the 30B mixture-of-experts model — only 4 kv
# heads — has the smallest cache of the whole family. The activations of a 2,048-token chunk stay well under a GiB even for the largest models: chunked
# prefill is what keeps them independent of the prompt's length. As a picture, total memory against context:

# %%
ctx = np.array([1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
plt.figure(figsize=(7, 4))
for n in ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B"]:
    cfg = family[n]
    w = count_parameters(cfg) * 2
    total = [sum(memory_estimate(cfg, int(t), "bfloat16", weight_bytes=w).values()) / GiB for t in ctx]
    line = plt.plot(ctx, total, "o-", ms=3, label=n)[0]
    plt.axhline(w / GiB, color=line.get_color(), lw=0.6, ls=":")
plt.xscale("log", base=2)
plt.yscale("log")
plt.axvline(32768, color="gray", lw=0.8)
plt.text(33500, 150, "native 32K", color="gray", fontsize=8)
plt.xlabel("context (tokens)")
plt.ylabel("memory to prefill it (GiB)")
plt.title("Weights (bf16, dotted) + bf16 KV cache + one chunk's activations")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# Does the estimate hold? `benchmarks/bench_long_context.py` prefills random prompts into a bf16 cache on a random
# checkpoint of Qwen3-0.6B's exact shape and reads the process's peak resident memory from the kernel. Its stored
# runs (`benchmarks/results/`), measured against predicted (2-layer rows: the model cut to 2 layers, the same
# memory per layer; 28-layer rows: the whole model, the 32K one on the numba backend with its bf16 weights; the wall
# times were taken on a shared, busy machine — `benchmarks/results/long-context.md` says how time grows with depth
# and length):

# %%
runs = []
for f in sorted((REPO / "benchmarks" / "results").glob("*long-context*.json")):
    runs += json.loads(f.read_text())["runs"]
print(f"{'tokens':>7}{'layers':>7}{'prefill':>10}{'peak RSS':>10}{'predicted':>11}{'ratio':>7}")
for r in runs:
    print(f"{r['prompt_tokens']:>7,}{r['layers']:>7}{r['prefill_s']:>9.0f}s{r['peak_rss_prefill'] / GiB:>9.2f}G"
          f"{r['predicted_total'] / GiB:>10.2f}G{r['peak_rss_prefill'] / r['predicted_total']:>7.3f}")  # fmt: skip

# %% [markdown]
# Finally, a chat that outgrows its context. `tinyqwen chat` prints after each reply how many tokens the
# conversation uses and how many are left; when a new message would not leave room for a reply, it **drops the
# oldest exchanges** (the system message stays) and says so. The alternative — refusing — keeps the model's memory
# of the conversation intact but ends it; dropping keeps it going at the price of forgetting its beginning.
# The rule, as a function:

# %%
from tinyqwen.chat_context import drop_oldest_exchange  # noqa: E402

history = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
           {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]  # fmt: skip
[m["content"] for m in drop_oldest_exchange(history)]

# %% [markdown]
# ## Greedy decoding
#
# Greedy decoding takes the arg-max every step — `cached_greedy` above. It is deterministic, so it is what we
# compare with transformers, and it is what tinyqwen's `generate` does at `temperature=0`:

# %%
for i, p in enumerate(official["prompts"]):
    ours = cached_greedy(model, p, 8)
    print(
        ours,
        "transformers:",
        official["single"][i],
        "tinyqwen:",
        tinyqwen.generate(model, p, 8, eos_token_ids=()),
    )

# %% [markdown]
# Greedy text from a real model tends to loop ("I think that I think that …"), and a chat model should not give the
# same answer to every "tell me a story". So we *sample*: draw the next token from the distribution the logits
# define. Qwen's recommended settings (its `generation_config.json` and model card) are temperature 0.6, top-k 20,
# top-p 0.95 in thinking mode. The rest of this section takes those knobs one at a time.
#
# ## Sampling: from logits to probabilities
#
# We use the same fixed-seed logits that the exercises are graded on: 4 rows over a 64-token vocabulary, with
# transformers' outputs for every knob stored next to them (`exercises/references/ch08_kv_cache_generation.npz`,
# made by `make_ch08_kv_cache_generation.py` with transformers' own logits processors).

# %%
ref = np.load(REPO / "exercises" / "references" / "ch08_kv_cache_generation.npz")
logits, seen_ids = ref["logits"].astype(np.float64), ref["seen_ids"]
print(logits.shape, "| transformers' pipeline order:", ref["pipeline_order"].tolist())


def softmax(z):
    z = np.exp(
        z - np.max(z, axis=-1, keepdims=True)
    )  # -inf -> exp(-inf) = 0: filtered tokens get probability 0
    return z / z.sum(axis=-1, keepdims=True)


def show(ax, r, z, title, top=30):
    """Row r's distribution before (gray) and after (blue) a knob turned its logits into z."""
    before, after = softmax(logits[r]), softmax(z)
    order = np.argsort(-before)[:top]  # always the original ranking, so the bars line up
    ax.bar(range(top), before[order], color="lightgray", label="before")
    ax.bar(range(top), after[order], width=0.5, color="C0", label="after")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens, most likely first")


row = 1
fig, ax = plt.subplots(figsize=(6, 2.6))
show(ax, row, logits[row], f"row {row}: softmax of the raw logits")
ax.set_ylabel("probability")
plt.show()

# %% [markdown]
# ## Temperature
#
# Divide the logits by $T$ before the softmax: $p_i \propto e^{z_i / T}$. $T < 1$ sharpens (at $T \to 0$ all the
# mass goes to the arg-max: greedy), $T > 1$ flattens (at $T \to \infty$: uniform).


# %%
def apply_temperature(z, temperature):
    return z / temperature


fig, axes = plt.subplots(1, 3, figsize=(12, 2.6), sharey=True)
for ax, t in zip(axes, [0.5, 1.0, 1.5]):
    show(ax, row, apply_temperature(logits[row], t), f"T = {t}")
axes[0].set_ylabel("probability")
axes[0].legend(["before (T = 1)", "after"])
plt.show()

# %% [markdown]
# A classic slip is to apply the temperature *after* the softmax: $\text{softmax}(z)/T$, renormalised to sum to 1,
# is just $\text{softmax}(z)$ again — the knob silently does nothing:

# %%
after = softmax(logits[row]) / 0.5
print("temperature after softmax changes nothing:", np.allclose(after / after.sum(), softmax(logits[row])))
ours = np.stack([apply_temperature(logits, t) for t in ref["temperature_values"]])
print(
    f"vs transformers' TemperatureLogitsWarper: max |Δ| = {np.abs(ours - ref['temperature_out']).max():.1e}"
)

# %% [markdown]
# ## Top-k, top-p and min-p
#
# Even at a sensible temperature, the long tail of unlikely tokens holds a lot of probability in total — and one
# draw from the tail can derail a sentence. The filters cut the tail off by setting those logits to $-\infty$
# (probability 0), then sampling renormalises over what is left.
#
# **Top-k** keeps the $k$ largest logits. Loop version, then vectorised:


# %%
def top_k_loop(z, k):
    keep = sorted(range(len(z)), key=lambda i: -z[i])[:k]
    return np.array([z[i] if i in keep else -np.inf for i in range(len(z))])


def top_k_filter(z, k):
    kth = np.sort(z)[-k]  # the k-th largest value (np.partition would find it in O(V))
    return np.where(z < kth, -np.inf, z)  # ties with the k-th are kept, as in transformers


print(np.array_equal(top_k_loop(logits[row], 5), top_k_filter(logits[row], 5)))

# %% [markdown]
# **Top-p** (nucleus sampling) keeps the *smallest* set of most likely tokens whose probabilities add up to at
# least $p$. Walk down the sorted probabilities adding them up: a token is kept if the mass *before* it is still
# below $p$. So the token that carries the sum across $p$ is kept — dropping it is the classic off-by-one, and with
# a dominant first token ($p_1 > p$) it would leave nothing at all.


# %%
def top_p_loop(z, p):
    probs = softmax(z)
    keep, mass = [], 0.0
    for i in np.argsort(-probs):
        if mass >= p:
            break
        keep.append(i)
        mass += probs[i]
    return np.where(np.isin(np.arange(len(z)), keep), z, -np.inf)


def top_p_filter(z, p):
    probs = softmax(z)
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
    keep = np.zeros(len(z), dtype=bool)
    keep[order] = before < p
    return np.where(keep, z, -np.inf)


print(np.array_equal(top_p_loop(logits[row], 0.8), top_p_filter(logits[row], 0.8)))

# %% [markdown]
# **Min-p** keeps the tokens at least `min_p` times as likely as the most likely one: $p_i \ge \text{min\_p} \cdot
# p_{\max}$. Unlike top-k, the cut *adapts*: a confident distribution keeps few tokens, a flat one keeps many.


# %%
def min_p_filter(z, min_p):
    probs = softmax(z)
    return np.where(probs >= min_p * probs.max(), z, -np.inf)


# %% [markdown]
# The three, on the same row. Gray: the distribution before; blue: after the filter, renormalised — the survivors
# share the mass the cut tokens had.

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 2.6), sharey=True)
for ax, (name, z) in zip(axes, [("top-k, k = 8", top_k_filter(logits[row], 8)),
                                ("top-p, p = 0.9", top_p_filter(logits[row], 0.9)),
                                ("min-p, min_p = 0.2", min_p_filter(logits[row], 0.2))]):  # fmt: skip
    show(ax, row, z, f"{name}: keeps {np.isfinite(z).sum()}")
axes[0].set_ylabel("probability")
axes[0].legend()
plt.show()

# %% [markdown]
# Top-p, seen as the cumulative curve: keep the tokens until the curve reaches $p$, including the one that crosses.

# %%
probs = np.sort(softmax(logits[row]))[::-1][:20]
before = np.cumsum(probs) - probs
plt.figure(figsize=(6, 3))
plt.step(range(20), np.cumsum(probs), where="post", label="mass up to and including the token")
plt.bar(range(20), probs, color=np.where(before < 0.8, "C0", "lightgray"), label="token probability")
plt.axhline(0.8, color="C3", ls="--", label="p = 0.8")
plt.xlabel("tokens, most likely first")
plt.ylabel("probability")
plt.title("top-p keeps the token that crosses p")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# Min-p's adaptivity: the same `min_p = 0.1` on a confident row (row 0) and a flat one (row 3). The red line is the
# threshold $0.1 \cdot p_{\max}$:

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 2.6))
for ax, r in zip(axes, [0, 3]):
    z = min_p_filter(logits[r], 0.1)
    show(ax, r, z, f"row {r}: min_p = 0.1 keeps {np.isfinite(z).sum()} of 64")
    ax.axhline(0.1 * softmax(logits[r]).max(), color="C3", ls="--", lw=1)
axes[0].set_ylabel("probability")
plt.show()

# %% [markdown]
# All three against transformers' `TopKLogitsWarper`, `TopPLogitsWarper` and `MinPLogitsWarper`, for every stored
# row and setting. "Equal" means the same tokens survive and the survivors keep their logits:


# %%
def compare(fn, name):
    worst = 0.0
    for value, want in zip(ref[f"{name}_values"], ref[f"{name}_out"]):
        for z, w in zip(logits, want):
            got = fn(z, value)
            assert np.array_equal(np.isfinite(got), np.isfinite(w)), (name, value)
            worst = max(worst, np.abs(got[np.isfinite(w)] - w[np.isfinite(w)]).max())
    print(
        f"{name:6}: same survivors as transformers for {len(ref[name + '_values'])} settings × 4 rows, max |Δ| = {worst:.1e}"
    )


compare(lambda z, k: top_k_filter(z, int(k)), "top_k")
compare(top_p_filter, "top_p")
compare(min_p_filter, "min_p")

# %% [markdown]
# ## Repetition penalty
#
# To discourage loops, the CTRL paper's *repetition penalty* $r > 1$ lowers the score of every token already in the
# text (prompt and output). Lowering means dividing a positive logit by $r$ but **multiplying** a negative one —
# dividing $-2$ by $1.3$ gives $-1.54$, which *raises* it. Each seen token is penalised once, however often it
# appeared.


# %%
def repetition_penalty(z, seen_ids, penalty):
    seen = np.unique(seen_ids)
    out = z.copy()
    out[seen] = np.where(z[seen] > 0, z[seen] / penalty, z[seen] * penalty)
    return out


ours = np.stack(
    [[repetition_penalty(z, s, r) for z, s in zip(logits, seen_ids)] for r in ref["repetition_values"]]
)
print(
    f"vs transformers' RepetitionPenaltyLogitsProcessor: max |Δ| = {np.abs(ours - ref['repetition_out']).max():.1e}"
)

# %%
seen = np.unique(seen_ids[row])
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.bar(np.arange(len(seen)) - 0.2, logits[row, seen], width=0.4, label="before")
ax.bar(
    np.arange(len(seen)) + 0.2,
    repetition_penalty(logits[row], seen_ids[row], 2.0)[seen],
    width=0.4,
    label="after, r = 2",
)
ax.axhline(0, color="black", lw=0.6)
ax.set_xticks(range(len(seen)), seen)
ax.set_xlabel("token ids already in the text")
ax.set_ylabel("logit")
ax.set_title("repetition penalty: every seen token moves towards -∞")
ax.legend()
plt.show()

# %% [markdown]
# (tinyqwen also has the OpenAI-style *presence* and *frequency* penalties, which subtract a constant once per
# distinct generated token and once per occurrence: `tinyqwen.sampling.apply_presence_penalty`.)
#
# ## The sampling pipeline
#
# The order matters. transformers (and vLLM, and tinyqwen) apply: penalties → temperature → top-k → top-p → min-p →
# softmax. Temperature comes *before* the filters, so a low temperature also shrinks the nucleus of top-p. We ask
# transformers' `generate` for its own pipeline (stored in the reference file) and compare:


# %%
def sampling_distribution(z, seen, temperature, top_k, top_p, min_p, penalty):
    z = repetition_penalty(z, seen, penalty)
    z = apply_temperature(z, temperature)
    z = min_p_filter(top_p_filter(top_k_filter(z, top_k), top_p), min_p)
    return softmax(z)


print("settings:", list(ref["pipeline_settings"]))
ours = np.stack([sampling_distribution(z, s, 0.6, 20, 0.95, 0.05, 1.2) for z, s in zip(logits, seen_ids)])
print(f"probabilities vs transformers' pipeline: max |Δ| = {np.abs(ours - ref['pipeline_probs']).max():.1e}")

# %% [markdown]
# Finally one number from a seeded random generator picks a token: draw $u \sim U[0, 1)$ and take the first token
# whose cumulative probability exceeds $u$ (inverse-CDF sampling). Two thousand draws land where the probabilities
# say:

# %%
rng = np.random.default_rng(0)
p = ours[3]  # the flattest row keeps the most tokens
draws = np.searchsorted(np.cumsum(p), rng.random(2000), side="right")
alive = np.flatnonzero(p > 0)
x = np.arange(len(alive))
plt.figure(figsize=(7, 2.8))
plt.bar(x - 0.2, p[alive], width=0.4, label="probability")
plt.bar(x + 0.2, np.bincount(draws, minlength=len(p))[alive] / 2000, width=0.4, label="share of 2,000 draws")
plt.xticks(x, alive)
plt.xlabel("token id (the survivors of the filters)")
plt.ylabel("probability")
plt.title("sampling from the filtered distribution")
plt.legend()
plt.show()

# %% [markdown]
# tinyqwen bundles all this in `tinyqwen.sampling` (`SamplingParams`, `process_logits`, `sample`), and
# `tinyqwen.generate(model, ids, n, temperature=0.6, seed=0)` samples with the checkpoint's defaults.
#
# ## Streaming
#
# A chat interface prints each token as soon as it exists: `tinyqwen.stream_generate` is a generator that `yield`s
# every new id the moment it is chosen.

# %%
for token in tinyqwen.stream_generate(model, prompt, 5, eos_token_ids=()):
    print(token, end=" ", flush=True)

# %% [markdown]
# Printing text token by token has one trap: a token is a run of *bytes*, and one character can be split across
# tokens. The emoji 🦙 is 4 bytes spread over three tokens here; decoding each token alone prints garbage, while
# the tokenizer's stream decoder ([chapter 1](01-tokenization.ipynb)) holds back incomplete bytes until the
# character is whole:

# %%
tok = tinyqwen.Tokenizer.qwen3()
ids = tok.encode("I like 🦙 llamas")
stream = tok.stream_decoder()
print("token by token:  ", [tok.decode([i]) for i in ids])
print("stream decoder:  ", [stream.push(i) for i in ids])

# %% [markdown]
# ## Batching with left padding
#
# Generating for several prompts at once keeps the matrix products big — the hardware likes that. But prompts have
# different lengths and an array must be a rectangle, so we **pad**. Which side? Every step appends one column for
# all rows at once, so every row's *last real token* must be in the *last column*: pad on the **left**.


# %%
def left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)  # [B, P]
    mask = np.zeros((len(prompts), width), dtype=np.int64)  # [B, P]: 1 real, 0 padding
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    return ids, mask


ids, mask = left_pad(official["prompts"], pad_id=0)
print(ids, "\nsame as the batch transformers generated from:", ids.tolist() == official["batch"]["input_ids"])

# %% [markdown]
# With right padding, a short row's last column is a pad: the logits read there are the model's guess after a pad
# token, not after the prompt, and the new token lands after a gap of pads.

# %%
right = np.array([[1] * len(p) + [0] * (ids.shape[1] - len(p)) for p in official["prompts"]])
fig, axes = plt.subplots(1, 2, figsize=(10, 2.2))
for ax, m, title in [(axes[0], mask, "left padding"), (axes[1], right, "right padding")]:
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1.3)
    ax.add_patch(plt.Rectangle((m.shape[1] - 1.5, -0.5), 1, len(m), fill=False, ec="C3", lw=2.5))
    ax.set_title(f"{title}: the red column's logits give the next tokens", fontsize=10)
    ax.set_xlabel("column (blue = real token, white = pad)")
    ax.set_yticks(range(len(m)))
axes[0].set_ylabel("row")
plt.show()

# %% [markdown]
# Two things keep each padded row computing *exactly* what it would compute alone:
#
# - the **attention mask** (`[B, past + T]`, 0 on padding) keeps real tokens from attending to pads;
# - the **positions** count only real tokens: a row's first real token is position 0 whatever its column. That is
#   the running count of real tokens, minus one: `cumsum(mask) - 1` (pads get 0 — they are masked anyway).


# %%
def positions_from_mask(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [B, S] -> [B, S]


print(positions_from_mask(mask))

# %% [markdown]
# The mask and positions cover every column the cache will ever hold (prompt + new tokens), so we compute them
# once; each step slices its columns. Now the batched greedy generator — prefill the padded prompts, then one
# column per step:


# %%
def greedy_generate(model, prompts, max_new_tokens, pad_id=0, eos_id=None):
    ids, mask = left_pad(prompts, pad_id)  # [B, P] x2
    B, P = ids.shape
    mask = np.concatenate([mask, np.ones((B, max_new_tokens), dtype=mask.dtype)], axis=1)  # [B, P + N]
    positions = positions_from_mask(mask)  # [B, P + N]
    cache = new_cache(model, B, P + max_new_tokens)
    logits = model.forward(ids, cache=cache, attention_mask=mask[:, :P], positions=positions[:, :P],
                           last_only=True).logits[:, -1]  # fmt: skip
    outputs, done = [[] for _ in prompts], [False] * B
    for step in range(max_new_tokens):
        next_ids = np.argmax(logits, axis=-1)  # [B]
        for b in range(B):
            if not done[b]:
                outputs[b].append(int(next_ids[b]))
                done[b] = next_ids[b] == eos_id
        if all(done) or step == max_new_tokens - 1:
            break
        t = P + step  # the column this step fills
        logits = model.forward(next_ids[:, None], cache=cache, attention_mask=mask[:, : t + 1],
                               positions=positions[:, t : t + 1], last_only=True).logits[:, -1]  # fmt: skip
    return outputs


# %%
batch = greedy_generate(model, official["prompts"], 8)
print("left-padded batch == transformers' batch:", batch == official["batch"]["new_tokens"])
print("each row == its run alone:               ", batch == official["single"])

# %% [markdown]
# And the mistake, to see it fail: right padding with the same loop (positions and mask still honest) gives other
# tokens for the two shorter rows.


# %%
def right_pad(prompts, pad_id):
    ids = np.full((len(prompts), max(len(p) for p in prompts)), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    return ids, mask


saved, left_pad = left_pad, right_pad  # swap the padding inside greedy_generate, just for this cell
wrong = greedy_generate(model, official["prompts"], 8)
left_pad = saved
for w, r in zip(wrong, official["batch"]["new_tokens"]):
    print("right-padded:", w, "| transformers:", r)

# %% [markdown]
# ## A real checkpoint
#
# With an official Qwen3 checkpoint on this machine (`$TINYQWEN_MODEL`, or Qwen/Qwen3-0.6B in the Hugging Face cache)
# this cell streams a sampled answer with Qwen's recommended settings. The chat template is the next chapter.

# %%
from tinyqwen.hub import official_checkpoint  # noqa: E402

path = official_checkpoint()
if path is None:
    print("No official checkpoint here (set $TINYQWEN_MODEL to use one); the fixtures above stand in for it.")
else:
    real = tinyqwen.load_model(path)
    real_tok = tinyqwen.Tokenizer.from_pretrained(path)
    text = tinyqwen.apply_chat_template([{"role": "user", "content": "Name three uses of a KV cache."}],
                                        add_generation_prompt=True, enable_thinking=False)  # fmt: skip
    stream = real_tok.stream_decoder()
    for token in tinyqwen.stream_generate(
        real, real_tok.encode(text), 60, temperature=0.7, top_p=0.8, seed=0
    ):
        print(stream.push(token), end="", flush=True)

# %% [markdown]
# ## Summary
#
# - Generation = prefill the prompt once, then decode one position per step. The **KV cache** stores every layer's
#   keys and values so a step costs one position instead of the whole text: linear instead of quadratic work.
#   Count positions (or FLOPs) to *prove* the cache is used; the tokens alone cannot tell.
# - A decode step's position is the number of tokens before it (`cache.length`), never 0.
# - The cache costs $2 \cdot L \cdot H_{kv} \cdot d$ numbers per token: 112 KiB per token for Qwen3-0.6B in bf16,
#   4.4 GiB at its full 40,960-token context — more than its weights. GQA's few kv heads are what keep it small.
# - Long prompts: attention tile by tile with an **online softmax** (never the $[T, S]$ scores), a **bf16 or fp16
#   cache** (half the bytes, a small logit error), and **chunked prefill** (a chunk's activations, not the
#   prompt's). `tinyqwen info --context N` predicts the memory; the benchmark checks it.
# - Sampling is a pipeline on the logits: penalties → temperature → top-k → top-p → min-p → softmax → one seeded
#   draw. Temperature divides logits (before the softmax); top-p keeps the token that crosses $p$; the repetition
#   penalty multiplies negative logits.
# - Batches are **left**-padded, with an attention mask and positions `cumsum(mask) - 1`, so every row computes
#   exactly what it would alone.
#
# ## Checkpoint: greedy tokens equal transformers'
#
# Our greedy generator — our cache update, our positions, our left padding — against transformers' `generate` on
# every fixture (dense, YaRN, sharded bf16 and both mixture-of-experts models), one prompt at a time and as one
# left-padded batch:

# %%
checked = 0
for fixture in ["dense-tied", "dense-untied-bf16-sharded", "dense-yarn", "moe-norm-topk", "moe-sparse-step"]:
    m = tinyqwen.load_model(FIXTURES / fixture, progress=False)
    want = json.loads((FIXTURES / fixture / "generate.json").read_text())
    for p, single in zip(want["prompts"], want["single"]):
        assert greedy_generate(m, [p], want["max_new_tokens"]) == [single], fixture
    assert greedy_generate(m, want["prompts"], want["max_new_tokens"]) == want["batch"]["new_tokens"], fixture
    checked += len(want["prompts"]) + 1
print(
    f"{checked} greedy generations (single prompts and left-padded batches, 5 fixtures) equal transformers' generate"
)

# %% [markdown]
# ## Exercises
#
# Open `exercises/ch08_kv_cache_generation.py` and fill in the functions, in the order of this notebook:
# `kv_cache_update`, `kv_cache_bytes`, `apply_temperature`, `top_k_filter`, `top_p_filter`, `min_p_filter`,
# `repetition_penalty`, `sampling_distribution`, `left_pad`, `positions_from_mask` and `greedy_generate`. Then run
#
# ```bash
# pytest exercises/test_ch08_kv_cache_generation.py
# ```
#
# The last checkpoint runs *your* generation loop, with your cache, on a real checkpoint whose kernels are your own
# from chapters 3–7, and compares its tokens with transformers'.
