"""Regenerate exercises/references/ch13_training.npz: what torch autograd computes for chapter 13's checkpoints.

    python exercises/references/make_ch13_training.py   # from the repository root, with .[crosscheck] installed
    (anywhere else: pip install torch==2.13.0 transformers==5.23.0 numpy, then run it the same way)

Never imports tinyqwen: every expected gradient is torch's autograd (`.backward()`) of the forward written in
torch — softmax, RMSNorm as transformers' Qwen3RMSNorm computes it, F.cross_entropy with ignore_index=-100,
transformers' Qwen3MoeTopKRouter (softmax → top-k → renormalise), torch.optim.AdamW for one step — and, for the
last checkpoint, transformers' Qwen3MoeForCausalLM on the moe-norm-topk fixture in train mode. Known-wrong variants
(a softmax backward without its subtraction, a LayerNorm-style backward, a summed instead of averaged loss, coupled
L2 decay …) are computed from the same inputs with torch; the graded tests use them only to recognise a classic
mistake and print its hint, never as expected values.

Keys (float32 unless said; float64 inputs are used where the check is of a formula, so the tolerance can be tight):
    softmax.{x, dy, dx} [4, 6] float64, softmax.{no_subtraction, diagonal_only, wrong_axis}
    rms.{x [2, 5, 8], weight [8], dy, dx, dweight} float64, eps 1e-6; rms.{no_chain_through_r, layernorm_style,
        dweight_unnormalised}
    ce.{logits [6, 10], targets [6] int64 (one -100), dlogits} float64; ce.{summed, mean_over_all_rows,
        forgot_onehot}
    route.<case>.{logits [N, E], experts [N, k] int64, dweights [N, k], dlogits [N, E]} float64,
        cases: norm (top-2 of 6, renormalised), plain (top-2 of 6, not renormalised);
        route.<case>.{chosen_only, not_through_renorm}
    adamw.{p, g, m, v} [3, 4] and [4] (1-D), adamw.{step, lr, beta1, beta2, eps, weight_decay} scalars,
        adamw.{p_new, m_new, v_new} (matrix) and adamw.{p1_new} (the 1-D weight: no decay);
        adamw.{coupled_l2, no_bias_correction}
    aux.logits [3, 10, 6] float64 (3 MoE layers' router logits, top-2 of 6), aux.global [3, 10, 6] = d/d logits of
        transformers' load_balancing_loss_func (the layers pooled), aux.layer = of the mean over layers of that
        function called on each layer alone (the per-layer "Switch / GShard" scope); aux.{per_layer_for_global,
        rows_of_one_layer, divided_by_k, global_for_layer, summed_layers}
    model.ids [2, 12] int64, model.loss, model.ce, model.aux (float64 scalars);
        model.grad.<name> for a selection of parameters (official names; experts stacked [E, ...])
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "exercises" / "references" / "ch13_training.npz"
SEED = 13013


def rng(k: int) -> np.random.Generator:
    return np.random.default_rng(SEED + k)


def grad_of(fn, *inputs: np.ndarray) -> list[np.ndarray]:
    ts = [torch.tensor(a, requires_grad=True) for a in inputs]
    fn(*ts).backward()
    return [t.grad.numpy() for t in ts]


def softmax_refs(out: dict) -> None:
    g = rng(1)
    x, dy = g.normal(size=(4, 6)), g.normal(size=(4, 6))
    (dx,) = grad_of(lambda t: (torch.tensor(dy) * torch.softmax(t, -1)).sum(), x)
    y = torch.softmax(torch.tensor(x), -1).numpy()
    out |= {"softmax.x": x, "softmax.dy": dy, "softmax.dx": dx,
            "softmax.no_subtraction": y * dy,
            "softmax.diagonal_only": dy * y * (1 - y),
            "softmax.wrong_axis": y * (dy - (dy * y).sum(0, keepdims=True))}  # fmt: skip


def rms_torch(x, w, eps):  # transformers' Qwen3RMSNorm
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def rms_refs(out: dict) -> None:
    g = rng(2)
    x, w, dy = g.normal(size=(2, 5, 8)), 1 + 0.3 * g.normal(size=8), g.normal(size=(2, 5, 8))
    eps = 1e-6
    dx, dw = grad_of(lambda a, b: (torch.tensor(dy) * rms_torch(a, b, eps)).sum(), x, w)
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xh, gg = x * r, dy * w
    out |= {"rms.x": x, "rms.weight": w, "rms.dy": dy, "rms.dx": dx, "rms.dweight": dw, "rms.eps": np.float64(eps),
            "rms.no_chain_through_r": r * gg,
            "rms.layernorm_style": r * (gg - gg.mean(-1, keepdims=True) - xh * (gg * xh).mean(-1, keepdims=True)),
            "rms.dweight_unnormalised": (dy * x).reshape(-1, 8).sum(0)}  # fmt: skip


def ce_refs(out: dict) -> None:
    g = rng(3)
    logits = g.normal(size=(6, 10)) * 2
    targets = np.array([3, 9, -100, 0, 5, 3], dtype=np.int64)
    (d,) = grad_of(lambda t: F.cross_entropy(t, torch.tensor(targets), ignore_index=-100), logits)
    p = torch.softmax(torch.tensor(logits), -1).numpy()
    onehot = np.zeros_like(p)
    keep = targets != -100
    onehot[np.arange(6)[keep], targets[keep]] = 1
    raw = (p - onehot) * keep[:, None]
    out |= {"ce.logits": logits, "ce.targets": targets, "ce.dlogits": d, "ce.summed": raw,
            "ce.mean_over_all_rows": raw / 6, "ce.forgot_onehot": p * keep[:, None] / keep.sum()}  # fmt: skip


def route_refs(out: dict) -> None:
    for k, (case, norm) in enumerate((("norm", True), ("plain", False))):
        g = rng(10 + k)
        N, E, top_k = 8, 6, 2
        while True:  # clear gaps between the k-th and (k+1)-th probability: the choice is unambiguous
            logits = g.normal(size=(N, E)) * 1.5
            p = np.sort(torch.softmax(torch.tensor(logits), -1).numpy(), -1)
            if (p[:, -top_k] - p[:, -top_k - 1]).min() > 1e-3:
                break
        dweights = g.normal(size=(N, top_k))

        def weights(t, renorm=norm, top_k=top_k):  # transformers' Qwen3MoeTopKRouter after the linear
            probs = torch.softmax(t, dim=-1, dtype=torch.float64)
            top, idx = torch.topk(probs, top_k, dim=-1)
            if renorm:
                top = top / top.sum(-1, keepdim=True)
            return top, idx

        (d,) = grad_of(lambda t, dw=dweights: (torch.tensor(dw) * weights(t)[0]).sum(), logits)
        _, idx = weights(torch.tensor(logits))
        probs = torch.softmax(torch.tensor(logits), -1)
        # wrong: the gradient of the chosen weights w.r.t. their own logits only (as if the softmax had no denominator)
        dw_probs = torch.zeros(N, E, dtype=torch.float64)
        top = torch.gather(probs, 1, idx)
        dchosen = torch.tensor(dweights)
        if norm:
            s = top.sum(-1, keepdim=True)
            dchosen = (dchosen - (dchosen * top / s).sum(-1, keepdim=True)) / s
        dw_probs.scatter_(1, idx, dchosen)
        chosen_only = (dw_probs * probs * (dw_probs != 0)).numpy()
        # wrong: renormalised forward, but the backward treats w = p (skips the division's chain rule)
        dp = torch.zeros(N, E, dtype=torch.float64).scatter_(1, idx, torch.tensor(dweights))
        not_through = (probs * (dp - (dp * probs).sum(-1, keepdim=True))).numpy()
        out |= {f"route.{case}.logits": logits, f"route.{case}.experts": idx.numpy(),
                f"route.{case}.dweights": dweights, f"route.{case}.dlogits": d,
                f"route.{case}.chosen_only": chosen_only, f"route.{case}.not_through_renorm": not_through,
                f"route.{case}.norm": np.bool_(norm)}  # fmt: skip


def adamw_refs(out: dict) -> None:
    g = rng(20)
    p, grad = g.normal(size=(3, 4)).astype(np.float32), g.normal(size=(3, 4)).astype(np.float32)
    m, v = (0.1 * g.normal(size=(3, 4))).astype(np.float32), (0.05 * g.random(size=(3, 4))).astype(np.float32)
    p1, g1 = g.normal(size=4).astype(np.float32), g.normal(size=4).astype(np.float32)
    m1, v1 = (0.1 * g.normal(size=4)).astype(np.float32), (0.05 * g.random(size=4)).astype(np.float32)
    step, lr, b1, b2, eps, wd = 3, 0.01, 0.9, 0.95, 1e-8, 0.1

    def torch_step(opt_cls, pp, gg, mm, vv, decay):
        t = torch.nn.Parameter(torch.tensor(pp))
        opt = opt_cls([t], lr=lr, betas=(b1, b2), eps=eps, weight_decay=decay)
        # the state after `step - 1` earlier steps: the moments given, the step counter at step - 1
        opt.state[t] = {"step": torch.tensor(float(step - 1)), "exp_avg": torch.tensor(mm),
                        "exp_avg_sq": torch.tensor(vv)}  # fmt: skip
        t.grad = torch.tensor(gg)
        opt.step()
        s = opt.state[t]
        return t.detach().numpy().copy(), s["exp_avg"].numpy().copy(), s["exp_avg_sq"].numpy().copy()

    p_new, m_new, v_new = torch_step(torch.optim.AdamW, p, grad, m, v, wd)
    p1_new, _, _ = torch_step(torch.optim.AdamW, p1, g1, m1, v1, 0.0)  # 1-D weights are not decayed
    coupled, _, _ = torch_step(torch.optim.Adam, p, grad, m, v, wd)  # L2 added to the gradient
    mm = b1 * m + (1 - b1) * grad
    vv = b2 * v + (1 - b2) * grad * grad
    no_bias = p * (1 - lr * wd) - lr * mm / (np.sqrt(vv) + eps)
    out |= {"adamw.p": p, "adamw.g": grad, "adamw.m": m, "adamw.v": v, "adamw.p1": p1, "adamw.g1": g1,
            "adamw.m1": m1, "adamw.v1": v1, "adamw.step": np.int64(step), "adamw.lr": np.float64(lr),
            "adamw.beta1": np.float64(b1), "adamw.beta2": np.float64(b2), "adamw.eps": np.float64(eps),
            "adamw.weight_decay": np.float64(wd), "adamw.p_new": p_new, "adamw.m_new": m_new,
            "adamw.v_new": v_new, "adamw.p1_new": p1_new, "adamw.coupled_l2": coupled,
            "adamw.no_bias_correction": no_bias.astype(np.float32)}  # fmt: skip


def aux_refs(out: dict) -> None:
    g = rng(40)
    E, k, L = 6, 2, 3
    # each layer prefers other experts, so the pooled load is more even than any one layer's
    logits = [g.normal(size=(10, E)) + 1.5 * np.eye(E)[[2 * i, 2 * i + 1]].sum(0) for i in range(L)]

    def pooled(*ts):  # transformers: every layer's rows concatenated before f_e and P_e
        return load_balancing_loss_func(tuple(ts), E, k)

    def per_layer(*ts):  # each layer's own loss, averaged over layers
        return sum(load_balancing_loss_func((t,), E, k) for t in ts) / len(ts)

    d_global, d_layer = np.stack(grad_of(pooled, *logits)), np.stack(grad_of(per_layer, *logits))
    out |= {"aux.logits": np.stack(logits), "aux.num_experts": np.int64(E), "aux.top_k": np.int64(k),
            "aux.global": d_global, "aux.layer": d_layer,
            "aux.per_layer_for_global": d_layer, "aux.rows_of_one_layer": L * d_global,
            "aux.divided_by_k": d_global / k, "aux.global_for_layer": d_global, "aux.summed_layers": L * d_layer}  # fmt: skip


GRADED = [  # a selection of parameters whose gradients the last checkpoint compares (keeps the file small)
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.0.self_attn.k_norm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.gate.weight",
    "model.layers.1.mlp.gate.weight",
    "model.layers.1.mlp.experts.down_proj",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
]


def model_refs(out: dict) -> None:
    folder = REPO / "tests" / "fixtures" / "moe-norm-topk"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.train()
    ids = rng(30).integers(0, 512, size=(2, 12))
    t = torch.from_numpy(ids)
    res = model(input_ids=t, labels=t, output_router_logits=True)
    res.loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    out |= {"model.ids": ids, "model.loss": np.float64(res.loss.item()), "model.aux": np.float64(res.aux_loss.item()),
            "model.ce": np.float64(res.loss.item() - model.config.router_aux_loss_coef * res.aux_loss.item())}  # fmt: skip
    for name in GRADED:
        out["model.grad." + name] = grads[name]


def main() -> int:
    torch.manual_seed(0)
    out: dict[str, np.ndarray] = {}
    for make in (softmax_refs, rms_refs, ce_refs, route_refs, aux_refs, adamw_refs, model_refs):
        make(out)
    np.savez_compressed(OUT, **{k: np.asarray(v) for k, v in out.items()})
    print(f"wrote {OUT.relative_to(REPO)}: {len(out)} arrays, {OUT.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
