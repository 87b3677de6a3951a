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
# # Chapter 7 · Mixture of experts
#
# [Chapter 6](06-dense-model.ipynb) built the dense Qwen3: every token runs through every weight. Qwen3's largest
# models do something else. **Qwen3-30B-A3B** holds 30.5 billion parameters but uses only about 3.3 billion of
# them per token ("A3B": 3B *active*); Qwen3-235B-A22B holds 235 billion and uses 22. They replace the one big
# SwiGLU of each layer with many small ones — the **experts** — and a tiny **router** that picks a few experts for
# each token.
#
# **What you will build**
#
# 1. `route` — router logits → softmax → top-k → (optionally) renormalise;
# 2. `moe_block` — the sparse block: each token through its k experts, weighted; checked against a dense "run
#    every expert" reference and against transformers' `Qwen3MoeSparseMoeBlock`;
# 3. `is_moe_layer` — which layers have experts (`decoder_sparse_step`, `mlp_only_layers`);
# 4. `load_balancing_loss` — the training-time penalty that keeps the router from collapsing onto a few experts.

# %%
import dataclasses

import matplotlib.pyplot as plt
import numpy as np

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
REF = np.load(REPO / "exercises" / "references" / "ch07_mixture_of_experts.npz")  # made by transformers

# %% [markdown]
# `REF` holds what transformers' Qwen3-MoE code computes on seeded inputs (generator:
# `exercises/references/make_ch07_mixture_of_experts.py`). Two fixture checkpoints in `tests/fixtures/` are tiny
# random Qwen3-MoE models in the official layout: `moe-norm-topk` (8 experts, top-2, renormalised, like
# Qwen3-30B-A3B) and `moe-sparse-step` (experts only in some layers, not renormalised).
#
# ## 1. Many experts, few at a time
#
# The count from the official config (`tinyqwen/data/configs/Qwen3-30B-A3B.json`): 48 layers, hidden size 2048,
# 128 experts per layer, each a SwiGLU of width 768, and 8 experts per token.

# %%
from tinyqwen.config import CONFIG_DIR, load_config

c = load_config(CONFIG_DIR / "Qwen3-30B-A3B.json")
d, E, k, f = c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
expert = 3 * d * f  # gate, up, down of ONE expert
attn = d * c.q_size + 2 * d * c.kv_size + c.q_size * d + 2 * c.head_dim  # q, k, v, o, QK-Norm
router = E * d  # one linear layer: hidden -> one score per expert
per_layer = {"attention": attn, "router": router, "experts": E * expert, "norms": 2 * d}
print({name: f"{n / 1e6:.1f}M" for name, n in per_layer.items()}, f"| one expert: {expert / 1e6:.2f}M")

# %% [markdown]
# Per token, only the router and $k = 8$ of the 128 experts run. Adding the embedding, the (untied) head and the
# final norm:

# %%
outside = 2 * c.vocab_size * d + d  # embedding, lm_head, final norm
total = outside + c.num_hidden_layers * sum(per_layer.values())
active = outside + c.num_hidden_layers * (attn + router + k * expert + 2 * d)
params_transformers = int(np.load(REPO / "exercises" / "references" / "ch06_dense_model.npz")["params.Qwen3-30B-A3B"])
print(f"total {total / 1e9:.2f}B (transformers counts {params_transformers / 1e9:.2f}B), active per token {active / 1e9:.2f}B")
assert total == params_transformers

# %%
from tinyqwen.config import published_configs
from tinyqwen.config import count_parameters

dense = {n: count_parameters(published_configs()[n]) for n in ("Qwen3-4B", "Qwen3-8B")}  # as in chapter 6
fig, ax = plt.subplots(figsize=(6.5, 3.4))
ax.bar(["Qwen3-4B", "Qwen3-8B"], [v / 1e9 for v in dense.values()], color="0.6", label="dense: all weights per token")
ax.bar(["Qwen3-30B-A3B"], [total / 1e9], color="#f6b26b", label="MoE: weights stored")
ax.bar(["Qwen3-30B-A3B"], [active / 1e9], color="#e06666", label="MoE: weights used per token")
ax.set(title="A mixture of experts stores much, computes little", ylabel="billions of parameters")
ax.legend()
plt.show()

# %% [markdown]
# The compute per token is that of a ~3B dense model; the memory is that of a 30B one (61 GB in bf16). Every expert
# must be in memory, because the next token may want any of them.
#
# ## 2. The router
#
# For each token (a row $x$ of the normalised hidden states, as in the dense layer), the router is a single linear
# layer with no bias, `mlp.gate.weight` `[E, hidden]` in the checkpoint — a score per expert. Then:
#
# $$p = \operatorname{softmax}(W_\text{router}\,x) \in \mathbb{R}^E, \qquad
# S = \text{the } k \text{ experts with the largest } p_e, \qquad
# w_e = \begin{cases} p_e \,/\, \sum_{j \in S} p_j & \text{norm\_topk\_prob} \\ p_e & \text{otherwise}\end{cases}
# \quad (e \in S)$$
#
# and the block's output is $y = \sum_{e \in S} w_e \cdot \operatorname{SwiGLU}_e(x)$. Here is one token of the
# `moe-norm-topk` fixture (transformers' router logits of its layer 0):

# %%
from tinyqwen.attention import softmax  # chapter 5

ref_topk = np.load(FIXTURES / "moe-norm-topk" / "reference.npz")
logits0 = ref_topk["router_logits"][0, 0]  # layer 0, token 0: [8]
p = softmax(logits0)  # over all 8 experts
chosen = np.argsort(-p)[:2]  # the top 2
w = np.zeros(8)
w[chosen] = p[chosen] / p[chosen].sum()  # renormalised (norm_topk_prob is true in this fixture)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
ax1.bar(range(8), p, color=["#e06666" if e in chosen else "0.7" for e in range(8)])
ax1.set(title="softmax over all 8 experts; top-2 in red", xlabel="expert", ylabel="weight")
ax2.bar(range(8), w, color="#e06666")
ax2.set(title="the 2 chosen, renormalised to sum to 1", xlabel="expert")
plt.show()
print(f"chosen experts {chosen.tolist()}: probabilities {p[chosen][0]:.3f} + {p[chosen][1]:.3f} = {p[chosen].sum():.3f}"
      f" -> weights {w[chosen][0]:.3f} + {w[chosen][1]:.3f} = 1")  # fmt: skip

# %% [markdown]
# ### 2.1 Softmax first, then top-k
#
# A loop over one token says it plainly:

# %%
def route_loop(row, top_k, norm_topk_prob):  # one token's logits [E] -> (weights [k], experts [k])
    p = softmax(row)
    experts = sorted(range(len(p)), key=lambda e: -p[e])[:top_k]  # largest probability first
    weights = [p[e] for e in experts]
    if norm_topk_prob:
        weights = [w / sum(weights) for w in weights]
    return np.array(weights, dtype=np.float32), np.array(experts)


# %% [markdown]
# Since softmax preserves order, the top-k *experts* are the same whether we pick them from the logits or from the
# probabilities. The *weights* are a different matter. Taking the softmax over only the $k$ chosen logits gives
#
# $$\frac{e^{l_j}}{\sum_{i \in S} e^{l_i}} = \frac{e^{l_j} / Z}{\sum_{i \in S} e^{l_i} / Z} = \frac{p_j}{\sum_{i\in S} p_i},$$
#
# exactly the renormalised weights. So with `norm_topk_prob: true` (Qwen3-30B-A3B) "top-k, then softmax" happens
# to be right; with `norm_topk_prob: false` the weights must stay the plain probabilities, which sum to *less*
# than 1 — and then the order matters. Vectorised over all tokens:

# %%
def route(router_logits, top_k, norm_topk_prob):  # [N, E] -> weights [N, k], experts [N, k]
    probs = softmax(router_logits.astype(np.float32))  # over ALL experts
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # largest first; ties -> lower index
    weights = np.take_along_axis(probs, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts


# %% [markdown]
# transformers' `Qwen3MoeTopKRouter` (softmax in float32, `torch.topk`, optional renormalisation) on four cases:
# 8 experts top-2 with and without renormalising, 6 experts top-1, 6 experts top-3. We compare the weights as an
# `[N, E]` matrix (zero where an expert was not chosen), so the order of the k slots does not matter:

# %%
def dense_weights(weights, experts, num_experts):  # [N, k] at [N, k] -> [N, E]
    out = np.zeros((weights.shape[0], num_experts), dtype=np.float32)
    np.put_along_axis(out, experts, weights, axis=1)
    return out


# %% [markdown]
# Both versions — loop and vectorised — on each case, against transformers' weights:

# %%
for case in ("k2", "k2_norm", "k1", "k3_norm"):
    logits, top_k, norm = REF[f"route.{case}.logits"], int(REF[f"route.{case}.top_k"]), bool(REF[f"route.{case}.norm"])
    weights, experts = route(logits, top_k, norm)
    loop = np.stack([dense_weights(*(a[None] for a in route_loop(row, top_k, norm)), logits.shape[1])[0] for row in logits])
    err = np.abs(dense_weights(weights, experts, logits.shape[1]) - REF[f"route.{case}.dense"]).max()
    print(f"{case:8} logits {list(logits.shape)}: loop == vectorised {np.allclose(loop, dense_weights(weights, experts, logits.shape[1]))}, "
          f"max |Δ| vs transformers {err:.1e}, weights sum to {weights.sum(-1).min():.3f}..{weights.sum(-1).max():.3f}")  # fmt: skip

# %% [markdown]
# Without renormalisation (`k2`, `k1`) the weights sum to well under 1: each token's expert output is scaled down by
# the probability mass of the experts it did *not* pick.
#
# A note on ties: if two experts have exactly the same probability at the k-th place, which one is "top" is
# arbitrary — `torch.topk` does not promise an order. Real router logits almost never tie; the graded inputs are
# drawn so that the k-th and (k+1)-th probabilities differ by at least 0.001.
#
# ## 3. The sparse block
#
# Each expert is a SwiGLU exactly like chapter 6's, just narrower (`moe_intermediate_size`). A token's output is
# the weighted sum of its k experts' outputs. The loop version, token by token:

# %%
from tinyqwen.mlp import linear, swiglu  # chapter 6


def moe_loop(x, w_router, w_gate, w_up, w_down, top_k, norm_topk_prob):  # [N, d] -> [N, d]
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        weights, experts = route_loop(linear(x[n], w_router), top_k, norm_topk_prob)
        for w, e in zip(weights, experts):
            out[n] += w * swiglu(x[n], w_gate[e], w_up[e], w_down[e])
    return out


# %% [markdown]
# Running an expert on one token at a time wastes the matrix hardware. The fast way turns the loop around: for each
# expert, gather *all* the tokens that chose it, run the expert once on that batch, and scatter the weighted
# results back. (This is also what transformers' `Qwen3MoeExperts` does.)

# %%
def moe_block(x, w_router, w_gate, w_up, w_down, top_k, norm_topk_prob):  # [N, d] -> [N, d], [N, E]
    router_logits = linear(x, w_router)
    weights, experts = route(router_logits, top_k, norm_topk_prob)
    out = np.zeros_like(x)
    for e in range(w_router.shape[0]):
        token, slot = np.nonzero(experts == e)  # the tokens that chose expert e, and in which of their k slots
        if token.size:  # a token picks an expert at most once, so `token` has no repeats
            out[token] += weights[token, slot, None] * swiglu(x[token], w_gate[e], w_up[e], w_down[e])
    return out, router_logits


# %% [markdown]
# The expert weights are stacked per layer: `w_gate` and `w_up` are `[E, f, d]`, `w_down` is `[E, d, f]` (the
# checkpoint stores one tensor per expert, `mlp.experts.{e}.gate_proj.weight`; the loader stacks them). Shapes, and
# the loop against the vectorised version on transformers' test block (10 tokens, 6 experts of width 20, top-2):

# %%
case = {key: REF[f"moe.norm.{key}"] for key in ("x", "w_router", "w_gate", "w_up", "w_down")}
args = (*case.values(), 2, True)
out, router_logits = moe_block(*args)
print({key: list(v.shape) for key, v in case.items()}, "->", list(out.shape), list(router_logits.shape))
print(f"loop vs vectorised: max |Δ| = {np.abs(moe_loop(*args) - out).max():.1e}")

# %% [markdown]
# ### 3.1 A dense reference: run every expert
#
# The clearest definition of the block runs **every** expert on **every** token and combines them with the `[N, E]`
# weight matrix of section 2.1, which is zero for the experts a token did not choose. It wastes $E/k$ times the
# work, but it has no gathering or scattering to get wrong — a good reference:

# %%
def moe_dense(x, w_router, w_gate, w_up, w_down, top_k, norm_topk_prob):  # [N, d] -> [N, d]
    weights, experts = route(linear(x, w_router), top_k, norm_topk_prob)
    W = dense_weights(weights, experts, w_router.shape[0])  # [N, E]
    every = np.stack([swiglu(x, w_gate[e], w_up[e], w_down[e]) for e in range(len(w_gate))], axis=1)  # [N, E, d]
    return np.einsum("ne,ned->nd", W, every)


print(f"sparse vs dense reference: max |Δ| = {np.abs(moe_dense(*args) - out).max():.1e}")

# %% [markdown]
# One more thing that looks like a choice but is not: *where* to multiply by the weight. `down` is linear, so
# $w \cdot W_\text{down} a = W_\text{down} (w \cdot a)$: weighting the expert's hidden activation before `down`
# gives the same result, up to rounding. Neither is a bug.

# %%
x1, e1 = case["x"][:1], 3
after = 0.3 * swiglu(x1, case["w_gate"][e1], case["w_up"][e1], case["w_down"][e1])
hidden = 0.3 * (linear(x1, case["w_gate"][e1]) / (1 + np.exp(-linear(x1, case["w_gate"][e1]))) * linear(x1, case["w_up"][e1]))
print(f"weight after down vs before down: max |Δ| = {np.abs(after - linear(hidden, case['w_down'][e1])).max():.1e}")

# %% [markdown]
# Now against transformers' `Qwen3MoeSparseMoeBlock`, with and without `norm_topk_prob` — the output and the
# router logits it returns (the loss of section 5 needs them):

# %%
for name in ("norm", "plain"):
    inputs = [REF[f"moe.{name}.{key}"] for key in ("x", "w_router", "w_gate", "w_up", "w_down")]
    y, logits = moe_block(*inputs, int(REF[f"moe.{name}.top_k"]), bool(REF[f"moe.{name}.norm"]))
    print(f"norm_topk_prob={bool(REF[f'moe.{name}.norm'])!s:5}: output max |Δ| = {np.abs(y - REF[f'moe.{name}.out']).max():.1e}, "
          f"router logits max |Δ| = {np.abs(logits - REF[f'moe.{name}.router_logits']).max():.1e}")  # fmt: skip

# %% [markdown]
# What the routing of a whole batch looks like: the weight matrix for the 24 tokens of the `moe-norm-topk` fixture
# at its first layer. Each row has exactly two coloured cells.

# %%
W0 = dense_weights(*route(ref_topk["router_logits"][0], 2, True), 8)
fig, ax = plt.subplots(figsize=(4.5, 5))
im = ax.imshow(W0, cmap="Reds", vmin=0, vmax=1, aspect="auto")
ax.set(title="Routing weights, layer 0 of moe-norm-topk", xlabel="expert", ylabel="token (2 sequences × 12)")
fig.colorbar(im, ax=ax, label="weight")
plt.show()

# %% [markdown]
# ## 4. Which layers have experts?
#
# Not every layer has to be sparse. Two config keys decide, with the rule of transformers' `Qwen3MoeDecoderLayer`:
# layer $i$ (counting from 0) is a MoE layer when
#
# $$i \notin \texttt{mlp\_only\_layers} \quad\text{and}\quad (i + 1) \bmod \texttt{decoder\_sparse\_step} = 0$$
#
# (and the model has experts at all). With step 1 every layer is sparse (all released Qwen3-MoE models); with step
# 2 every second layer, starting with layer **1** — the "+1" is easy to get wrong. `mlp_only_layers` then forces
# some layers back to a dense SwiGLU of width `intermediate_size`.

# %%
def is_moe_layer(layer, num_experts, decoder_sparse_step, mlp_only_layers):
    return num_experts > 0 and layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0


# %%
cases = {
    f"Qwen3-30B-A3B\n(step {c.decoder_sparse_step}, {c.num_hidden_layers} layers)": (
        c.num_hidden_layers, c.num_experts, c.decoder_sparse_step, list(c.mlp_only_layers)),
    "step 2": (12, 8, 2, []),
    "step 3": (12, 8, 3, []),
    "moe-sparse-step fixture\n(step 2, mlp_only [3])": (6, 8, 2, [3]),
    "step 1, mlp_only [0, 11]": (12, 8, 1, [0, 11]),
}

# %%
shown = 12  # the first 12 layers of each
grid = np.full((len(cases), shown), np.nan)
for row, (L, n_exp, step, only) in enumerate(cases.values()):
    grid[row, : min(L, shown)] = [is_moe_layer(i, n_exp, step, only) for i in range(min(L, shown))]
fig, ax = plt.subplots(figsize=(8, 3.4))
ax.imshow(np.ma.masked_invalid(grid), cmap=plt.matplotlib.colors.ListedColormap(["#9fc5e8", "#e06666"]), aspect="auto")
ax.set(yticks=range(len(cases)), yticklabels=list(cases), xticks=range(shown), xlabel="layer index i",
       title="MoE layers (red) and dense layers (blue): the first 12 layers")  # fmt: skip
ax.set_xticks(np.arange(-0.5, shown), minor=True)
ax.set_yticks(np.arange(-0.5, len(cases)), minor=True)
ax.grid(which="minor", color="white", lw=2)
ax.tick_params(which="minor", length=0)
plt.show()

# %% [markdown]
# transformers built a `Qwen3MoeDecoderLayer` for every layer of eight configs and recorded which ones got a
# `Qwen3MoeSparseMoeBlock`; the fixture records which of its layers returned router logits:

# %%
names = sorted({k.split(".")[1] for k in REF.files if k.startswith("layers.")})
for name in names:
    g = {key: REF[f"layers.{name}.{key}"] for key in ("num_layers", "num_experts", "decoder_sparse_step", "mlp_only_layers", "is_moe")}
    ours = [is_moe_layer(i, int(g["num_experts"]), int(g["decoder_sparse_step"]), g["mlp_only_layers"].tolist()) for i in range(int(g["num_layers"]))]
    assert ours == g["is_moe"].tolist(), name
sparse = load_config(FIXTURES / "moe-sparse-step")
ours = [i for i in range(sparse.num_hidden_layers) if is_moe_layer(i, sparse.num_experts, sparse.decoder_sparse_step, sparse.mlp_only_layers)]
print(f"all {len(names)} configs agree with transformers; moe-sparse-step: ours {ours}, transformers {np.load(FIXTURES / 'moe-sparse-step' / 'reference.npz')['moe_layer_indices'].tolist()}")

# %% [markdown]
# ## 5. The load-balancing loss
#
# The router is trained along with everything else, and left alone it tends to **collapse**: a few experts get
# slightly better early, so the router sends them more tokens, so they get trained more and become better still.
# The other experts' parameters are wasted, and when the experts are spread over many GPUs the busy ones become the
# bottleneck. Training therefore adds an auxiliary loss (from the Switch Transformer, Fedus et al. 2021) that is
# smallest when the load is even. Over the $N$ tokens of a batch — pooled over all MoE layers —
#
# $$f_e = \frac{1}{N}\sum_{n} \mathbb{1}[e \in S_n] \qquad P_e = \frac{1}{N}\sum_n p_{n,e} \qquad
# \mathcal{L}_\text{aux} = E \sum_{e=1}^{E} f_e\, P_e$$
#
# $f_e$ is the share of tokens that chose expert $e$ among their top $k$ (so $\sum_e f_e = k$); $P_e$ is the
# router's mean probability for $e$ ($\sum_e P_e = 1$).
#
# Why both factors? $f_e$ counts discrete choices: it has no gradient. $P_e$ is smooth, and the gradient of the loss
# with respect to it is $E\,f_e$ — so training pushes down the probability of each expert *in proportion to its
# current load*. With perfectly even routing, $f_e = k/E$ and $P_e = 1/E$, so $\mathcal{L} = k$; if every token goes
# to the same $k$ experts, the loss approaches $E$.

# %%
def load_balancing_loss(router_logits, num_experts, top_k):  # list of [N, E] (one per MoE layer) -> float
    logits = np.concatenate([np.asarray(r, np.float32).reshape(-1, num_experts) for r in router_logits])
    probs = softmax(logits)  # [rows, E], every layer's tokens pooled
    _, experts = route(logits, top_k, norm_topk_prob=False)
    f = np.bincount(experts.ravel(), minlength=num_experts) / len(logits)  # share of rows choosing e; sums to k
    P = probs.mean(axis=0)  # mean router probability of e; sums to 1
    return float(num_experts * np.sum(f * P))


# %% [markdown]
# Three routers, each 8 experts and top-2: a perfectly balanced one (token $n$ ranks the experts $n, n{+}1, \dots$),
# the fixture's random router (two layers, 24 tokens each), and a collapsed one where every token prefers experts
# 0 and 1:

# %%
routers = {
    "balanced": list(REF["lbl.balanced.logits"]),
    "moe-norm-topk fixture (random weights)": list(ref_topk["router_logits"]),
    "collapsed": list(REF["lbl.collapsed.logits"]),
}
print({name: f"{len(logits)} layer(s) × {logits[0].shape[0]} tokens" for name, logits in routers.items()})

# %% [markdown]
# For each, the share of the load $f_e/k$ (normalised to sum to 1 so it sits on the same scale) next to the mean
# probability $P_e$:

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), sharey=True)
for ax, (name, logits) in zip(axes, routers.items()):
    rows = np.concatenate(logits)
    _, experts = route(rows, 2, False)
    f = np.bincount(experts.ravel(), minlength=8) / len(rows)
    ax.bar(np.arange(8) - 0.2, f / 2, width=0.4, label="f_e / k: share of the load")
    ax.bar(np.arange(8) + 0.2, softmax(rows).mean(0), width=0.4, label="P_e: mean probability")
    ax.axhline(1 / 8, color="k", ls=":", lw=1)
    ax.set(title=f"{name}\nloss = {load_balancing_loss(logits, 8, 2):.3f}", xlabel="expert")
axes[0].set_ylabel("fraction")
axes[0].legend(loc="upper right", fontsize=8)
plt.show()

# %% [markdown]
# The dotted line is the even share $1/E$. The balanced router sits on it and scores exactly $k = 2$; the collapsed
# one scores nearly $E = 8$. Against transformers' `load_balancing_loss_func` on these and two more cases (random
# routers over two and three layers, one with top-1), and against the fixture's `aux_loss` — the value transformers
# returns from the whole model with `output_router_logits=True`:

# %%
for name in ("balanced", "collapsed", "random", "top1"):
    logits, n_exp, top_k = REF[f"lbl.{name}.logits"], int(REF[f"lbl.{name}.num_experts"]), int(REF[f"lbl.{name}.top_k"])
    ours = load_balancing_loss(list(logits), n_exp, top_k)
    print(f"{name:9} ({len(logits)} layer(s), E={n_exp}, k={top_k}): ours {ours:.6f}, transformers {float(REF[f'lbl.{name}.loss']):.6f}")
print(f"fixture moe-norm-topk: ours {load_balancing_loss(list(ref_topk['router_logits']), 8, 2):.6f}, transformers {float(ref_topk['aux_loss']):.6f}")

# %% [markdown]
# In training the loss is scaled by `router_aux_loss_coef` (0.001 for Qwen3-30B-A3B) and added to the language
# model loss; the scale is small so that balancing never outweighs predicting the next token. At inference the
# loss plays no part — but it explains why trained routers spread their load.
#
# ## 6. The whole MoE model
#
# A Qwen3-MoE layer is chapter 6's decoder layer with the SwiGLU swapped for the sparse block (on the MoE layers).
# tinyqwen's model calls its MLP kernels through a small `backend` object, so we can plug the `moe_block` written
# in this notebook straight into the real fixture models and compare their logits, router logits and aux loss with
# transformers':

# %%
import tinyqwen

for fixture in ("moe-norm-topk", "moe-sparse-step"):
    model = tinyqwen.load_model(FIXTURES / fixture)
    model.backend = dataclasses.replace(model.backend, moe_block=moe_block)  # our block inside the real model
    ref = np.load(FIXTURES / fixture / "reference.npz")
    logits, router = model(ref["input_ids"], return_router_logits=True)
    print(f"{fixture}: {len(router)} MoE layers, logits max |Δ| = {np.abs(logits - ref['logits']).max():.1e}, "
          f"router logits max |Δ| = {np.abs(np.stack(router) - ref['router_logits']).max():.1e}")  # fmt: skip

# %% [markdown]
# ## 7. Checkpoint: our mixture of experts against transformers
#
# With our `moe_block` inside, both fixture models must give transformers' logits (bound 1e-4 on logits of size
# ~10, as in chapter 6: float32 on both sides, only summation order differs) and router logits (1e-4), and our
# load-balancing loss must match `aux_loss` (1e-5 on a value ~2). One fixture renormalises the top-k weights and
# has experts in every layer; the other does not renormalise, and has experts only in layers 1 and 5.

# %%
for fixture in ("moe-norm-topk", "moe-sparse-step"):
    model = tinyqwen.load_model(FIXTURES / fixture)
    model.backend = dataclasses.replace(model.backend, moe_block=moe_block)
    ref = np.load(FIXTURES / fixture / "reference.npz")
    logits, router = model(ref["input_ids"], return_router_logits=True)
    aux = load_balancing_loss(router, model.config.num_experts, model.config.num_experts_per_tok)
    err, err_router, err_aux = (np.abs(logits - ref["logits"]).max(), np.abs(np.stack(router) - ref["router_logits"]).max(),
                                abs(aux - float(ref["aux_loss"])))  # fmt: skip
    assert err <= 1e-4 and err_router <= 1e-4 and err_aux <= 1e-5, (fixture, err, err_router, err_aux)
    print(f"{fixture}: logits max |Δ| = {err:.1e} ≤ 1e-4, router logits {err_router:.1e} ≤ 1e-4, "
          f"aux loss {aux:.6f} (|Δ| = {err_aux:.1e} ≤ 1e-5) against transformers")  # fmt: skip

# %% [markdown]
# ## Summary
#
# - A MoE layer replaces the one SwiGLU with $E$ small ones and a linear **router**; each token runs only $k$ of
#   them. Qwen3-30B-A3B stores 30.5B parameters and runs 3.3B per token.
# - Routing is **softmax over all experts → top-k → renormalise** (if `norm_topk_prob`). Softmax over only the k
#   chosen logits equals the renormalised weights — right for Qwen3-30B-A3B, wrong when `norm_topk_prob` is false.
# - The fast block loops over experts, not tokens; it must equal the dense "run every expert, weight by the
#   `[N, E]` matrix" reference. Weighting before or after `down` is the same thing.
# - Layer $i$ is MoE when $i \notin$ `mlp_only_layers` and $(i+1) \bmod$ `decoder_sparse_step` $= 0$.
# - The load-balancing loss $E\sum_e f_e P_e$ is $k$ for even routing and up to $E$ for collapse; $f$ measures the
#   load, $P$ carries the gradient.
#
# Next, [chapter 8](08-kv-cache-generation.ipynb) makes the model generate text — fast, with a KV cache.
#
# ## Exercises
#
# Fill in `exercises/ch07_mixture_of_experts.py` (`route`, `moe_block`, `is_moe_layer`, `load_balancing_loss`) and
# run
#
# ```bash
# pytest exercises/test_ch07_mixture_of_experts.py
# ```
#
# The last checkpoint runs both MoE fixtures with *your* kernels of chapters 3–7 inside them.
