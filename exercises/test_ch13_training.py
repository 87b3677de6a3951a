"""Chapter 13 checkpoints: softmax, RMSNorm, cross-entropy, routing and aux-loss backward, one AdamW step, and your backward
inside the real Qwen3-MoE.

Expected values come from torch autograd (exercises/references/ch13_training.npz, made by
exercises/references/make_ch13_training.py: `.backward()` of the forwards written in torch, torch.optim.AdamW, and
transformers' Qwen3MoeForCausalLM in train mode for the last checkpoint). The wrong variants in the same file only
name a classic mistake when your output equals one of them.

Tolerances: the formula checkpoints get float64 inputs, so 1e-9 on gradients of size ~1 (a wrong term is off by
1e-2 or more). The aux-loss gradients come from transformers' load_balancing_loss_func, which sums the router
probabilities in float32: 1e-7 on gradients of size ~1e-2 (measured 2e-9; a wrong scope or a missing 1/L
is off by 1e-3 or more). AdamW runs in float32 like torch: 1e-6 on weights of size ~1. The whole-model gradients are float32
through two layers on both sides: |Δ| ≤ 1e-4 · max |torch gradient| + 1e-8 per tensor (measured: ≤ 3e-6 of it).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from exercises.grading import FIXTURES, Mistake, call, expect_close, notebook, reference_file

REF = reference_file("ch13_training.npz")
reread = functools.partial(notebook, 13)
SOFTMAX = reread("2. Softmax backward")
RMS = reread("3. RMSNorm backward")
CE = reread("4. Cross-entropy backward")
ROUTE = reread("5. Top-k routing is straight-through")
AUX = reread("6. The load-balancing loss backward: pooled or per layer")
ADAMW = reread("8. AdamW and the schedule")
FINAL = reread("13. Checkpoint: our gradients against torch autograd")
ATOL = 1e-9


def test_softmax_backward(course):
    """Softmax backward"""
    ch = course.ch13
    what = "softmax_backward(dy, y) on a [4, 6] batch (softmax over the last axis)"
    y = np.exp(REF["softmax.x"]) / np.exp(REF["softmax.x"]).sum(-1, keepdims=True)
    got = call(ch.softmax_backward, REF["softmax.dy"], y, what=what, reread=SOFTMAX)
    expect_close(got, REF["softmax.dx"], what=what, atol=ATOL, reread=SOFTMAX, mistakes=[
        Mistake("the subtraction is missing: dy ⊙ y is only the diagonal of the Jacobian times dy",
                REF["softmax.no_subtraction"], "Every input moves every output: dx = y ⊙ (dy − Σ_j dy_j·y_j)."),
        Mistake("only the Jacobian's diagonal y(1 − y) was used", REF["softmax.diagonal_only"],
                "The off-diagonal entries −y_i·y_j matter: subtract Σ_j dy_j·y_j from dy before multiplying by y."),
        Mistake("the sum Σ_j dy_j·y_j was taken over the wrong axis", REF["softmax.wrong_axis"],
                "Sum over the softmax's own axis (the last one), with keepdims=True."),
    ])  # fmt: skip


def test_rms_norm_backward(course):
    """RMSNorm backward (dx and dweight)"""
    ch = course.ch13
    what = "rms_norm_backward(dy, x, weight, eps=1e-6) on x of shape [2, 5, 8]"
    got = call(
        ch.rms_norm_backward, REF["rms.dy"], REF["rms.x"], REF["rms.weight"], 1e-6, what=what, reread=RMS
    )
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        expect_close(
            None, REF["rms.dx"], what=what + ": expected a tuple (dx, dweight)", atol=ATOL, reread=RMS
        )
    dx, dw = got
    expect_close(dx, REF["rms.dx"], what=what + ": dx", atol=ATOL, reread=RMS, mistakes=[
        Mistake("the gradient does not flow through r = 1/rms(x): only r·(dy ⊙ weight) is left",
                REF["rms.no_chain_through_r"], "Every x_j changes r, which scales every output: subtract "
                "x̂·mean(g ⊙ x̂)."),
        Mistake("the mean of g was subtracted too, as in LayerNorm's backward", REF["rms.layernorm_style"],
                "RMSNorm never subtracted the mean in its forward, so its backward has no mean(g) term."),
    ])  # fmt: skip
    expect_close(dw, REF["rms.dweight"], what=what + ": dweight [8]", atol=ATOL, reread=RMS, mistakes=[
        Mistake("dweight sums dy ⊙ x instead of dy ⊙ x̂ (the normalised x)", REF["rms.dweight_unnormalised"],
                "The weight multiplies the normalised x̂ = x·r."),
    ])  # fmt: skip


def test_cross_entropy_backward(course):
    """Cross-entropy backward (mean over counted rows)"""
    ch = course.ch13
    what = "cross_entropy_backward(logits [6, 10], targets with one -100)"
    got = call(ch.cross_entropy_backward, REF["ce.logits"], REF["ce.targets"], what=what, reread=CE)
    expect_close(got, REF["ce.dlogits"], what=what, atol=ATOL, reread=CE, mistakes=[
        Mistake("the loss was summed, not averaged: divide by the number of counted rows", REF["ce.summed"]),
        Mistake("the -100 row was counted in the mean (divided by 6, not 5)", REF["ce.mean_over_all_rows"],
                "Ignored rows neither get a gradient nor count in the denominator."),
        Mistake("the one-hot of the target was not subtracted", REF["ce.forgot_onehot"],
                "d(−log p_target)/dz = softmax(z) − onehot(target)."),
    ])  # fmt: skip


def _route(course, case: str):
    ch = course.ch13
    p = f"route.{case}."
    norm = bool(REF[p + "norm"])
    what = f"route_backward(dweights [8, 2], router_logits [8, 6], experts, norm_topk_prob={norm})"
    got = call(ch.route_backward, REF[p + "dweights"], REF[p + "logits"], REF[p + "experts"], norm, what=what,
               reread=ROUTE)  # fmt: skip
    mistakes = [Mistake("only the chosen experts' logits got a gradient", REF[p + "chosen_only"],
                        "The softmax's denominator holds every logit: run the softmax backward over all E.")]  # fmt: skip
    if norm:
        mistakes.append(Mistake("the gradient skips the renormalisation w = p / Σ_chosen p",
                                REF[p + "not_through_renorm"], "dp_j = (dw_j − Σ_i dw_i·w_i) / S on the chosen."))  # fmt: skip
    expect_close(got, REF[p + "dlogits"], what=what, atol=ATOL, reread=ROUTE, mistakes=mistakes)


def test_route_backward_plain(course):
    """Routing backward, no renormalisation"""
    _route(course, "plain")


def test_route_backward_renormalised(course):
    """Routing backward through the renormalisation"""
    _route(course, "norm")


def _aux(course, scope: str) -> None:
    ch = course.ch13
    logits = [np.array(a) for a in REF["aux.logits"]]
    E, k = int(REF["aux.num_experts"]), int(REF["aux.top_k"])
    what = f"load_balancing_loss_backward(3 layers × router_logits [10, 6], num_experts=6, top_k=2, scope={scope!r})"
    got = call(ch.load_balancing_loss_backward, logits, E, k, scope, what=what, reread=AUX)
    got = np.stack(got) if isinstance(got, (list, tuple)) else got
    if scope == "global":
        mistakes = [
            Mistake("each layer's own f_e and P_e were used (the per-layer scope)", REF["aux.per_layer_for_global"],
                    "transformers concatenates every layer's rows into one [L·N, E] array before f_e and P_e."),
            Mistake("the means ran over one layer's N rows, not all L·N pooled rows", REF["aux.rows_of_one_layer"],
                    "Pooled, P_e is a mean over L·N rows: d P_e / d probs[n, e] = 1 / (L·N)."),
            Mistake("f_e was divided by the N·k picks instead of the N rows", REF["aux.divided_by_k"],
                    "transformers' f_e sums the k slots: picks of e / rows, so uniform routing gives aux = k."),
        ]  # fmt: skip
    else:
        mistakes = [
            Mistake("the layers were pooled (transformers' global scope)", REF["aux.global_for_layer"],
                    "scope 'layer': each layer's f_e and P_e from its own rows, then the mean of the L losses."),
            Mistake("the L layer losses were summed, not averaged", REF["aux.summed_layers"],
                    "Average them (× 1/L): the loss stays k at uniform and a coefficient means the same strength."),
        ]  # fmt: skip
    expect_close(got, REF[f"aux.{scope}"], what=what, atol=1e-7, reread=AUX, mistakes=mistakes)


def test_aux_loss_backward_pooled(course):
    """Aux-loss backward, layers pooled (transformers)"""
    _aux(course, "global")


def test_aux_loss_backward_per_layer(course):
    """Aux-loss backward, per layer and averaged"""
    _aux(course, "layer")


def test_adamw_step(course):
    """One AdamW step (decoupled decay, bias correction)"""
    ch = course.ch13
    a = {k.removeprefix("adamw."): REF[k] for k in REF if k.startswith("adamw.")}
    hyper = dict(step=int(a["step"]), lr=float(a["lr"]), beta1=float(a["beta1"]), beta2=float(a["beta2"]),
                 eps=float(a["eps"]))  # fmt: skip
    what = "adamw_step on a [3, 4] weight at step 3 (lr 0.01, betas (0.9, 0.95), weight_decay 0.1)"
    p, g, m, v = a["p"], a["g"], a["m"], a["v"]
    got = call(ch.adamw_step, p, g, m, v, what=what, reread=ADAMW,
               kwargs=hyper | {"weight_decay": float(a["weight_decay"])})  # fmt: skip
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        expect_close(None, a["p_new"], what=what + ": expected a tuple (p, m, v)", atol=1e-6, reread=ADAMW)
    expect_close(got[0], a["p_new"], what=what + ": the new weight", atol=1e-6, reread=ADAMW, mistakes=[
        Mistake("the weight decay was added to the gradient (Adam with L2), not applied to the weight",
                a["coupled_l2"], "AdamW decouples it: p ← p·(1 − lr·wd), outside Adam's scaling."),
        Mistake("the moments were not bias-corrected", a["no_bias_correction"],
                "Divide m by 1 − β1^step and v by 1 − β2^step: both started at 0."),
    ])  # fmt: skip
    expect_close(got[1], a["m_new"], what=what + ": the new first moment m", atol=1e-6, reread=ADAMW)
    expect_close(got[2], a["v_new"], what=what + ": the new second moment v", atol=1e-6, reread=ADAMW)
    got = call(ch.adamw_step, a["p1"], a["g1"], a["m1"], a["v1"], what=what + " (1-D weight, no decay)",
               reread=ADAMW, kwargs=hyper | {"weight_decay": 0.0})  # fmt: skip
    expect_close(
        got[0], a["p1_new"], what="adamw_step on a [4] weight, weight_decay 0", atol=1e-6, reread=ADAMW
    )
    for name, arr in (("p", p), ("m", m), ("v", v)):  # against a fresh copy of the stored input
        expect_close(arr, REF["adamw." + name], what=f"adamw_step must not modify its input {name}", atol=0.0,
                     reread=ADAMW)  # fmt: skip


@contextlib.contextmanager
def learner_backward(ch):
    """tinyqwen's whole-model backward with YOUR softmax, RMSNorm, cross-entropy, routing and aux-loss backward
    inside."""
    import tinyqwen.attention
    import tinyqwen.grad
    import tinyqwen.moe

    swaps = [
        (tinyqwen.attention, "softmax_backward", ch.softmax_backward),
        (tinyqwen.moe, "softmax_backward", ch.softmax_backward),
        (tinyqwen.moe, "route_backward", ch.route_backward),
        (tinyqwen.grad, "load_balancing_loss_backward", ch.load_balancing_loss_backward),
        (tinyqwen.grad, "rms_norm_backward", ch.rms_norm_backward),
        (tinyqwen.grad, "cross_entropy_backward", ch.cross_entropy_backward),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, fn in swaps:
            setattr(module, name, fn)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def test_your_backward_in_the_real_model(course):
    """Your backward inside the real Qwen3-MoE: gradients equal torch autograd"""
    import tinyqwen
    from tinyqwen import grad

    ch = course.ch13
    model = tinyqwen.load_model(FIXTURES / "moe-norm-topk")
    w = grad.copy_weights(model.weights)
    what = "the whole Qwen3-MoE fixture (moe-norm-topk), loss = CE + 0.001·aux, with your backward functions"
    with learner_backward(ch):
        r = call(grad.loss_and_grads, model.config, w, REF["model.ids"], what=what, reread=FINAL)
    expect_close(r.loss, REF["model.loss"], what=what + ": the loss", atol=1e-5, reread=FINAL)
    ours = grad.named_parameters(r.grads)
    for key in (k for k in REF if k.startswith("model.grad.")):
        name = key.removeprefix("model.grad.")
        want = REF[key]
        expect_close(ours[name], want, what=f"{what}: dL/d {name}", atol=1e-4 * np.abs(want).max() + 1e-8,
                     reread=FINAL)  # fmt: skip
