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
# # Chapter 10 · Making it fast on the CPU
#
# Chapters 3–9 built a Qwen3 that is *correct*: its logits equal transformers'. It is not yet *fast*. Generating one
# token of Qwen3-0.6B with the NumPy reference takes about twice as long as llama.cpp, the C++ engine people compare
# everything with. This chapter finds out why, computes how fast decoding *could* be on a given machine, and writes the
# one kernel that matters most, a matrix–vector product reading bfloat16 weights, with
# [Numba](https://numba.readthedocs.io/), a compiler for a subset of Python and NumPy.
#
# The plan:
#
# 1. profile one decode step of a Qwen3-0.6B-shaped model: where does the time go?
# 2. the roofline: decoding is limited by memory bandwidth, so bytes per token set a ceiling on tokens per second;
# 3. bfloat16 halves the bytes, and widening it is a shift ([chapter 2](02-loading-weights.ipynb));
# 4. a parallel GEMV kernel in Numba that reads bf16 and widens it on the fly;
# 5. its bandwidth, measured on the output head's shape;
# 6. a stored benchmark run against the peers (llama.cpp, transformers);
# 7. the checkpoint: our kernel inside the real model still gives transformers' logits.
#
# The production kernels live in `backends/` (the `numba` backend); here we write the central one ourselves.

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np

from course_setup import REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
from tinyqwen import attention, mlp, norm, rope  # noqa: E402

# %% [markdown]
# ## 1. Where decode time goes
#
# During decoding the model sees **one** new token. Every matrix of every layer is multiplied by one vector: a
# matrix–vector product, a GEMV. To see where the time goes we build layers with Qwen3-0.6B's exact shapes and
# random weights, plus its output head (151,936 × 1,024), and time each operation of one decode step.
# Random weights run exactly as fast as trained ones.

# %%
H, Q, KV, D, F, V, LAYERS = 1024, 16, 8, 128, 3072, 151936, 28  # Qwen3-0.6B's config.json
SHAPES = {"q": (Q * D, H), "k": (KV * D, H), "v": (KV * D, H), "o": (H, Q * D),
          "gate": (F, H), "up": (F, H), "down": (H, F)}  # fmt: skip
rng = np.random.default_rng(0)

# %% [markdown]
# Drawing hundreds of millions of normal samples takes seconds, so we draw 1 M and repeat them with `np.resize`: the
# timing depends on the size of a matrix, not on its values. One more trap: a layer is 63 MB, and some server CPUs
# have a last-level cache that large. A benchmark that multiplies the *same* layer again and again then measures the
# cache, not the memory. A real model streams 28 different layers, so we build 8 copies (504 MB) and cycle
# through them.

# %%
pool = rng.standard_normal(1 << 20, dtype=np.float32) * 0.02
COPIES = 8
layers = [{name: np.resize(pool, shape) for name, shape in SHAPES.items()} for _ in range(COPIES)]
layer = layers[0]
lm_head = np.resize(pool, (V, H))  # [151936, 1024] float32: 622 MB
print(f"one layer: {sum(w.size for w in layer.values()) / 1e6:.1f} M weights; lm_head: {lm_head.size / 1e6:.1f} M")

# %% [markdown]
# A timer that keeps the best of a few runs (on a busy machine the best run is the least disturbed one):

# %%
def best_ms(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)

# %% [markdown]
# One decode step of one layer, with a KV cache that already holds 256 tokens, made of tinyqwen's own kernels (the
# ones the `numpy` backend uses):

# %%
S = 256  # tokens already in the cache
x = rng.standard_normal((1, 1, H), dtype=np.float32)
k_cache = rng.standard_normal((1, KV, S, D), dtype=np.float32)
v_cache = rng.standard_normal((1, KV, S, D), dtype=np.float32)
cos, sin = np.ones((1, 1, D), np.float32), np.zeros((1, 1, D), np.float32)
mask, ones = np.ones((1, 1, S), bool), np.ones(H, np.float32)
q = mlp.linear(x, layer["q"]).reshape(1, 1, Q, D).transpose(0, 2, 1, 3)  # [1, 16, 1, 128]
ops = {  # each takes one layer's weights L
    "norms": lambda L: norm.rms_norm(x, ones, 1e-6),
    "q, k, v projections": lambda L: [mlp.linear(x, L[n]) for n in "qkv"],
    "RoPE": lambda L: rope.apply_rope(q, cos, sin),
    "attention": lambda L: attention.attention(q, k_cache, v_cache, mask),
    "o projection": lambda L: mlp.linear(x.repeat(2, -1), L["o"]),
    "SwiGLU MLP": lambda L: mlp.swiglu(x, L["gate"], L["up"], L["down"]),
}
per_layer = {name: best_ms(lambda fn=fn: [fn(L) for L in layers]) / COPIES for name, fn in ops.items()}
per_layer["norms"] *= 4  # input, post-attention, q_norm and k_norm (QK-Norm is as cheap as one)
head_ms = best_ms(lambda: mlp.linear(x, lm_head), repeat=3)
{name: round(ms, 3) for name, ms in per_layer.items()} | {"lm_head": round(head_ms, 2)}

# %% [markdown]
# A token passes through 28 layers and then the head. Scaled up, the picture of one decode step:

# %%
step = {name: LAYERS * ms for name, ms in per_layer.items()} | {"lm_head": head_ms}
total_ms = sum(step.values())
fig, ax = plt.subplots(figsize=(9, 3))
colours = ["tab:purple" if n == "lm_head" else "tab:blue" if "proj" in n or "MLP" in n else "tab:gray" for n in step]
ax.barh(list(step), list(step.values()), color=colours)
for y, ms in enumerate(step.values()):
    ax.text(ms, y, f" {ms:.1f} ms ({100 * ms / total_ms:.0f} %)", va="center", fontsize=9)
ax.invert_yaxis()
ax.set(xlabel="milliseconds per decode step (28 layers + head)", xlim=(0, 1.3 * max(step.values())),
       title=f"NumPy, one decode step of a Qwen3-0.6B-shaped model: {total_ms:.0f} ms ≈ {1e3 / total_ms:.1f} tok/s")
plt.show()

# %% [markdown]
# The matrix products (blue and purple) take nearly all of the time; norms, RoPE and even attention over 256 cached
# tokens are small change. The largest single matrix is the **output head**: one GEMV over a quarter of the weights
# a token reads (section 2 counts them). (Your numbers differ from run to run and machine to machine, and a busy
# machine makes them jump; the shape of the chart does not change much.)
#
# ## 2. The roofline: bytes per token
#
# Why is a GEMV slow? Multiplying a $[m, n]$ matrix by a vector does $2mn$ floating-point operations and must read
# all $mn$ weights from memory. Each weight is used **once** per token: two flops per 4 bytes in float32. A modern
# core does tens of flops per nanosecond, but memory delivers only a few bytes per nanosecond per core. So the
# arithmetic units wait for memory, and the time of a decode step is, at best,
#
# $$t_{\text{token}} \;\ge\; \frac{\text{bytes of weights read per token}}{\text{memory bandwidth}}, \qquad
# \text{tok/s} \;\le\; \frac{\text{bandwidth}}{\text{bytes per token}}.$$
#
# This ceiling is the *roofline* for decoding. (Prefill is different: a 512-token prompt multiplies each weight by
# 512 vectors, so it does 512 times more arithmetic per byte and is limited by flops instead.)
#
# Let us measure the bandwidth a GEMV actually reaches here: the head's bytes divided by its time.

# %%
bandwidth = lm_head.nbytes / (head_ms / 1e3)  # bytes per second
print(f"NumPy's float32 GEMV on the head: {lm_head.nbytes / 1e6:.0f} MB in {head_ms:.1f} ms = "
      f"{bandwidth / 2**30:.1f} GiB/s")

# %% [markdown]
# How many weights does one decode step read? Every matrix of every layer, and the head. The embedding lookup reads
# a single row, and the norms are tiny, so we leave them out:

# %%
def weights_per_token(c: dict) -> int:
    """Weights multiplied during one decode step: 7 matrices per dense layer, plus the output head."""
    h, d, f = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    attn = h * d * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])  # q, o and k, v
    return c["num_hidden_layers"] * (attn + 3 * h * f) + c["vocab_size"] * h


c06 = json.loads((REPO / "tinyqwen" / "data" / "configs" / "Qwen3-0.6B.json").read_text())
n_read = weights_per_token(c06)
print(f"Qwen3-0.6B reads {n_read / 1e6:.0f} M weights per token; the head is {V * H / n_read:.0%} of them")

# %% [markdown]
# With a tied embedding the head *is* the embedding matrix, so it is read once per token, not twice. The ceiling
# for each storage format, at the bandwidth measured above:

# %%
formats = {"float32": 4, "bfloat16": 2, "int8 (q8_0)": 1.0625}  # q8_0: 32 int8 weights + one fp16 scale
ceiling = {name: bandwidth / (n_read * size) for name, size in formats.items()}
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.barh(list(ceiling), list(ceiling.values()), color=["tab:red", "tab:green", "tab:olive"])
ax.axvline(1e3 / total_ms, color="black", ls="--", label=f"NumPy now (section 1): {1e3 / total_ms:.1f} tok/s")
ax.invert_yaxis()
ax.set(xlabel="decode tok/s ceiling = bandwidth / bytes per token",
       title=f"Qwen3-0.6B decode roofline at {bandwidth / 2**30:.1f} GiB/s")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# Two lessons. The NumPy model (dashed line) runs close to the float32 ceiling, because BLAS streams the weights at
# about the speed the head's GEMV measured and the time between GEMVs is small. (On a busy machine the small GEMVs
# of the layers suffer more than the big one, and the line falls further below.) To go faster we must read
# **fewer bytes**. Storing the weights as
# bfloat16, as the official checkpoints do, halves them and doubles the ceiling. That is where llama.cpp's bf16
# speed comes from, and it also halves the memory the model needs.
#
# ## 3. bfloat16 is the top half of a float32
#
# [Chapter 2](02-loading-weights.ipynb) showed that a bf16 number is the upper 16 bits of a float32: the same sign,
# the same 8 exponent bits, 7 of the 23 mantissa bits. Widening is exact: put the 16 bits on top of 16 zero bits.

# %%
def bf16_to_float32(u16: np.ndarray) -> np.ndarray:  # [...] uint16 bit patterns -> [...] float32
    return (u16.astype(np.uint32) << 16).view(np.float32)


bf16_to_float32(np.array([0x3F80, 0xC000, 0x4049, 0x7F80], dtype=np.uint16))  # 1, -2, π in bf16, +inf

# %% [markdown]
# Two classic bugs live in this one line. `u16.astype(np.float32)` converts the *integer* 0x3F80 = 16256 into
# 16256.0: values, not bits. And shifting by 8 instead of 16 puts the pattern in the wrong place. Both give
# plausible-looking numbers, which is why a test against a reference is essential:

# %%
u = np.array([0x3F80, 0xC000], dtype=np.uint16)
u.astype(np.float32), (u.astype(np.uint32) << 8).view(np.float32)

# %% [markdown]
# To make bf16 weights out of float32 ones, we go the other way. Keeping the top 16 bits *truncates* (rounds toward
# zero), which biases every weight towards zero. torch rounds to the nearest bf16, ties to even. We add
# $0\mathrm{x}7\mathrm{FFF}$ plus the lowest kept bit before dropping the low half, so a remainder above one half
# carries into the kept bits:

# %%
def float32_to_bf16(x: np.ndarray) -> np.ndarray:  # [...] float32 -> [...] uint16, round to nearest even
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)  # room for the carry
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


one_and_a_bit = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 0.9 * 2**-7], np.float32)  # tie, tie, above half
[hex(b) for b in float32_to_bf16(one_and_a_bit)], [hex(b) for b in (one_and_a_bit.view(np.uint32) >> 16)]

# %% [markdown]
# The first two are exact ties (bit 15 set, the rest zero): they go to the even neighbour, 0x3F80 and 0x3F82. The
# third is above one half and rounds up to 0x3F81, where truncation gives 0x3F80. (This sketch ignores NaN, whose
# mantissa could carry into the exponent. `tinyqwen.bf16.float32_to_bf16` handles it.) On a whole matrix,
# rounding halves the worst-case error of truncation and removes its bias. We measure how each weight's *magnitude*
# changes, relative to its size:

# %%
w = layer["gate"]
w = w[w != 0]  # relative errors of nonzero weights
rounded, truncated = (bf16_to_float32(b) for b in (float32_to_bf16(w), (w.view(np.uint32) >> 16).astype(np.uint16)))
rel = {name: np.abs(a) / np.abs(w) - 1 for name, a in (("round to nearest", rounded), ("truncate", truncated))}
{name: f"max {np.abs(r).max():.2e}, mean {r.mean():+.1e}" for name, r in rel.items()}

# %% [markdown]
# The relative error is at most $2^{-8} \approx 0.0039$ when rounding and $2^{-7}$ when truncating. Truncation never
# rounds up, so it shrinks the weights, by about 0.3 % on average; rounding is unbiased. The checkpoints are already bf16, so at inference time we only ever *widen*, which
# is exact: a bf16 model computed in float32 gives the same logits whether the weights were widened once at load time
# or on the fly.
#
# ## 4. A GEMV kernel that reads bf16
#
# NumPy cannot multiply a uint16 bit pattern by a float. Widening the whole matrix first would write and re-read
# 4 bytes per weight, worse than storing float32 in the first place. We need a loop that reads 2 bytes per weight and
# widens it *inside* the computation. A Python loop over 156 million weights would take a minute. Numba compiles a
# Python function with loops over NumPy arrays into machine code the first time it is called.
#
# The math is a dot product per output row:
#
# $$y_o = \sum_{i} W_{o,i}\, x_i, \qquad o = 0 \ldots m-1.$$
#
# First, the plain loop, compiled but single-threaded. Numba cannot reinterpret the bits of a single scalar, so each
# row is widened into a small scratch buffer that we *view* as float32, exactly as `bf16_to_float32` does:

# %%
from numba import njit, prange


@njit(cache=True)
def gemv_bf16_serial(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # [m, n] uint16, [n] float32 -> [m] float32
    m, n = w.shape
    y = np.empty(m, np.float32)
    wide = np.empty(n, np.uint32)
    row = wide.view(np.float32)  # the same 4n bytes, read as float32
    for o in range(m):
        for i in range(n):
            wide[i] = np.uint32(w[o, i]) << 16
        acc = np.float32(0.0)
        for i in range(n):
            acc += row[i] * x[i]
        y[o] = acc
    return y

# %% [markdown]
# The output rows are independent, so they can be computed in parallel. `prange` tells Numba to split a loop over
# the CPU's threads. We split by *blocks* of 64 rows, so each thread allocates its scratch buffer once per block
# instead of once per row. `fastmath=True` lets the compiler reorder the additions of the dot product, so that it can
# add 8 or 16 products at once with SIMD instructions. The result then differs from a strict left-to-right sum in
# the last bits, which is why every check below uses a tolerance.

# %%
@njit(parallel=True, fastmath=True, cache=True)
def gemv_bf16(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # [m, n] uint16, [n] float32 -> [m] float32
    m, n = w.shape
    y = np.empty(m, np.float32)
    for block in prange((m + 63) // 64):
        wide = np.empty(n, np.uint32)  # one scratch row per block, in this thread's cache
        row = wide.view(np.float32)
        for o in range(block * 64, min(m, block * 64 + 64)):
            for i in range(n):
                wide[i] = np.uint32(w[o, i]) << 16
            acc = np.float32(0.0)
            for i in range(n):
                acc += row[i] * x[i]
            y[o] = acc
    return y

# %% [markdown]
# The first call compiles (`cache=True` stores the machine code on disk, so a later run skips most of it). We time
# that separately: compile time must never hide inside a tokens-per-second figure.

# %%
w_small = float32_to_bf16(layer["q"][:64])  # [64, 1024] uint16
x_vec = rng.standard_normal(H, dtype=np.float32)
for kernel in (gemv_bf16_serial, gemv_bf16):
    start = time.perf_counter()
    kernel(w_small, x_vec)
    print(f"{kernel.__name__}: first call (compile or load from cache) {time.perf_counter() - start:.2f} s")

# %% [markdown]
# A shape check, and a check against NumPy on the widened matrix. The reference sums in float64; our float32 sums
# of 1,024 products of size ~0.05 carry rounding errors of about $10^{-6}$, so $|\Delta| \le 10^{-5}$ is the bound:

# %%
w_q = float32_to_bf16(layer["q"])  # [2048, 1024] uint16
want = bf16_to_float32(w_q).astype(np.float64) @ x_vec
for kernel in (gemv_bf16_serial, gemv_bf16):
    got = kernel(w_q, x_vec)
    assert got.shape == (Q * D,) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5, kernel.__name__
    print(f"{kernel.__name__}: {list(got.shape)} float32, max |Δ| = {np.abs(got - want).max():.1e} vs NumPy")

# %% [markdown]
# ## 5. Measuring its bandwidth
#
# Now the head, stored as bf16: 311 MB instead of 622 MB. We build it from the float32 head with our rounding:

# %%
lm_head_bf16 = float32_to_bf16(lm_head)  # [151936, 1024] uint16
x_head = x.reshape(H)
assert np.allclose(gemv_bf16(lm_head_bf16, x_head), mlp.linear(x_head, bf16_to_float32(lm_head_bf16)), atol=1e-4)
gemv_ms = {"NumPy float32 (BLAS)": best_ms(lambda: lm_head @ x_head, 3),
           "Numba bf16, 1 thread": best_ms(lambda: gemv_bf16_serial(lm_head_bf16, x_head), 2),
           "Numba bf16, parallel": best_ms(lambda: gemv_bf16(lm_head_bf16, x_head), 3)}  # fmt: skip
nbytes = {"NumPy float32 (BLAS)": lm_head.nbytes} | dict.fromkeys(list(gemv_ms)[1:], lm_head_bf16.nbytes)

# %%
fig, (t_ax, b_ax) = plt.subplots(1, 2, figsize=(11, 2.6), sharey=True)
t_ax.barh(list(gemv_ms), list(gemv_ms.values()), color=["tab:red", "tab:olive", "tab:green"])
b_ax.barh(list(gemv_ms), [nbytes[k] / (ms / 1e3) / 2**30 for k, ms in gemv_ms.items()],
          color=["tab:red", "tab:olive", "tab:green"])  # fmt: skip
t_ax.invert_yaxis()
t_ax.set(xlabel="milliseconds", title="lm_head GEMV, [151936, 1024] × [1024]")
b_ax.set(xlabel="GiB/s of weights read", title="Bandwidth reached")
plt.show()
{k: f"{ms:.1f} ms, {nbytes[k] / (ms / 1e3) / 2**30:.1f} GiB/s" for k, ms in gemv_ms.items()}

# %% [markdown]
# When the parallel kernel streams bf16 at about the bandwidth BLAS reaches in float32, it finishes in about half the
# time, because it reads half the bytes. (On a busy shared machine the bars jump around; compare them within one run.)
# Measured earlier on a 2-core AMD host: 27.8 GiB/s and 10.4 ms for this kernel, against 22.8 ms for
# NumPy's float32 GEMV.
#
# The roofline also tells us what is left after the GEMVs are fast: everything in between. A parallel Numba call
# costs about 1.6 µs to start its threads, and a decode step of 0.6B calls ~200 kernels, so fusing small operations
# (RMSNorm, RoPE, SiLU·mul) into fewer calls matters. `backends/` does exactly this, and keeps the weights bf16 from the
# file to the kernel.
#
# ## 6. Against the peers: a stored benchmark
#
# A real benchmark loads a whole Qwen3-0.6B-shaped checkpoint into every engine and takes minutes, so it is not run
# here. It was run once on a quiet machine with `tinyqwen bench --json` (each engine in its own process, 2 threads,
# greedy, the same random 512-token prompt, then 128 new tokens; the peers from `../shared/peers/setup`) and stored
# next to this notebook with the machine, the date and the command:

# %%
bench = json.loads((REPO / "notebooks" / "data" / "bench-qwen3-0.6b.json").read_text())
machine = bench["machine"]
print(f"{bench['date']} · {machine['cpu']} · {bench['threads']} threads · load average "
      f"{machine['load_average_before']:.2f} before, {machine['load_average_after']:.2f} after")  # fmt: skip
print(f"$ {bench['command']}")
results = [r for r in bench["results"] if r["status"] == "ok"]
for r in results:
    print(f"{r['engine']:<22} prefill {r['prefill_tok_s']:6.1f} tok/s   decode {r['decode_tok_s']:5.2f} tok/s   "
          f"peak RSS {r['peak_rss_mb'] / 1000:4.2f} GB")  # fmt: skip

# %% [markdown]
# Speeds on a shared machine swing by 30–50 % between runs, so the chart shows each engine as a ratio to llama.cpp
# bf16 *from the same run*, the comparison the targets are written in:

# %%
base = next(r for r in results if r["engine"] == "llama.cpp-bf16")
fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 + 0.45 * len(results)), sharey=True)
titles = (f"prefill, {bench['prompt_tokens']}-token prompt", f"decode, {bench['new_tokens']} new tokens")
for ax, key, label, title in zip(axes, ("prefill_tok_s", "decode_tok_s"), ("prefill", "decode"), titles, strict=True):
    ratios = [r[key] / base[key] for r in results]
    ax.barh([r["engine"] for r in results], ratios,
            color=["tab:green" if r["engine"].startswith("tinyqwen") else "tab:gray" for r in results])  # fmt: skip
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set(xlabel=f"{label} speed ÷ llama.cpp bf16 (same run)", title=title)
axes[0].invert_yaxis()
plt.show()

# %% [markdown]
# Three things to read in it.
#
# **Decode** is the race for memory bandwidth of section 2. The engines that keep the weights in bf16 (tinyqwen-numba,
# llama.cpp bf16, transformers bf16) read half the bytes of the float32 ones, and q8_0 reads a quarter fewer again.
# What separates the bf16 engines is how close each step gets to the bandwidth of one big GEMV: every kernel launch,
# every small matrix whose stream must ramp up, every pass over activations costs a little. The numbers below are
# the stored run's, computed here, not typed in:

# %%
by = {r["engine"]: r for r in results}
gemv = bench["gemv"]["gb_s"]
for name in ("tinyqwen-numpy", "tinyqwen-numba", "llama.cpp-bf16", "transformers-fp32"):
    if name in by:
        r = by[name]
        print(f"{name:<18} decode reads {r['decode_mb_per_token']:6.0f} MB/token at {r['decode_gb_s']:5.1f} GB/s "
              f"({r['decode_gb_s'] / gemv:4.0%} of NumPy's fp32 GEMV, {gemv:.1f} GB/s)")  # fmt: skip

# %% [markdown]
# **Prefill** is compute-bound: 512 tokens × ~0.9 GFLOP each. In float32, two cores top out near their FMA peak, and
# NumPy's, PyTorch's and our own float32 GEMMs all land within a factor of 1.3 of each other. The big step is
# `matmul_precision="medium"` (`tinyqwen-numba-medium`): the activations entering each weight product are rounded to
# bf16, and the products run on the CPU's bf16 matrix units through oneDNN (AMX here), as transformers' bf16 model
# does. It costs about three significant digits in the activations (the tests bound the logits' change), which is
# why it is a choice and not the default.
#
# **Memory**: the numba engines read the bf16 weights once into process memory (never a float32 copy), so their peak
# RSS is the checkpoint plus the KV cache and the runtime; the float32 engines hold twice the weights. The numba
# engines keep their KV cache in bf16, as llama.cpp keeps its in float16: two bytes a value, half of what decode
# attention reads from a float32 cache.
#
# ### What the last fifth of the speed took
#
# A GEMV kernel that streams at the bandwidth of the big lm_head product is not yet a fast decode step. Four things
# each bought 5–25 % of the step on this 2-core machine; all four are about *memory*, not arithmetic, and none
# changes a single result. Each figure below was measured in one process, before against after:
#
# 1. **Address translation.** Every load goes through a virtual-to-physical lookup, cached in the TLB. A memory-mapped
#    file comes in 4 KiB pages; memory NumPy allocates is backed by 2 MiB "huge" pages (it asks the kernel for them
#    for big arrays): 512 times fewer lookups for the same bytes. Reading the weights into process memory
#    (`SafetensorsFile.read`, one copy, never two) took the lm_head GEMV from ~15 ms to ~11 ms.
# 2. **Prefetching.** The CPU's hardware prefetcher guesses the next cache lines of a stream, but only so far ahead.
#    Decode attention spends ~100 cycles on each cached key row before it touches the next, and the prefetcher fell
#    behind: asking for the row 16 positions ahead (`llvm.prefetch`, a hint that never faults) took a bf16 layer of
#    520 positions from ~320 µs to ~210 µs on one thread. For the GEMVs, asking for the *next* weight row while
#    summing the current one took a step's GEMVs from 47.4 to 44.8 ms; two or four rows ahead were slower, and so
#    were rows longer than 2 KiB (on the lm_head's shape: 1,024-wide bf16 rows 27.3 → 32.9 GB/s, 2,048-wide ones
#    27.4 → 25.9), where the hardware prefetcher already runs far enough ahead inside the row. So only short rows
#    are prefetched: the right distance is a measurement, not a principle.
# 3. **The compiler's cache.** `@njit(cache=True)` stores machine code so later processes skip compiling. A
#    `parallel=True` kernel whose own body held the loops ran ~25 % slower loaded from that cache than freshly
#    compiled (the gate/up GEMVs: 17–19 ms per step instead of 13–15; numba issue #8085). With the loops in a
#    small serial kernel that the parallel one calls per chunk of rows, the cached code is as fast as a fresh one.
#    The cache has a trap too: Numba checks only the file a kernel is written in. A kernel compiles the functions
#    it calls from other files *into* its own machine code, so after an edit to a called file alone (a row dot
#    in `avx2.py`, called by `quant.py`'s GEMV) the saved GEMV kept the old row dot, and a faster kernel seemed to
#    change nothing. `backends/numba/kernel_cache.py` stamps every kernel of the package with a digest of all its
#    files, so any edit there recompiles them all once.
# 4. **A smaller KV cache** (above): bf16 instead of float32 halves what attention reads per step.
#
# The lesson generalises: once the arithmetic is vectorised, the remaining time of a memory-bound program hides in
# *how* the bytes arrive — page size, prefetch distance, which machine code runs — and only a measurement finds it.

# %% [markdown]
# ## 7. Checkpoint: our kernel in the real model
#
# Speed is worth nothing if the answer changes. The `dense-untied-bf16-sharded` fixture stores its weights as bf16,
# exactly as the official checkpoints do. We give the model a `linear` that multiplies by those bf16 bit patterns with
# our `gemv_bf16`, one vector at a time, so every projection and the head run on our kernel. tinyqwen hands the
# backend float32 weights; they hold bf16 values exactly, so `float32_to_bf16` recovers the stored bits
# without rounding.

# %%
import dataclasses  # noqa: E402

from tinyqwen.model import load_model  # noqa: E402
from tinyqwen.verify import tolerance  # noqa: E402

bits_of = {}  # id(weight) -> its bf16 bits, computed once per matrix


def linear_bf16(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [..., n], [m, n] -> [..., m]
    bits = bits_of.setdefault(id(w), (w, float32_to_bf16(w)))[1]  # keep w alive: its id stays unique
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    return np.stack([gemv_bf16(bits, r) for r in rows]).reshape(*x.shape[:-1], w.shape[0])


def swiglu_bf16(x, w_gate, w_up, w_down):  # [..., d] -> [..., d], SwiGLU on the same kernel
    return linear_bf16(mlp.silu(linear_bf16(x, w_gate)) * linear_bf16(x, w_up), w_down)

# %% [markdown]
# The fixture's bf16 weights are exact, so the only differences from transformers' float32 computation are the order
# of additions, of size $10^{-6}$ relative. The bound is tinyqwen's definition of "equal to transformers":
# $|\Delta| \le 10^{-5} \times \max(1, \max|\text{logit}|)$.

# %%
fixture = REPO / "tests" / "fixtures" / "dense-untied-bf16-sharded"
model = load_model(fixture)  # the numpy backend, with two kernels swapped for ours:
model.backend = dataclasses.replace(model.backend, name="numpy + gemv_bf16", linear=linear_bf16, swiglu=swiglu_bf16)
ref = np.load(fixture / "reference.npz")
delta = float(np.abs(model(ref["input_ids"]) - ref["logits"]).max())
assert delta <= tolerance(ref["logits"]), delta
print(f"{fixture.name}: every matrix product on gemv_bf16 → logits {list(ref['logits'].shape)}, "
      f"max |Δ| = {delta:.1e} ≤ {tolerance(ref['logits']):.1e} against transformers")

# %% [markdown]
# ## Summary
#
# * Decoding multiplies every weight by one vector: a GEMV per matrix. It reads each weight once and does two
#   flops with it, so its speed is set by **memory bandwidth**, not by arithmetic.
# * The roofline: tok/s ≤ bandwidth ÷ bytes of weights read per token. For Qwen3-0.6B that is 596 M weights per
#   token, a quarter of them in the output head.
# * bfloat16 halves the bytes and doubles the ceiling. Widening it is exact (shift left by 16, reinterpret);
#   narrowing rounds to nearest even.
# * A Numba kernel reads the bf16 bit patterns, widens each row in a scratch buffer and sums in float32, in parallel
#   over blocks of rows. It streams bf16 at about the bandwidth BLAS reaches in float32, so it takes half the time.
# * Compile time is measured apart from speed; speed is compared with peers *in the same run*.
#
# ## Exercises
#
# Fill in `exercises/ch10_numba.py` (`bf16_to_float32`, `float32_to_bf16`, `weights_per_token`, `gemv_bf16`; each
# docstring has a worked example). Then run
#
# ```bash
# pytest exercises/test_ch10_numba.py
# ```
#
# The last checkpoint runs the bf16 fixture with every matrix product on *your* `gemv_bf16` and checks its logits
# against transformers'.
#
# ### Beyond fill-in-the-function: resource accounting
#
# Section 2's roofline, for every model of the family: `exercises/ch16_resource_accounting.py` asks for the total
# and *active* parameters, the FLOPs of one token at a given context, the KV cache per token and at 32K tokens, and
# the bandwidth-bound decode speed of two stated machines (an H100 at 3,350 GB/s, a DDR5 laptop at 89.6 GB/s) for
# Qwen3-0.6B, 4B, 8B and 30B-A3B. `pytest exercises/test_ch16_resource_accounting.py` grades each number against a
# derivation by hand from the config files (written out in the test), and names the classic slip when yours
# matches one (a tied head counted twice, one flop per multiply-add, query heads in the KV cache, GiB for GB).
