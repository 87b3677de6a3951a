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
# # Chapter 13 · Training a tiny Qwen3-MoE
#
# Everything so far ran the model *forward*: weights in, logits out. In [chapter 7](07-mixture-of-experts.ipynb)
# we computed the load-balancing loss, but a loss only does something when it is *trained against*: its gradient
# has to reach the router's weights and move them. This chapter writes the **backward pass** of every Qwen3
# component in plain NumPy — no autograd — checks each one against finite differences and against torch's
# autograd, and then trains a tiny Qwen3-MoE on this machine's CPU. We then watch what the aux loss is for: the
# experts' load with the coefficient 0, Qwen3's 0.001, and larger ones — and find that transformers' version of the
# loss balances something subtler than "each layer's experts".
#
# **What you will build**
#
# 1. `softmax_backward` and `rms_norm_backward` — the two non-obvious derivatives, derived here by hand;
# 2. `cross_entropy_backward` — where every backward pass starts;
# 3. `route_backward` — back through softmax → top-k → renormalise (the *choice* has no gradient);
# 4. `load_balancing_loss_backward` — the aux loss's gradient, with all layers pooled (transformers) or per layer;
# 5. `adamw_step` — the optimizer, with decoupled weight decay and bias correction.

# %%
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
DATA = REPO / "notebooks" / "data"
REF = np.load(REPO / "exercises" / "references" / "ch13_training.npz")  # made by torch autograd

import tinyqwen  # noqa: E402
from tinyqwen import attention, grad, moe, norm, train  # noqa: E402

# %% [markdown]
# `REF` holds what torch's autograd computes on seeded inputs (generator: `exercises/references/make_ch13_training.py`,
# which never imports tinyqwen), including the gradients of transformers' own Qwen3-MoE on the `moe-norm-topk`
# fixture.
#
# ## 1. The chain rule through one block
#
# Training means: compute a loss $L$ (here the mean next-token cross-entropy), then for every weight $W$ the
# gradient $\partial L / \partial W$, and step against it. The model is a chain of functions, so the gradient is a
# chain of products — the **chain rule**, applied from the loss backwards. For a layer $y = f(x, W)$ we receive
# $\bar y = \partial L/\partial y$ from above and must return two things: $\bar x = \partial L/\partial x$ (passed
# further down) and $\bar W = \partial L/\partial W$ (kept for the optimizer).
#
# One Qwen3 decoder block, forward in black and backward in red:


# %%
def draw_block():
    stages = ["x", "RMSNorm", "attention", "+", "RMSNorm", "MoE /\nSwiGLU", "+", "out"]
    fig, ax = plt.subplots(figsize=(11, 2.8))
    for i, s in enumerate(stages):
        ax.text(i, 0, s, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="#eef" if s not in "x+out" else "white"))  # fmt: skip
        if i:
            ax.annotate("", (i - 0.38, 0.12), (i - 0.62, 0.12), arrowprops=dict(arrowstyle="->"))
            ax.annotate(
                "", (i - 0.62, -0.12), (i - 0.38, -0.12), arrowprops=dict(arrowstyle="->", color="red")
            )
    for a, b in ((0, 3), (3, 6)):  # residual connections: the gradient arrives unchanged at the block's input
        ax.annotate(
            "", (b, 0.25), (a, 0.25), arrowprops=dict(arrowstyle="->", connectionstyle="arc3,rad=-0.35")
        )
        ax.annotate("", (a, -0.25), (b, -0.25),
                    arrowprops=dict(arrowstyle="->", color="red", connectionstyle="arc3,rad=-0.35"))  # fmt: skip
    ax.set_xlim(-0.5, 7.5), ax.set_ylim(-1, 1), ax.axis("off")
    ax.set_title(
        "one decoder block: forward (black) and backward (red); residuals copy the gradient past each half"
    )
    plt.show()


draw_block()

# %% [markdown]
# Each box needs a backward function. Most are short: a linear layer $y = xW^\top$ gives $\bar x = \bar y W$
# and $\bar W = \bar y^\top x$; a residual $y = x + f(x)$ gives $\bar x = \bar y + \overline{f}(\bar y)$; RoPE is a
# rotation, so its backward is the rotation by the opposite angle. Two need a derivation: softmax (inside attention
# and the router) and RMSNorm. tinyqwen keeps each backward next to its forward: `rms_norm_backward` in
# `tinyqwen/norm.py`, `apply_rope_backward` in `rope.py`, `attention_backward` and `softmax_backward` in
# `attention.py`, `swiglu_backward` in `mlp.py`, `moe_block_backward` in `moe.py`; `tinyqwen/grad.py` chains them.
#
# ## 2. Softmax backward
#
# $y_i = e^{x_i} / \sum_j e^{x_j}$. Differentiating: $\partial y_i / \partial x_j = y_i(\delta_{ij} - y_j)$ — the
# Jacobian is $\mathrm{diag}(y) - y y^\top$. Every input moves every output, because they share the denominator.
# Multiplying by the incoming gradient never needs the $n \times n$ matrix:
#
# $$\bar x_j = \sum_i \bar y_i\, y_i(\delta_{ij} - y_j) = y_j\Big(\bar y_j - \sum_i \bar y_i y_i\Big).$$
#
# A loop version first, straight from the Jacobian:


# %%
def softmax_backward_loop(dy, y):  # [n], [n] -> [n]
    n = len(y)
    jac = [[y[i] * ((i == j) - y[j]) for j in range(n)] for i in range(n)]
    return np.array([sum(dy[i] * jac[i][j] for i in range(n)) for j in range(n)])


x, dy = REF["softmax.x"], REF["softmax.dy"]
y = attention.softmax(x)
print(softmax_backward_loop(dy[0], y[0]).round(4))

# %% [markdown]
# The vectorised version is one line (`keepdims` keeps the sum a column, so it broadcasts over the row):


# %%
def softmax_backward(dy, y):  # [..., n], [..., n] -> [..., n]
    return y * (dy - np.sum(dy * y, axis=-1, keepdims=True))


print(np.abs(softmax_backward(dy, y) - REF["softmax.dx"]).max(), "= max |Δ| against torch autograd")

# %% [markdown]
# A property worth knowing: the gradient sums to zero along the softmax axis (adding a constant to every input
# changes nothing, so no gradient can point that way):

# %%
print(softmax_backward(dy, y).sum(axis=-1).round(12))

# %% [markdown]
# ## 3. RMSNorm backward
#
# $y = \hat x \odot w$ with $\hat x = x\,r$ and $r = (\tfrac1d\sum_k x_k^2 + \epsilon)^{-1/2}$. Write
# $g = \bar y \odot w$ (back through the weight). Then $\bar x_j = \sum_i g_i\,\partial \hat x_i/\partial x_j$ and
# $\partial \hat x_i / \partial x_j = r\,\delta_{ij} + x_i\,\partial r/\partial x_j$ with
# $\partial r/\partial x_j = -r^3 x_j / d$. Together:
#
# $$\bar x = r\Big(g - \hat x \cdot \tfrac1d\textstyle\sum_i g_i \hat x_i\Big), \qquad \bar w = \sum_{\text{tokens}} \bar y \odot \hat x.$$
#
# Compare LayerNorm's backward, which also subtracts $\mathrm{mean}(g)$: RMSNorm never subtracted the mean in its
# forward ([chapter 3](03-embeddings-rmsnorm.ipynb)), so its backward has no such term.


# %%
def rms_norm_backward(dy, x, w, eps):  # [..., d], [..., d], [d] -> [..., d], [d]
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    x_hat, g = x * r, dy * w
    dx = r * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    return dx, (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)


dx, dw = rms_norm_backward(REF["rms.dy"], REF["rms.x"], REF["rms.weight"], 1e-6)
print(dx.shape, dw.shape, np.abs(dx - REF["rms.dx"]).max(), np.abs(dw - REF["rms.dweight"]).max())

# %% [markdown]
# QK-Norm is the same function over `head_dim`, so the same backward serves it.
#
# **Checking a backward without torch: finite differences.** For any scalar $L(x)$,
# $\partial L/\partial x_i \approx (L(x + h e_i) - L(x - h e_i))/2h$ with an error of order $h^2$. In float64 with
# $h = 10^{-6}$ that is accurate to about $10^{-9}$: a wrong term shows up as an error of $10^{-2}$ or more.


# %%
def numeric_grad(f, x, h=1e-6):
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        out[i] = (plus - f()) / (2 * h)
        x[i] = old
    return out


xs, ws, dys = REF["rms.x"].copy(), REF["rms.weight"], REF["rms.dy"]
num = numeric_grad(lambda: np.sum(dys * norm.rms_norm(xs, ws, 1e-6)), xs)
print(f"RMSNorm dx: max |analytic − finite difference| = {np.abs(dx - num).max():.1e}")

# %% [markdown]
# ## 4. Cross-entropy backward
#
# The loss is the mean over counted positions of $-\log \mathrm{softmax}(z)_{t}$ (position $t$ predicts the next
# token; the last position has no target, marked `-100` as in transformers). Its gradient is the famous
# $\mathrm{softmax}(z) - \mathrm{onehot}(t)$, divided by the number of counted rows; ignored rows get zero.


# %%
def cross_entropy_backward(logits, targets):  # [N, V], [N] -> [N, V]
    keep = targets != -100
    d = attention.softmax(logits)
    d[np.arange(len(targets)), np.where(keep, targets, 0)] -= 1
    return d * keep[:, None] / keep.sum()


print(np.abs(cross_entropy_backward(REF["ce.logits"], REF["ce.targets"]) - REF["ce.dlogits"]).max())

# %% [markdown]
# ## 5. Top-k routing is straight-through
#
# The router computes $p = \mathrm{softmax}(\text{logits})$, *chooses* the top $k$, and weights the chosen experts
# by $w_j = p_j / \sum_{\text{chosen}} p$. The choice is a step function — nudging a logit either changes nothing
# or swaps an expert — so it has no useful gradient, and autograd (torch's and ours) treats it as a constant.
# The gradient passes *straight through* the selection to the weights of the chosen experts:
# $\partial L/\partial w_j = \bar y \cdot \mathrm{expert}_j(x)$. Then it flows back through the renormalisation,
# $\bar p_j = (\bar w_j - \sum_i \bar w_i w_i)/S$, and through the softmax — which reaches **every** logit, the
# unchosen ones too, because all of them sit in the denominator. An unchosen expert's *weights*, though, get
# exactly zero gradient from that token.

# %%
logits1 = REF["route.norm.logits"][:1]
w1, chosen1 = moe.route(logits1, 2, True)
dlog = moe.route_backward(np.array([[1.0, -0.5]]), logits1, chosen1, True)
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
colors = ["tab:orange" if e in chosen1[0] else "tab:gray" for e in range(6)]
axes[0].bar(range(6), attention.softmax(logits1)[0], color=colors)
axes[0].set(title="router probabilities (orange: top-2 chosen)", xlabel="expert", ylabel="p")
axes[1].bar(range(6), dlog[0], color=colors)
axes[1].set(title="dL/dlogit: every logit gets a gradient", xlabel="expert", ylabel="gradient")
plt.show()

# %% [markdown]
# The same against torch's autograd of transformers' router, with and without renormalisation:

# %%
for case in ("norm", "plain"):
    p = f"route.{case}."
    got = moe.route_backward(
        REF[p + "dweights"], REF[p + "logits"], REF[p + "experts"], bool(REF[p + "norm"])
    )
    print(case, f"max |Δ| = {np.abs(got - REF[p + 'dlogits']).max():.1e}")

# %% [markdown]
# ## 6. The load-balancing loss backward: pooled or per layer
#
# The load-balancing loss $E\sum_e f_e P_e$ of [chapter 7](07-mixture-of-experts.ipynb) is straight-through in the
# same way: the counts $f_e$ (the share of top-k picks that went to expert $e$) come from the top-k choice and
# carry no gradient; only the mean probabilities $P_e$ do. If the means run over $M$ rows,
#
# $$\frac{\partial\,\text{aux}}{\partial p_{n,e}} = \frac{E f_e}{M},$$
#
# then back through the softmax. An expert that already gets many tokens has its probability pushed down hardest.
#
# **Which rows?** Read transformers' `load_balancing_loss_func` (the one `Qwen3MoeForCausalLM` calls): it loops
# over the layers adding up `tokens_per_expert_sum` and `router_prob_sum`, and divides by the total number of rows
# of *all* layers. So $f_e$ and $P_e$ are taken over the $L \cdot N$ rows of every MoE layer **pooled**: the loss
# sees expert $e$'s load *summed over layers*. But expert 3 of layer 0 and expert 3 of layer 2 are unrelated
# networks that only share an index; if one is starved and the other overloaded, the pooled count looks fine.
# The Switch Transformer and GShard add an aux loss *per MoE layer* instead. tinyqwen offers both: scope
# `"global"` (transformers', the default, the one our torch checks verify) and `"layer"`: each layer's own $f_e$,
# $P_e$, then the **mean** over layers. We average rather than sum so that the loss is still $k$ at uniform routing
# and each router row gets a gradient of the same size as with `"global"` ($E f_e / (L N)$ in both): a coefficient
# means the same strength in either scope.
#
# Two layers with opposite preferences show the difference — pooled they look perfectly balanced:

# %%
a = np.log([[0.7, 0.3]] * 4)  # layer 0 prefers expert 0
b = np.log([[0.3, 0.7]] * 4)  # layer 1 prefers expert 1
print("top-1, 2 experts: uniform gives 1.0")
print(
    "global:",
    moe.load_balancing_loss([a, b], 2, 1),
    " layer:",
    moe.load_balancing_loss([a, b], 2, 1, "layer"),
)

# %% [markdown]
# The backward, both scopes in one function ($f_e$ from the top-k counts, a constant; the rest is the softmax
# backward of section 2):


# %%
def load_balancing_loss_backward(router_logits, E, k, scope="global"):  # L × [N, E] -> L × [N, E]
    groups = [np.concatenate(router_logits)] if scope == "global" else router_logits
    out = []
    for z in groups:
        p = attention.softmax(z)
        top = np.argsort(-p, axis=-1)[:, :k]
        f = np.bincount(top.ravel(), minlength=E) / len(z)  # [E] no gradient
        out.append(softmax_backward(np.broadcast_to(E * f / len(z), p.shape), p))
    if scope == "global":
        return np.split(out[0], np.cumsum([len(z) for z in router_logits])[:-1])
    return [d / len(router_logits) for d in out]  # the mean over layers


# %%
layers = list(REF["aux.logits"])  # 3 layers × [10 tokens, 6 experts], top-2
for scope in ("global", "layer"):
    d = np.stack(load_balancing_loss_backward(layers, 6, 2, scope))
    print(f"{scope:6s}: max |Δ| = {np.abs(d - REF['aux.' + scope]).max():.1e} against torch autograd of "
          f"transformers' load_balancing_loss_func (per layer: called on each layer, averaged)")  # fmt: skip

# %% [markdown]
# ## 7. The whole model, checked against finite differences
#
# `grad.loss_and_grads` runs the forward pass keeping each layer's activations, then walks back through the layers
# calling the backward functions above. We check it on the `moe-sparse-step` fixture (dense and MoE layers,
# tied embeddings) in float64, with the aux coefficient raised to 0.5 so that its gradient matters, on a sample of
# entries of every parameter:

# %%
m = tinyqwen.load_model(FIXTURES / "moe-sparse-step")
w64 = grad.copy_weights(m.weights, np.float64)
ids = np.random.default_rng(0).integers(0, 512, size=(2, 6))
res = grad.loss_and_grads(m.config, w64, ids, aux_coef=0.5)
params, grads = grad.named_parameters(w64), grad.named_parameters(res.grads)
print(f"loss {res.loss:.4f} = CE {res.ce:.4f} + 0.5 × aux {res.aux:.4f}; {len(params)} parameter tensors")

# %%
pick, analytic, numeric = np.random.default_rng(1), [], []
for name, a in params.items():
    i = tuple(int(pick.integers(0, s)) for s in a.shape)
    if name.startswith("model.embed"):
        i = (int(ids[0, 0]), i[1])  # a row that is used
    f = lambda: grad.loss_and_grads(m.config, w64, ids, aux_coef=0.5, forward_only=True).loss  # noqa: E731
    old = a[i]
    a[i] = old + 1e-6
    plus = f()
    a[i] = old - 1e-6
    numeric.append((plus - f()) / 2e-6)
    a[i] = old
    analytic.append(grads[name][i])
analytic, numeric = np.array(analytic), np.array(numeric)
print(f"{len(analytic)} entries, max |analytic − numeric| = {np.abs(analytic - numeric).max():.1e}")

# %%
plt.figure(figsize=(4.5, 4))
plt.scatter(numeric, analytic, s=12)
plt.axline((0, 0), slope=1, color="gray", lw=0.8)
plt.xscale("symlog", linthresh=1e-4), plt.yscale("symlog", linthresh=1e-4)
plt.title("whole model: backward vs finite differences")
plt.xlabel("finite difference"), plt.ylabel("analytic (grad.py)")
plt.show()

# %% [markdown]
# `tests/test_backward.py` does this for every component and three fixtures; `tests/test_crosscheck_training.py`
# compares every parameter's gradient with torch autograd through transformers on all five fixtures (worst:
# 3.2e-6 of the tensor's largest gradient).
#
# ## 8. AdamW and the schedule
#
# Plain gradient descent takes the same step size for every weight. **Adam** keeps two running averages per weight
# — the gradient $m$ and its square $v$ — and steps by $m/\sqrt v$: about the learning rate in the direction the
# gradient consistently points, whatever its scale. Both averages start at 0, so early on they are too small;
# dividing by $1-\beta^t$ (bias correction) undoes that. **AdamW** applies weight decay *to the weight*,
# $p \leftarrow p(1 - \eta\lambda)$, instead of adding $\lambda p$ to the gradient, where Adam's division by
# $\sqrt v$ would weaken the decay of exactly the weights with large gradients. (tinyqwen decays matrices only, not
# RMSNorm weights.)


# %%
def adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return p - lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps), m, v


a = {k.removeprefix("adamw."): REF[k] for k in REF if k.startswith("adamw.")}
new = adamw_step(a["p"], a["g"], a["m"], a["v"], 3, 0.01, 0.9, 0.95, 1e-8, 0.1)
print(f"max |Δ| against torch.optim.AdamW: {np.abs(new[0] - a['p_new']).max():.1e}")

# %% [markdown]
# The learning rate warms up linearly (Adam's $v$ is still a poor estimate in the first steps, so big steps would
# be noisy), then decays along a cosine to a floor:

# %%
cfg = train.TrainConfig(lr=3e-3, min_lr=3e-4, warmup=20, steps=800)
plt.figure(figsize=(6, 2.5))
plt.plot([train.learning_rate(s, cfg) for s in range(1, 801)])
plt.title("warm-up + cosine (the stored runs' schedule)"), plt.xlabel("step"), plt.ylabel("learning rate")
plt.show()

# %% [markdown]
# Two more pieces of the trainer (`tinyqwen/train.py`): **gradient clipping** scales all gradients together when
# their global norm exceeds 1.0 (one bad batch cannot throw the weights far), and **gradient accumulation** adds
# the gradients of several micro-batches, each scaled by 1/n, before one optimizer step — the same step as one
# n-times-bigger batch, in the memory of a small one.
#
# ## 9. A short training run
#
# The data: a synthetic mixture of four small "languages" — arithmetic (`417 + 88 = 505`), list tasks
# (`sort: pear fig -> fig pear`), sentences from a tiny grammar, and Python-like snippets — generated from a seed,
# so it is identical on every machine, offline, and free of licence questions (`tinyqwen/corpus.py`). Different
# experts can specialise in different languages. It is tokenised by a 512-token byte-level BPE trained on it with
# Qwen3's pre-tokenizer and byte alphabet ([chapter 1](01-tokenization.ipynb)), saved as the same three files a
# Qwen3 checkpoint ships. (Qwen3's own 151,669-token vocabulary would make the output layer ~300× the cost of the
# rest of so small a model.)

# %%
from tinyqwen.corpus import synthetic_documents  # noqa: E402

for task, text in synthetic_documents(4, seed=5):
    print(f"{task:8s} {text!r}")

# %% [markdown]
# A 2-layer, 4-expert model for 150 steps of 8 × 32 tokens — well under a minute:

# %%
short = train.TrainConfig(
    out_dir=str(REPO / "runs" / "notebook-13"), docs=4000, seq_len=32, batch_size=8, steps=150, warmup=10,
    lr=5e-3, min_lr=5e-4, eval_every=25, eval_batches=2, progress=False,
    model={"hidden_size": 64, "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 64},
)  # fmt: skip
t0 = time.perf_counter()
summary = train.train(short)
print(f"{summary['tokens_seen']:,} tokens in {time.perf_counter() - t0:.1f} s: validation loss "
      f"{summary['val_loss']:.2f} (unigram baseline {summary['unigram_val_loss']:.2f})")  # fmt: skip

# %%
log = [json.loads(line) for line in (Path(short.out_dir) / "log.jsonl").read_text().splitlines()]
steps = [e for e in log if e["kind"] == "step"]
plt.figure(figsize=(6, 2.8))
plt.plot([e["step"] for e in steps], [e["ce"] for e in steps], label="train CE")
plt.axhline(log[0]["unigram_val_loss"], color="gray", ls="--", label="unigram baseline")
plt.title("the short run"), plt.xlabel("step"), plt.ylabel("loss (nats/token)"), plt.legend()
plt.show()

# %% [markdown]
# The checkpoint is a Hugging Face folder (config.json, model.safetensors with one tensor per expert, tokenizer
# files), so the command line reads it like any Qwen3. Greedy samples through `tinyqwen generate` (after 150
# steps the model has learned the shapes of the four languages, not yet much of their content):

# %%
ckpt = summary["checkpoint"]
for prompt in ["417 + 88 =", "sort: pear fig ->", "the small"]:
    out = subprocess.run(
        [sys.executable, "-m", "tinyqwen.cli", "generate", "--model", ckpt, "--raw", "--temperature", "0",
         "--max-new-tokens", "16", prompt],
        capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)}, check=True,
    ).stdout  # fmt: skip
    print(repr(prompt), "→", repr(out.strip()))

# %% [markdown]
# ## 10. The stored longer runs
#
# The same trainer on a 4-layer Qwen3-MoE (hidden 96, 4 query / 2 kv heads of 32, 8 experts of width 64, top-2,
# renormalised: 0.84 M parameters), 800 steps of 16 × 64 tokens (819 k tokens) per run, seven runs that differ
# only in the aux loss: off (coefficient 0); transformers' pooled loss (scope `"global"`) at Qwen3's 0.001 and at
# 0.1; the per-layer loss (scope `"layer"`) at 0.001, 0.003, 0.01 and 0.1 — plus two 1600-step runs (section 11).
# One command reproduces all of them
# (about 60 minutes of wall time for all nine on this busy, shared 2-core machine at low priority; 19.5
# CPU-minutes, ~100 CPU-seconds per 800-step run):
#
# ```bash
# python training/reproduce.py      # = tinyqwen train --config training/tiny-moe-<run>.json, once per run
# ```
#
# Its logs are stored in `notebooks/data/`. They were made before a one-token fix to `train.sample_batch`, whose
# windows could not start at the last possible position: a rerun draws different batches, so it gives different
# numbers. How different is itself worth knowing: the coefficient-0 run, rerun with the fix, ends at validation
# loss 1.444 instead of 1.432 with 4 starved layer-experts instead of 3 (0.03–3.15× instead of 0.06–2.35×), pooled
# 0.57–1.38×: the same collapse, in other numbers. Read the figures quoted below as one draw of the batches, not
# as constants; `training/reproduce.py` regenerates all of them.

# %%
stored = json.loads((DATA / "train-summary.json").read_text())
runs = {
    n: [json.loads(x) for x in (DATA / f"train-tiny-moe-{n}.jsonl").read_text().splitlines()]
    for n in stored["runs"]
}
NAMES = [
    n for n in runs if not n.startswith("long-")
]  # aux0, aux0.001, aux0.1, layer-aux0.001/0.003/0.01/0.1
LONG = [n for n in runs if n.startswith("long-")]  # aux0 and layer-aux0.001 for 1600 steps


def label(n):
    r = stored["runs"][n]
    name = "coef 0 (off)" if not r["aux_coef"] else f"{r['aux_loss_scope']} {r['aux_coef']:g}"
    return name + (f", {r['steps']} steps" if n.startswith("long-") else "")


for n in runs:
    s = stored["runs"][n]
    print(f"{label(n):25s}: {s['tokens_seen']:,} tokens, {s['train_cpu_s']:.0f} CPU-s, val loss {s['val_loss']:.3f} "
          f"(unigram {s['unigram_val_loss']:.3f}), peak RSS {s['peak_rss_mib']:.0f} MiB")  # fmt: skip

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for n in NAMES:
    st = [e for e in runs[n] if e["kind"] == "step"]
    axes[0].plot([e["tokens"] / 1e3 for e in st], [e["ce"] for e in st], label=label(n), lw=0.7)
    ev = [e for e in st if "val_loss" in e]
    axes[1].plot(
        [e["tokens"] / 1e3 for e in ev], [e["val_loss"] for e in ev], "o-", label=label(n), ms=2, lw=0.8
    )
for ax, t in zip(axes, ("training cross-entropy", "validation cross-entropy"), strict=True):
    ax.axhline(runs["aux0"][0]["unigram_val_loss"], color="gray", ls="--", label="unigram baseline")
    ax.set(title=t, xlabel="tokens seen (thousands)", ylabel="nats/token")
axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# The aux loss costs nothing measurable in quality here: all seven end within a few hundredths of a nat of each
# other, three nats below the unigram baseline.
#
# ## 11. Expert load: per layer and pooled
#
# Every log line holds, per MoE layer, the share of the (token, slot) routing picks each expert received over the
# last 5 steps; uniform is $1/8$, and we plot shares as multiples of uniform. Two views of the same counts:
#
# - **per layer** — each layer's own shares: what matters for the model (a starved expert is wasted capacity, an
#   overloaded one a bottleneck once experts have a capacity limit, as on real hardware);
# - **pooled** — expert $e$'s picks summed over the 4 layers: the only thing transformers' loss looks at.
#
# We fixed the yardsticks before the runs, over the last 100 steps: a layer has **collapsed** when one of its
# experts gets under 0.25× uniform ("starved"), and a run is **within the band** when every share lies in
# [0.5, 1.5]× uniform. Left to right the seven runs; on top each layer's shares, below the pooled ones:

# %%
fig, axes = plt.subplots(2, len(NAMES), figsize=(15, 4.6), layout="constrained")
for j, n in enumerate(NAMES):
    f = stored["runs"][n]["expert_load"]
    im = axes[0, j].imshow(f["per_layer_x_uniform"], cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
    axes[0, j].set(title=label(n), ylabel="layer" if j == 0 else None, yticks=range(4), xticks=[])
    axes[1, j].bar(range(8), f["pooled_x_uniform"], color="gray")
    for y in (0.5, 1.5):
        axes[1, j].axhline(y, color="tab:red", lw=0.6, ls="--")
    axes[1, j].set(ylim=(0, 2.7), xlabel="expert", ylabel="pooled ×uniform" if j == 0 else None)
fig.colorbar(im, ax=axes[0], label="share × uniform", shrink=0.9)
fig.suptitle("last 100 steps: per-layer load (top, white = uniform) and pooled load (bottom, band dashed)")
plt.show()

# %% [markdown]
# The numbers behind the picture (from `train-summary.json`): min and max share, starved experts (of 32 per layer
# view, of 8 pooled), and the coefficient of variation across experts (0 = perfectly even):

# %%
for n in NAMES:
    f = stored["runs"][n]["expert_load"]
    pl, po = f["per_layer"], f["pooled"]
    print(f"{label(n):12s} per layer [{pl['min']:.2f}, {pl['max']:.2f}] starved {pl['starved']} cv {pl['cv']:.2f}"
          f" band {'yes' if pl['within_band'] else 'no '} | pooled [{po['min']:.2f}, {po['max']:.2f}] "
          f"cv {po['cv']:.2f} band {'yes' if po['within_band'] else 'no'}")  # fmt: skip

# %% [markdown]
# How it develops: the smallest and largest per-layer share over training (each point the mean over 20 steps),
# with the starved line at 0.25× and the band dashed.


# %%
def plot_extremes(names, every=20):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.3), sharex=True)
    for n in names:
        st = [e for e in runs[n] if e["kind"] == "step"]
        x = np.array([e["expert_load"] for e in st]) * 8  # [logged steps, layers, experts]
        g = every // (st[1]["step"] - st[0]["step"])  # log lines per point
        x = x[: len(x) // g * g].reshape(-1, g, *x.shape[1:]).mean(axis=1)
        steps = [st[i]["step"] for i in range(g - 1, len(st), g)][: len(x)]
        axes[0].plot(steps, x.min(axis=(1, 2)), label=label(n), lw=0.9)
        axes[1].plot(steps, x.max(axis=(1, 2)), label=label(n), lw=0.9)
    axes[0].axhline(0.25, color="k", lw=0.6), axes[0].axhline(0.5, color="tab:red", lw=0.6, ls="--")
    axes[1].axhline(1.5, color="tab:red", lw=0.6, ls="--")
    axes[0].set(
        title=f"smallest per-layer share (×uniform, mean over {every} steps)", xlabel="step", yscale="log"
    )
    axes[1].set(title="largest per-layer share (×uniform)", xlabel="step")
    axes[1].legend(fontsize=7)
    plt.show()


plot_extremes(NAMES)

# %% [markdown]
# Over steps, each row one expert of one layer (8 rows per layer), for the three runs that tell the story:

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
for ax, n in zip(axes, ("aux0", "aux0.001", "layer-aux0.001"), strict=True):
    st = [e for e in runs[n] if e["kind"] == "step"]
    load = np.array([e["expert_load"] for e in st]) * 8  # [logged steps, layers, experts], 1 = uniform
    im = ax.imshow(load.reshape(len(st), -1).T, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2,
                   extent=(st[0]["step"], st[-1]["step"], 31.5, -0.5), interpolation="nearest")  # fmt: skip
    for b in (7.5, 15.5, 23.5):
        ax.axhline(b, color="k", lw=0.5)
    ax.set(title=label(n), xlabel="step")
axes[0].set_ylabel("layer × expert (8 rows per layer)")
fig.colorbar(im, ax=axes, label="share × uniform")
plt.show()

# %% [markdown]
# What to read from it:
#
# 1. **Without the aux loss the routing collapses, per layer.** In the first 100 steps 6 of the 32 layer-experts
#    are starved; at the end 3 still get under a quarter of their share (the least 0.06×) while others take 2.35×.
#    Pooled over layers the same run looks mild, 0.76–1.36×: the layers' imbalances fall on different expert
#    indices and partly cancel.
# 2. **transformers' loss balances what it measures — the pooled load.** At 0.1 the pooled shares are uniform to
#    ±1 %; at Qwen3's 0.001 they narrow from 0.76–1.36× to 0.84–1.15×. But *per layer* nothing improves: 0.07–2.64×
#    with 4 starved at 0.001, 0.06–2.22× with 2 starved at 0.1. The loss is minimal whenever each expert index's
#    picks *summed over layers* are even, and that leaves every layer free to starve some of its own experts.
#    (An earlier version of this chapter plotted only the per-layer load, saw the same spread at every
#    coefficient, and concluded the loss was too weak for so short a run. The loss was not weak; it was aimed
#    elsewhere.)
# 3. **The per-layer loss balances each layer.** At 0.001 no expert is starved after step 200 and the last 100
#    steps span 0.58–1.92× (coefficient of variation 0.32 against 0.61 with the loss off); at 0.003 0.80–1.37×,
#    at 0.01 0.88–1.16×, at 0.1 0.97–1.03×. So at Qwen3's 0.001 the per-layer loss prevents the collapse, but
#    within 800 steps it does not bring every expert into the [0.5, 1.5] band — one expert of layer 0 still takes
#    1.92× — and the smallest coefficient we ran that holds the band is 0.003 (from step 300 on; 0.01 from step
#    100 on).
# 4. **Balance costs nothing here.** Validation loss 1.39–1.43 in all seven; the best is the per-layer 0.01 run.
#
# Why can a coefficient of 0.001 do anything against a cross-entropy gradient hundreds of times larger? Because it
# always pushes the same way: the cross-entropy's gradients on a router row point in token-specific directions and
# largely cancel in the sum over a batch, while the aux gradient $E f_e/(LN)$ pushes every row of an overloaded
# expert down, step after step. A small steady force wins slowly — which is also why 0.001 needs more than 800
# steps of 1,024 tokens to finish the job. (Qwen3 itself trained on trillions of tokens with far larger batches.)
#
# Note also what the aux loss *value* shows: transformers' pooled value stays near its floor $k = 2$ in every
# global run (2.07 with the loss off), because the pooled load is never far from uniform and the router
# probabilities are nearly flat ($E\sum_e f_e P_e \approx \sum_e f_e = k$). The per-layer value at 0.001 (2.15)
# is higher although that run's layers are far better balanced: the two numbers measure different things. Watch the
# load itself, per layer.
#
# Which scope did Qwen3's own training use? The checkpoint cannot tell us; what we know is that transformers'
# `Qwen3MoeForCausalLM` — the code most people fine-tune with — computes the pooled one.
#
# **Longer runs.** Does the per-layer 0.001 run keep improving, and does the collapse without the loss persist?
# The same two settings for 1600 steps (1.6 M tokens; the cosine schedule stretched to the new length):

# %%
plot_extremes(LONG, every=40)
for n in LONG:
    f = stored["runs"][n]["expert_load"]["per_layer"]
    print(f"{label(n):25s} last 100 steps, per layer: [{f['min']:.2f}, {f['max']:.2f}], starved {f['starved']}, "
          f"cv {f['cv']:.2f}, band {'yes' if f['within_band'] else 'no'}")  # fmt: skip

# %% [markdown]
# With the loss off the collapse does not heal; it deepens: after 1600 steps 7 of the 32 layer-experts are
# starved (the least 0.05×, the most 2.53×) — while the pooled view shows 0.91–1.17×, nothing alarming. With the
# per-layer loss at 0.001 no expert is starved from step 400 on, and from step 1000 on every 100-step block stays
# within [0.37, 1.55]×; the last 100 steps span 0.44–1.55× (coefficient of variation 0.23 against 0.67 with the
# loss off). Closer to the [0.5, 1.5] band than at 800 steps, but still not inside it. Validation loss: 1.328 off,
# 1.335 per-layer 0.001.
#
# **In short**, on this model and data: without an aux loss the routing collapses per layer (a growing number of
# starved experts); transformers' pooled loss fixes only the pooled load, at any coefficient; the per-layer loss at
# Qwen3's 0.001 prevents the collapse — from step 400 on no expert of any layer falls under 0.25× uniform, and the
# largest share falls from 2.07× to 1.55× — but the tighter [0.5, 1.5] band is held only from a coefficient of
# 0.003 on.
#
# ## 12. Samples through tinyqwen generate
#
# Greedy continuations of the coefficient-0.001 run's checkpoint, stored by `training/reproduce.py` (it calls
# `tinyqwen generate --raw --temperature 0`):

# %%
for s in stored["samples_aux0.001"]:
    print(repr(s["prompt"]), "→", repr(s["output"].strip()))

# %% [markdown]
# ## An ablation: QK-Norm on and off
#
# Does QK-Norm earn its place? `exercises/ch17_ablation_qk_norm.py` is an experiment you write and run: the same tiny
# dense Qwen3 trained with and without QK-Norm at four learning rates, from the same weights on the same batches.
# `python exercises/ch17_ablation_qk_norm.py` reruns it (1–2 minutes); the stored run is plotted below.

# %%
ablation = json.loads((REPO / "exercises" / "references" / "ch17_ablation_qk_norm.json").read_text())["full"]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
for key, label in (("qk_norm", "with QK-Norm (Qwen3)"), ("no_qk_norm", "without QK-Norm")):
    left.plot(ablation["lrs"], ablation["final"][key], "o-", label=label)
    right.plot(range(1, ablation["steps"] + 1), ablation["curves"][key][2], label=label)
left.set(xscale="log", xlabel="learning rate", ylabel=f"final training loss ({ablation['steps']} steps)")
right.set(xlabel="step", ylabel="training loss", title="learning rate 3e-2")
left.legend()
right.legend()
plt.show()

# %% [markdown]
# With QK-Norm the loss is lower at every rate in this run, by 0.4 nats at 3e-2, where the run without it falls
# behind. One seed and 100 steps on a tiny model: a hint, not a result; a claim at scale needs several seeds and
# longer runs.

# %% [markdown]
# ## 13. Checkpoint: our gradients against torch autograd
#
# The last check: the whole Qwen3-MoE fixture `moe-norm-topk` (loss = cross-entropy + 0.001 × aux, transformers'
# pooled scope), our gradients
# against those of transformers' `Qwen3MoeForCausalLM` in train mode, computed by torch's autograd and stored in
# `REF`. Bound per tensor: $10^{-4}$ of its largest gradient (both sides float32).

# %%
mm = tinyqwen.load_model(FIXTURES / "moe-norm-topk")
r = grad.loss_and_grads(mm.config, grad.copy_weights(mm.weights), REF["model.ids"])
ours = grad.named_parameters(r.grads)
worst = max(
    np.abs(ours[k[11:]] - REF[k]).max() / np.abs(REF[k]).max() for k in REF if k.startswith("model.grad.")
)
assert abs(r.loss - float(REF["model.loss"])) <= 1e-5 and worst <= 1e-4, (r.loss, worst)
print(f"loss {r.loss:.6f} (|Δ| = {abs(r.loss - float(REF['model.loss'])):.1e}); gradients of "
      f"{sum(k.startswith('model.grad.') for k in REF)} tensors: worst |Δ| = {worst:.1e} of the tensor's "
      f"largest gradient ≤ 1e-4 against transformers + torch autograd")  # fmt: skip

# %% [markdown]
# ## Summary
#
# - A backward function receives $\partial L/\partial y$ and returns $\partial L/\partial x$ and the weights'
#   gradients; the chain rule strings them together in reverse, residuals copy the gradient past each half-block.
# - Softmax: $\bar x = y \odot (\bar y - \sum \bar y y)$. RMSNorm: $\bar x = r(g - \hat x\,\mathrm{mean}(g\hat x))$,
#   no mean term. Cross-entropy: $\mathrm{softmax} - \mathrm{onehot}$, over the counted rows.
# - Top-k routing is straight-through: the choice is a constant, the chosen weights carry the gradient back to every
#   router logit; unchosen experts' weights get none from that token.
# - Finite differences in float64 check any backward to ~1e-9; torch autograd checks the whole model.
# - AdamW = Adam + decay on the weight itself; warm-up, cosine, clipping and accumulation complete the trainer.
# - The load-balancing loss acts only through the router's probabilities ($f_e$ is a count, straight-through).
#   transformers' version pools every MoE layer's rows, so it balances each expert index *summed over layers*;
#   a layer can still starve its own experts. The per-layer (Switch / GShard) version balances every layer.
# - Measured here: with the loss off, 3 of 32 layer-experts end starved (< 0.25× uniform); the pooled loss at 0.1
#   makes the pooled load uniform but leaves the layers as uneven; the per-layer loss at Qwen3's 0.001 prevents
#   starving (0.58–1.92×) and from 0.003 on holds every expert within [0.5, 1.5]× uniform. Watch the per-layer
#   load, not the loss value.
#
# ## Exercises
#
# Fill in `exercises/ch13_training.py` (`softmax_backward`, `rms_norm_backward`, `cross_entropy_backward`,
# `route_backward`, `load_balancing_loss_backward`, `adamw_step`) and run
#
# ```bash
# pytest exercises/test_ch13_training.py
# ```
#
# The last checkpoint runs the whole Qwen3-MoE backward with *your* functions inside and compares every graded
# gradient with torch's autograd.
