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
# # Chapter 0 · A tour of Qwen3
#
# This book builds Qwen3, a family of open-weight language models released by Alibaba's Qwen team in April 2025,
# from scratch in NumPy. There are no deep-learning frameworks: every matrix product, every normalisation and every
# rotation is a few lines of code that you can read and change. Each chapter adds one piece and checks it against
# the official implementation, Hugging Face `transformers` and the official tokenizer. At the end, *your* code runs
# the whole model, from text to tokens to logits and back to text.
#
# This tour answers three questions before we start:
#
# 1. **What is Qwen3?** A family of decoder-only transformers: six dense models (0.6B to 32B parameters) and two
#    mixture-of-experts models (30B-A3B and 235B-A22B). We read their real `config.json` files and count their
#    parameters.
# 2. **What will we build, and in which order?** The plan of the book.
# 3. **What does "equal to the official implementation" mean, exactly?** How the reference files are made, and
#    which tolerances are used and why.

# %%
import dataclasses
import json

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)

import tinyqwen  # noqa: E402
from tinyqwen.config import (  # noqa: E402
    CONFIG_DIR,
    KERAS_HUB_PARAMETER_COUNTS,
    OFFICIAL_CONFIG_FILES,
    PUBLISHED_CHANGES,
    config_from_dict,
    published_configs,
)
from tinyqwen.config import count_parameters  # noqa: E402
from tinyqwen.norm import rms_norm  # noqa: E402
from tinyqwen.verify import RTOL, tolerance  # noqa: E402

# %% [markdown]
# ## One forward pass, and where each piece is built
#
# A Qwen3 model turns a list of token ids into one vector of scores (*logits*) per position, with one score for each of
# the 151,936 vocabulary entries. The highest score is the model's guess for the next token. In between is a stack of
# identical *decoder layers*. Each layer adds two things to a running vector per token, the *residual stream*:
# attention (tokens look at earlier tokens) and an MLP (each token is transformed on its own). The picture shows
# the path and the chapter in which you build each box.

# %%
def box(ax, y, text, color, h=0.055):
    ax.add_patch(plt.Rectangle((0.22, y - h / 2), 0.56, h, fc=color, ec="dimgray", lw=1))
    ax.text(0.5, y, text, ha="center", va="center", fontsize=9.5)


def arrow(ax, xy_from, xy_to):
    ax.annotate("", xy_to, xy_from, arrowprops=dict(arrowstyle="->", color="dimgray"))


# %%
fig, ax = plt.subplots(figsize=(8, 9.5))
steps = [  # (y, text, colour): text side orange, the network blue, output side green
    (0.97, "messages  →  chat template (ch. 9)", "#fde0c5"),
    (0.89, "text  →  token ids: byte-level BPE (ch. 1)", "#fde0c5"),
    (0.81, "embedding lookup: ids → vectors (ch. 3)", "#cfe3f7"),
    (0.70, "RMSNorm (ch. 3)", "#cfe3f7"),
    (0.62, "attention: QK-Norm, RoPE/YaRN (ch. 4),\ngrouped-query heads, causal mask (ch. 5)", "#cfe3f7"),
    (0.54, "+", "#eeeeee"),
    (0.46, "RMSNorm (ch. 3)", "#cfe3f7"),
    (0.38, "SwiGLU MLP (ch. 6) or mixture of experts (ch. 7)", "#cfe3f7"),
    (0.30, "+", "#eeeeee"),
    (0.20, "final RMSNorm, lm_head → logits (ch. 6)", "#cfe3f7"),
    (0.12, "next token: greedy / sampling, KV cache (ch. 8)", "#d9f2d9"),
    (0.04, "ids → text (ch. 1); thinking, tool calls (ch. 9)", "#d9f2d9"),
]
for y, text, color in steps:
    box(ax, y, text, color, h=0.07 if "\n" in text else 0.055)
for (y0, t0, _), (y1, t1, _) in zip(steps, steps[1:], strict=False):
    arrow(ax, (0.5, y0 - (0.035 if "\n" in t0 else 0.028)), (0.5, y1 + (0.035 if "\n" in t1 else 0.028)))
for top, plus in [(0.755, 0.54), (0.505, 0.30)]:  # the residual stream skips around each half of the layer
    ax.plot([0.5, 0.86, 0.86], [top, top, plus], color="C0", lw=1.2)
    arrow(ax, (0.86, plus), (0.78, plus))
ax.text(0.87, 0.64, "residual", rotation=90, color="C0", fontsize=9, va="center")
ax.add_patch(plt.Rectangle((0.06, 0.26), 0.88, 0.505, fill=False, ls="--", ec="C0"))
ax.text(0.08, 0.75, "× num_hidden_layers (28 … 94)", ha="left", va="top", color="C0", fontsize=9)
ax.text(0.1, 0.5, "weights: safetensors + config.json (ch. 2)", rotation=90, ha="center", va="center",
        fontsize=9, color="dimgray")  # fmt: skip
ax.set_xlim(0, 1)
ax.set_ylim(0, 1)
ax.axis("off")
ax.set_title("Qwen3, from messages to the next token (and the chapter that builds each piece)")
plt.show()

# %% [markdown]
# ## The family, from real `config.json` files
#
# Every Qwen3 checkpoint comes with a `config.json` that fixes its shape. tinyqwen ships copies of four of them in
# `tinyqwen/data/configs/`, and each file has a known provenance (see `tinyqwen/data/README.md`):
#
# - `Qwen3-0.6B.json`, `Qwen3-4B.json`, `Qwen3-8B.json`: **byte-identical copies of the official files**, checked by
#   sha256 and git blob hash against pins of the Hugging Face Hub files.
# - `Qwen3-30B-A3B.json`: written from the **published values**. It has the official key set, but its bytes are
#   **not** verified against the Hub.

# %%
raw = json.loads((CONFIG_DIR / "Qwen3-0.6B.json").read_text())
config_from_dict(raw, source="Qwen3-0.6B.json")

# %% [markdown]
# The other four members have no verified file in this repository, so we write them as the published values,
# changed from their nearest sibling's file (`tinyqwen.config.PUBLISHED_CHANGES`). **These are not byte-verified.** The layer, head and expert counts
# are in the Qwen3 model cards and technical report. The hidden and FFN sizes match third-party training configs.
# We check them below: they give exactly the parameter counts that an independent conversion lists.

# %%
PUBLISHED_CHANGES  # name: (the sibling whose file we start from, the fields that differ)

# %% [markdown]
# `published_configs()` reads the four files and writes these four changes into copies of their siblings. It gives
# all eight configs, the dense models by size and then the two mixtures of experts:

# %%
configs = published_configs()
ORDER = list(configs)
ORDER

# %% [markdown]
# Here is the family as a table, computed from those configs. "kv" is the number of key/value heads: several query
# heads share one ([chapter 5](05-attention.ipynb)). `head_dim` is its own number, not `hidden / heads` (0.6B has
# 16 × 128 = 2048 ≠ 1024). "context" is `max_position_embeddings`.

# %%
def provenance(name: str) -> str:
    if name in OFFICIAL_CONFIG_FILES:
        return "official file"
    return "published values (not verified)" if name in PUBLISHED_CHANGES else "published values, file not verified"


def row(name: str) -> str:
    c = configs[name]
    mlp = (f"{c.num_experts} experts × {c.moe_intermediate_size}, top-{c.num_experts_per_tok}" if c.is_moe
           else f"{c.intermediate_size}")  # fmt: skip
    return (f"| {name} | {count_parameters(c) / 1e9:.2f}B | {c.num_hidden_layers} | {c.hidden_size} | "
            f"{c.num_attention_heads} / {c.num_key_value_heads} | {c.head_dim} | {mlp} | "
            f"{c.max_position_embeddings:,} | {'yes' if c.tie_word_embeddings else 'no'} | {provenance(name)} |")  # fmt: skip


header = ("| model | parameters | layers | hidden | heads q / kv | head_dim | MLP (FFN size) | context | tied | source |\n"
          "|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
display(Markdown("\n".join([header] + [row(n) for n in ORDER])))

# %% [markdown]
# A few things stand out:
#
# - The four files share the vocabulary (151,936 rows), `head_dim` 128, RoPE base $\theta = 10^6$, and RMSNorm
#   $\epsilon = 10^{-6}$; the four unverified members inherit these values from their siblings. The models differ
#   in width, depth and head count.
# - Grouped-query attention everywhere: 8 key/value heads (4 for the MoE models), whatever the number of query heads.
# - The three smallest models **tie** their input embedding and output head (one shared matrix). The larger ones
#   learn two separate matrices.
# - The context (`max_position_embeddings`) of the four files is 40,960 positions. The model cards give 32,768 as the native context, and up
#   to 131,072 with YaRN scaling, for 4B and larger ([chapter 4](04-rope-yarn.ipynb)).
#
# ## Counting parameters by hand
#
# `count_parameters` sums the sizes of the tensors an official checkpoint of that config holds. Let's derive the
# same number from the architecture, with $V$ the vocabulary, $h$ the hidden size, $H_q$ and $H_{kv}$ the head
# counts, $d$ the head dimension, $f$ the FFN size, $E$ experts of FFN size $f_e$, and $L$ layers:
#
# $$N = \underbrace{Vh}_{\text{embedding}} + \underbrace{Vh\,[\text{untied}]}_{\text{lm\_head}} + h
#   + L\Big(\underbrace{2hH_qd + 2hH_{kv}d + 2d}_{\text{attention + QK-Norm}} + \underbrace{2h}_{\text{norms}}
#   + \underbrace{3hf}_{\text{dense MLP}} \;\text{or}\; \underbrace{E\cdot 3hf_e + Eh}_{\text{experts + router}}\Big)$$

# %%
def parameters_by_hand(c) -> dict[str, int]:
    V, h, d, L = c.vocab_size, c.hidden_size, c.head_dim, c.num_hidden_layers
    attention = 2 * h * c.num_attention_heads * d + 2 * h * c.num_key_value_heads * d + 2 * d
    if c.is_moe:
        mlp = c.num_experts * 3 * h * c.moe_intermediate_size + c.num_experts * h
    else:
        mlp = 3 * h * c.intermediate_size
    return {
        "embedding + head": V * h * (1 if c.tie_word_embeddings else 2),
        "attention": L * attention,
        "MLP / experts": L * mlp,
        "norms": L * 2 * h + h,
    }


for name in ORDER:
    assert sum(parameters_by_hand(configs[name]).values()) == count_parameters(configs[name]), name
parameters_by_hand(configs["Qwen3-0.6B"])

# %% [markdown]
# The formula and `count_parameters` agree for all eight (this formula assumes every layer of a MoE model is a MoE
# layer, which is true for both official MoE configs: `decoder_sparse_step` 1, no `mlp_only_layers`).
#
# An independent check: keras-hub converted the official weights and lists the parameter count of each of its Qwen3
# presets (`keras_hub/src/models/qwen3/qwen3_presets.py` and `qwen3_moe/qwen3_moe_presets.py`). Our counts equal
# theirs (`tinyqwen.config.KERAS_HUB_PARAMETER_COUNTS`) to the last parameter, including those of the four models
# whose config we only wrote from published values. That is good evidence those values are right (and
# `tests/test_published_configs.py` checks it on every test run, along with the real files where they are at hand):

# %%
assert all(count_parameters(configs[n]) == KERAS_HUB_PARAMETER_COUNTS[n] for n in ORDER)
print("count_parameters equals keras-hub's published count for all", len(ORDER), "models")

# %% [markdown]
# ### Active parameters of the MoE models
#
# A mixture-of-experts layer has $E = 128$ expert MLPs but sends each token through only the top $k = 8$
# ([chapter 7](07-mixture-of-experts.ipynb)). So the work per token is set by the **active** parameters: everything,
# minus the $E - k$ experts a token does not use in each layer. That is where the names come from: 30B total, **A**3B
# active.

# %%
def active_parameters(c) -> int:
    unused = (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
    return count_parameters(c) - (c.num_hidden_layers * unused if c.is_moe else 0)


{n: f"{count_parameters(configs[n]) / 1e9:.1f}B total, {active_parameters(configs[n]) / 1e9:.2f}B active"
 for n in ["Qwen3-30B-A3B", "Qwen3-235B-A22B"]}  # fmt: skip

# %% [markdown]
# ## Parameters and memory
#
# Every parameter is a number stored in the checkpoint as **bfloat16** (2 bytes). Our NumPy model computes in
# **float32** (4 bytes), because NumPy has no bfloat16 arithmetic, so it needs twice the memory of the file
# ([chapter 2](02-loading-weights.ipynb) shows how bf16 becomes float32 exactly). Note the log scale: the family
# spans almost three orders of magnitude.

# %%
total = np.array([count_parameters(configs[n]) for n in ORDER]) / 1e9  # billions
active = np.array([active_parameters(configs[n]) for n in ORDER]) / 1e9
names, x = [n.removeprefix("Qwen3-") for n in ORDER], np.arange(len(ORDER))
ticks = [n.replace("-A", "\nA") for n in names]  # "30B\nA3B": the two long MoE names side by side would collide
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.bar(x - 0.2, total, 0.4, label="total")
ax.bar(x + 0.2, active, 0.4, label="active per token")
ax.set(yscale="log", ylabel="parameters (billions)", title="Parameters: total vs active")
ax.set_xticks(x, ticks)
ax.legend()
plt.show()

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.bar(x - 0.2, total * 2, 0.4, label="bfloat16 (the checkpoint)", color="C2")
ax.bar(x + 0.2, total * 4, 0.4, label="float32 (this book's NumPy model)", color="C3")
ax.axhline(16, ls="--", color="gray")
ax.text(-0.4, 18, "16 GB: a typical laptop", color="gray", fontsize=9)
ax.set(yscale="log", ylabel="weights in memory (GB)", title="Memory for the weights alone")
ax.set_xticks(x, ticks)
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# In float32, the 0.6B and 1.7B models fit on a 16 GB laptop. 4B needs 16.1 GB, just over the line (its 8 GB bf16
# file would fit; chapter 2 reads bf16), and 8B needs about 33 GB. The MoE models need memory for
# **all** their experts, even though each token uses only a few. That is the trade: MoE buys the compute of a
# small model with the memory of a big one.
#
# Where do the parameters sit? In the small models, a surprisingly large share is the vocabulary:

# %%
parts = {n: parameters_by_hand(configs[n]) for n in ORDER}
labels = list(parts[ORDER[0]])
fig, ax = plt.subplots(figsize=(10, 3.6))
left = np.zeros(len(ORDER))
for label in labels:
    share = np.array([parts[n][label] / sum(parts[n].values()) for n in ORDER])
    ax.barh(names, share, left=left, label=label)
    left += share
ax.invert_yaxis()
ax.set_xlabel("share of all parameters")
ax.set_xlim(0, 1)
ax.set_title("Where the parameters are")
ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
plt.show()

# %% [markdown]
# A quarter of Qwen3-0.6B is its embedding table (151,936 × 1,024), and that is *with* the output head sharing it. In
# the MoE models the experts are nearly everything. Attention is a modest share everywhere, largely because
# grouped-query attention keeps $k$ and $v$ small.
#
# ## The plan of the book
#
# | chapter | notebook | you build | checked against |
# |---|---|---|---|
# | 0 | [A tour of Qwen3](00-tour.ipynb) | — | this page: logits of every fixture |
# | 1 | [Tokenization](01-tokenization.ipynb) | byte-level BPE, added tokens, NFC, streaming decode | ids of the official `tokenizers` |
# | 2 | [Loading weights](02-loading-weights.ipynb) | a safetensors reader, bf16 → fp32, shards, `config.json` | the tensors `transformers` loads |
# | 3 | [Embeddings & RMSNorm](03-embeddings-rmsnorm.ipynb) | embedding lookup, RMSNorm in float32 | `transformers` on the fixtures |
# | 4 | [RoPE & YaRN](04-rope-yarn.ipynb) | rotary position embeddings, split-half layout, YaRN | `transformers`' RoPE tables |
# | 5 | [Attention](05-attention.ipynb) | causal mask, stable softmax, grouped-query attention, QK-Norm | `transformers` |
# | 6 | [The dense model](06-dense-model.ipynb) | SwiGLU, the decoder block, the whole dense model | logits of `transformers` |
# | 7 | [Mixture of experts](07-mixture-of-experts.ipynb) | router, top-k, renormalisation, load-balancing loss | router logits and aux loss of `transformers` |
# | 8 | [KV cache & generation](08-kv-cache-generation.ipynb) | prefill/decode with a cache, sampling, batching | greedy generations of `transformers` |
# | 9 | [Chat template & thinking](09-chat-template-thinking.ipynb) | the chat template as code, thinking mode, tool calls | the official Jinja template |
# | 10 | [Making it fast on the CPU](10-numba.ipynb) | a bf16 matrix–vector kernel in Numba, the roofline | logits of `transformers`; speed against llama.cpp |
# | 11 | [Making it fast on the GPU](11-cupy.ipynb) | CUDA kernels (RMSNorm, RoPE, GEMV) and a CuPy backend | logits of `transformers` |
# | 12 | [Serving](12-serving.ipynb) | an OpenAI-compatible client: streamed events, thinking split, tool calls | `transformers` and the official template |
# | 13 | [Training a tiny Qwen3-MoE](13-training.ipynb) | the backward pass by hand, AdamW, the aux loss's gradient | finite differences and torch's autograd |
# | 14 | [Quantization](14-quantization.ipynb) | Q8_0 and Q4_K by hand, int8 dot products, KL divergence | llama.cpp's GGUF files |
# | 15–18 | capstones and problems (`exercises/`) | Qwen3 from the math alone (parts II–III); resource accounting for every official config (IV); a QK-Norm ablation you run and plot (V); a tokenizer read from its files (I) | transformers' stored outputs, the official ids, arithmetic from the configs |
#
# Every chapter follows the same path. It starts with why the piece exists and a picture, then the math, a small loop
# version, and the vectorised NumPy version. It ends with a **checkpoint** against the official implementation.
# Then you write the piece yourself in `exercises/chNN_*.py`, and `pytest exercises/` grades it. The last
# checkpoint of every chapter puts *your* functions into the real model and compares its logits with `transformers`.
# By chapter 9, your own code runs all of Qwen3.
#
# ### The payoff
#
# The model checkpoints are cumulative: chapter 5's model already runs your loader, embedding, norms, RoPE, mask and
# attention, and the score table lists under each chapter which of your functions ran. After chapter 9 the whole
# pipeline is yours: tokenizer, kernels, KV cache, generation loop, chat template. Then run
# `tinyqwen chat --model Qwen/Qwen3-0.6B --kernels exercises` (get the model once, with a network:
# `pip install -e ".[hub]"` and `hf download Qwen/Qwen3-0.6B`): Qwen3-0.6B answers through your own code, and the
# command lists which of your functions it used. Offline, it runs a tiny random Qwen3 with the real tokenizer
# instead, and says so.
#
# ## How "equal to the official implementation" is checked
#
# Running `transformers` needs PyTorch, which this book never imports. So the official outputs are computed once
# and stored in the repository:
#
# 1. `tests/fixtures/make_fixtures.py` (which never imports tinyqwen) draws small random weights and writes them
#    exactly in the layout of the official Hub checkpoints: `config.json`, safetensors files, F32 and BF16, sharded
#    or not, tied or not. It loads them with `transformers` 5.23.0 (torch 2.13.0, float32, eager attention) and
#    fails if any tensor is missing, unexpected, or not equal to what was written.
# 2. It stores what `transformers` computes in each fixture's `reference.npz`: logits, hidden states per layer, the
#    RoPE frequencies, router logits and the aux loss for MoE. Greedy generations go in `generate.json`.
# 3. The default test run (`pytest`) compares tinyqwen with those files. No torch is needed.
# 4. CI also installs torch and `transformers` and runs `pytest -m crosscheck`. This recomputes every fixture
#    **live**, so the stored files can never drift from what `transformers` computes, and compares tinyqwen with
#    live `transformers` on fresh inputs too. Both use the bound explained below.
#
# The tokenizer is checked the same way, against the official `tokenizers` library and llama.cpp's independent test
# vectors. The chat template is checked against the official Jinja template. Here are the five fixtures:

# %%
for folder in sorted(p.parent for p in FIXTURES.glob("*/reference.npz")):
    c = tinyqwen.load_config(folder)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    kind = f"MoE, {c.num_experts} experts, top-{c.num_experts_per_tok}" if c.is_moe else "dense"
    print(f"{folder.name:27} {kind:26} layers {c.num_hidden_layers}  tied {c.tie_word_embeddings!s:5}  "
          f"yarn {c.rope_scaling is not None!s:5}  {len(files)} file(s)")  # fmt: skip

# %% [markdown]
# ### Why a tolerance, and which one
#
# tinyqwen and `transformers` both compute in float32, but not in the same order. A matrix product sums hundreds of
# products, and BLAS (NumPy) and PyTorch group and vectorise those sums differently. Float addition is not
# associative, so results differ in their last bits. Float32 keeps about 7 significant digits (machine epsilon
# $2^{-23} \approx 1.2 \times 10^{-7}$), so the rounding error grows with the size of the values: next to a logit of
# 20, the neighbouring float32 numbers are $20 \cdot 2^{-23} \approx 2.4 \times 10^{-6}$ away. The differences
# also depend on the CPU. PyTorch's kernels on Intel (AVX-512/AMX) and on AMD block their sums differently, so
# `transformers` itself, re-run on another machine, moves the stored logits by about $10^{-5}$. A stored reference
# can only be met with a tolerance that holds on every CPU, not to a few ulps.
#
# The project defines "equal" once, in `tinyqwen/verify.py`, relative to the size of what is compared:
#
# $$\max\,|\text{ours} - \text{theirs}| \;\le\; \text{RTOL} \cdot \max\big(1,\ \max|\text{theirs}|\big),
#   \qquad \text{RTOL} = 10^{-5}$$
#
# That is one part in 100,000 of the largest value. For logits of magnitude ~6 to ~20 it allows $6 \times 10^{-5}$
# to $2 \times 10^{-4}$, so about 1e-4 in round numbers. Why $10^{-5}$? Here is what `verify.py` records from
# measurements on every fixture, all relative to the values' size:
#
# | what | relative max \|Δ\| |
# |---|---|
# | tinyqwen vs `transformers`' stored outputs | at most $1.7 \times 10^{-6}$ |
# | `transformers` re-run with other CPU kernels vs its stored outputs | at most $1.9 \times 10^{-6}$ |
# | **the bound** | $10^{-5}$ |
# | bug: RMSNorm $\epsilon = 10^{-5}$ (Llama's) instead of Qwen3's $10^{-6}$ | $1.9$ to $2.9 \times 10^{-5}$ |
# | bug: wrong RoPE layout, a missing norm, a wrong expert | $10^{-2}$ to $1$ |
#
# So the bound sits about five times above float32 noise on any CPU, and below the subtlest real bug we know of.
# The tests (`tests/test_model.py`, and live in CI `tests/test_crosscheck.py`) and `tinyqwen verify` all use it, and
# so does the exercises' final checkpoint (`expect_logits`). Smaller pieces are compared at their own scale (e.g.
# $10^{-5}$ on values of size ~1), and the exercises use a plain $10^{-4}$ for other logit-sized values.
#
# Let's see this on a fixture. We compute the logits of `dense-tied` four ways: with tinyqwen as it is, and with
# three bugs planted in it. The first is LayerNorm instead of RMSNorm (it subtracts the mean). The second is RoPE
# with interleaved instead of split-half pairs. The third is the subtle one, $\epsilon = 10^{-5}$. We swap the bugs in
# through the model's `backend`, which is also how the exercises run your code inside the model.

# %%
def layer_norm(x, weight, eps):  # the bug: subtracts the mean (RMSNorm does not)
    x = x.astype(np.float32)
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def interleaved_rope(x, cos, sin):  # the bug: pairs (0,1), (2,3), ... instead of (i, i + d/2)
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]  # [B, 1, T, d/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * c - odd * s, odd * c + even * s
    return out


def eps_1e5(x, weight, eps):  # the bug: Llama's epsilon
    return rms_norm(x, weight, 1e-5)


reference = np.load(FIXTURES / "dense-tied" / "reference.npz")
errors = {}
for label, bug in [("tinyqwen", {}), ("bug: LayerNorm", dict(rms_norm=layer_norm)),
                   ("bug: interleaved RoPE", dict(apply_rope=interleaved_rope)),
                   ("bug: eps 1e-5", dict(rms_norm=eps_1e5))]:  # fmt: skip
    model = tinyqwen.load_model(FIXTURES / "dense-tied")
    model.backend = dataclasses.replace(model.backend, **bug)
    errors[label] = np.abs(model(reference["input_ids"]) - reference["logits"]).ravel()  # [2·12·512]
{k: f"max |Δ| = {v.max():.2g}" for k, v in errors.items()}

# %%
fig, ax = plt.subplots(figsize=(9, 3.5))
bins = np.logspace(-10, 2, 73)
for label, err in errors.items():
    ax.hist(np.maximum(err, 1e-10), bins=bins, alpha=0.6, label=label)
bound = tolerance(reference["logits"])  # 1e-5 · 17.07
ax.axvline(bound, color="k", ls="--")
ax.text(bound * 1.2, ax.get_ylim()[1] * 0.9, f"bound {bound:.1e}", fontsize=9)
ax.axvline(20 * 2**-23, color="gray", ls=":")
ax.text(1.5e-7, ax.get_ylim()[1] * 0.85, "float32 spacing\nat |logit| = 20 →", fontsize=8, color="gray", ha="right",
        bbox=dict(fc="white", ec="none"))  # fmt: skip
ax.set_xscale("log")
ax.set_xlabel("|tinyqwen logit − transformers logit|   (6,144 logits; exact zeros drawn at 1e-10)")
ax.set_ylabel("count")
ax.set_title("Float noise vs real bugs, against transformers' stored logits")
ax.legend(fontsize=8, loc="upper right")
plt.show()

# %% [markdown]
# The correct model's differences pile up around the float32 spacing of large logits, and about 500 of them are
# exactly zero. The two gross bugs sit about six orders of magnitude higher. The $\epsilon$ bug is the instructive one:
# most of its differences are *below* the bound, and only the largest ones cross it. That is why we always compare
# the **maximum** difference, never an average.
#
# One more detail is worth a second look: 1,024 logits of the RoPE bug are *right*. They are exactly those of
# position 0 (2 sequences × 512 logits), where the rotation angle is 0 and any pairing gives the same result. A test
# that checked only the first token would miss this bug. The exercises' failure messages point it out ("position 0
# is right but later positions are not").
#
# If an official checkpoint is on this machine (`$TINYQWEN_MODEL`, or Qwen/Qwen3-0.6B in the Hugging Face cache),
# we can also check that its weight files hold exactly the tensors `count_parameters` predicts. We read only the
# safetensors headers, not the weights:

# %%
from tinyqwen.hub import official_checkpoint  # noqa: E402
from tinyqwen.checkpoint import Checkpoint  # noqa: E402

checkpoint = official_checkpoint()
if checkpoint is None:
    print("no official checkpoint found (set $TINYQWEN_MODEL to use one); the fixtures stand in for it below")
else:
    real = tinyqwen.load_config(checkpoint)
    with Checkpoint(checkpoint) as ckpt:
        stored = sum(int(np.prod(ckpt.shape(k))) for k in ckpt.keys() if k != "lm_head.weight" or not real.tie_word_embeddings)
    print(f"{checkpoint.name}: {stored:,} parameters stored, count_parameters says {count_parameters(real):,}")

# %% [markdown]
# ## Checkpoint: every fixture against transformers
#
# The tour's own checkpoint runs tinyqwen's NumPy model on each of the five fixtures. It compares the logits with
# the ones `transformers` stored in `reference.npz`, for the two-sequence batch and for the single sequence:

# %%
ratios = {}  # max |Δ| / bound, per fixture and input: must be <= 1
for folder in sorted(p.parent for p in FIXTURES.glob("*/reference.npz")):
    ref = np.load(folder / "reference.npz")
    model = tinyqwen.load_model(folder, progress=False)
    for ids, want in [(ref["input_ids"], ref["logits"]), (ref["single_input_ids"], ref["single_logits"])]:
        diff, bound = np.abs(model(ids) - want).max(), tolerance(want)
        ratios[folder.name, ids.ndim] = diff / bound
        print(f"{folder.name:26} {list(ids.shape)!s:8} max |Δ| = {diff:.1e} ≤ {bound:.1e} = {RTOL:g} · {bound / RTOL:.1f}")
assert len(ratios) == 10 and max(ratios.values()) <= 1, ratios
print(f"5 fixtures × (batch, single): logits equal transformers' (worst: {max(ratios.values()):.0%} of the bound)")

# %% [markdown]
# ## Summary
#
# - Qwen3 is one architecture in eight sizes: six dense models (0.6B–32B) and two mixture-of-experts models
#   (30B-A3B, 235B-A22B). They differ only in the numbers of `config.json`. All share the 151,936-token vocabulary,
#   `head_dim` 128, grouped-query attention, QK-Norm and RoPE with $\theta = 10^6$.
# - Parameter counts follow from the config by a short formula. They match the official weights (via keras-hub's
#   counts) to the last parameter. MoE models store all their experts but use only 8 of 128 per token.
# - "Equal to the official implementation" means: compared with outputs that `transformers` computed from the same
#   files (stored in `tests/fixtures/`, re-checked live in CI), with max |Δ| ≤ $10^{-5}$ of the largest value,
#   about 1e-4 on logits. That bound is five times above float32 noise on any CPU and below the subtlest real bug.
#
# There are no exercises for this chapter. Start building with [chapter 1: tokenization](01-tokenization.ipynb).
