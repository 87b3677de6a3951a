"""Chapter 7 checkpoints: routing, the sparse MoE block, which layers are MoE, the load-balancing loss.

Expected values come from transformers (exercises/references/ch07_mixture_of_experts.npz, made by
exercises/references/make_ch07_mixture_of_experts.py from Qwen3MoeTopKRouter, Qwen3MoeSparseMoeBlock,
Qwen3MoeDecoderLayer and load_balancing_loss_func; and the MoE fixtures' reference.npz). The wrong variants in the
same file only name a classic mistake when your output equals one of them.

Routing is graded as an [N, E] matrix (the weight of expert e for token n, 0 where not chosen), so the order of
the k slots is free. Every graded token's k-th and (k+1)-th probabilities differ by at least 1e-3 (no ties).
Tolerances: 1e-6 on routing weights (≤ 1), 1e-5 on block outputs and router logits (size ~1-5) and on the loss
(size 1-8, plus 1e-6 relative), 1e-4 on router logits (grading.LOGITS_ATOL); whole-model logits: grading.expect_logits
(|Δ| <= 1e-5 · max(1, max |logit|)).
"""

from __future__ import annotations

import functools

import numpy as np

from exercises.grading import (
    LOGITS_ATOL,
    GradeError,
    Mistake,
    call,
    expect_close,
    expect_equal,
    expect_logits,
    learner_model,
    notebook,
    reference,
    reference_file,
)

REF = reference_file("ch07_mixture_of_experts.npz")
# reread("...") -> 'notebooks/07-mixture-of-experts.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 7)
ROUTER = reread("2.1 Softmax first, then top-k")
BLOCK = reread("3. The sparse block")
LAYERS = reread("4. Which layers have experts?")
LOSS = reread("5. The load-balancing loss")
FINAL = reread("7. Checkpoint: our mixture of experts against transformers")


def _fail(what: str, problem: str, reread: str) -> None:
    raise GradeError(f"{what}\n  {problem}\n  re-read: {reread}")


def _pair(got, what: str, n_out: int, reread: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != n_out:
        _fail(what, f"expected a tuple of {n_out} arrays, got {type(got).__name__}", reread)
    return tuple(got)


def _dense_routing(got, N: int, E: int, k: int, what: str) -> np.ndarray:
    """Your (weights [N, k], experts [N, k]) as one [N, E] matrix, after checking shapes and expert ids."""
    weights, experts = (np.asarray(a) for a in _pair(got, what, 2, ROUTER))
    for name, a in (("weights", weights), ("experts", experts)):
        if a.shape != (N, k):
            extra = f" (top_k = {k}: k experts per token)" if a.ndim == 2 and a.shape[0] == N else ""
            _fail(what, f"{name} should have shape [{N}, {k}]{extra}, got {list(a.shape)}", ROUTER)
    if experts.dtype.kind not in "iu":
        _fail(what, f"experts should be integer expert ids, got dtype {experts.dtype}", ROUTER)
    if experts.min() < 0 or experts.max() >= E:
        _fail(
            what, f"expert ids must lie in [0, {E}), got {int(experts.min())}..{int(experts.max())}", ROUTER
        )
    if any(len(set(row)) < k for row in experts.tolist()):
        _fail(
            what,
            "a token chose the same expert twice: the top-k experts of a token are k different ones",
            ROUTER,
        )
    dense = np.zeros((N, E), dtype=np.float64)
    np.put_along_axis(dense, experts.astype(np.int64), weights.astype(np.float64), axis=1)
    return dense


def _grade_route(course, case: str, mistakes: list[Mistake]) -> None:
    p = f"route.{case}."
    logits, k, norm = REF[p + "logits"], int(REF[p + "top_k"]), bool(REF[p + "norm"])
    N, E = logits.shape
    what = (
        f"route(logits [{N}, {E}], top_k={k}, norm_topk_prob={norm}) against transformers' Qwen3MoeTopKRouter"
    )
    got = call(course.ch07.route, logits.copy(), k, norm, reread=ROUTER, what=what)
    expect_close(_dense_routing(got, N, E, k, what), REF[p + "dense"], what=what + " (as an [N, E] weight matrix)",
                 atol=1e-6, mistakes=mistakes, reread=ROUTER,
                 inputs=f"router logits [{N}, {E}] of {N} tokens, {E} experts")  # fmt: skip


def _smallest(case: str) -> Mistake:
    """The k SMALLEST probabilities chosen (an ascending sort, read from the wrong end), derived by hand."""
    p = f"route.{case}."
    logits, k, norm = REF[p + "logits"].astype(np.float64), int(REF[p + "top_k"]), bool(REF[p + "norm"])
    probs = _softmax(logits)
    low = np.argsort(probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, low, axis=-1)
    if norm:
        weights = weights / weights.sum(-1, keepdims=True)
    dense = np.zeros_like(probs)
    np.put_along_axis(dense, low, weights, axis=1)
    return Mistake("the k experts with the SMALLEST probabilities were chosen (sorted ascending)", dense,
                   "np.argsort sorts ascending: take the last k (or argsort(-probs)), the largest first.")  # fmt: skip


def _raw(case: str) -> Mistake:
    return Mistake("the weights are raw router logits, not probabilities", REF[f"route.{case}.raw_logits"],
                   "Take the softmax over all E experts first, then pick the top k.")  # fmt: skip


# ------------------------------------------------------------------------------------------ routing


def test_route(course):
    """Routing: softmax over all experts, then top-k"""
    _grade_route(course, "k2", [
        Mistake("the weights sum to 1 although norm_topk_prob is False: they were renormalised, or the softmax was "
                "taken over the k chosen logits only (the same thing)", REF["route.k2.renormalised"],
                "Without norm_topk_prob the weights are the plain probabilities of a softmax over ALL experts."),
        _raw("k2"), _smallest("k2"),
    ])  # fmt: skip


def test_route_renormalised(course):
    """Routing with norm_topk_prob: the k weights sum to 1"""
    _grade_route(course, "k2_norm", [
        Mistake("the top-k weights were not renormalised", REF["route.k2_norm.not_renormalised"],
                "With norm_topk_prob, divide each token's k weights by their sum."),
        _raw("k2_norm"), _smallest("k2_norm"),
    ])  # fmt: skip


def test_route_other_k(course):
    """Routing with top_k = 1 and top_k = 3"""
    _grade_route(course, "k1", [
        Mistake("the weight was renormalised although norm_topk_prob is False (top-1: every weight became 1)",
                REF["route.k1.renormalised"], "Keep the plain probability when norm_topk_prob is False."),
        _raw("k1"), _smallest("k1"),
    ])  # fmt: skip
    _grade_route(course, "k3_norm", [
        Mistake("the top-k weights were not renormalised", REF["route.k3_norm.not_renormalised"]), _raw("k3_norm"),
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------ the block


def _grade_block(course, case: str, mistakes: list[Mistake]) -> None:
    p = f"moe.{case}."
    args = [REF[p + key].copy() for key in ("x", "w_router", "w_gate", "w_up", "w_down")]
    k, norm = int(REF[p + "top_k"]), bool(REF[p + "norm"])
    what = f"moe_block(top_k={k}, norm_topk_prob={norm}) against transformers' Qwen3MoeSparseMoeBlock"
    inputs = "x [10, 24], 6 experts of width 20, w_gate/w_up [6, 20, 24], w_down [6, 24, 20]"
    out, logits = _pair(call(course.ch07.moe_block, *args, k, norm, reread=BLOCK, what=what), what, 2, BLOCK)
    want_logits = REF[p + "router_logits"]
    expect_close(logits, want_logits, what=what + ": the router logits (second output)", atol=1e-5, reread=BLOCK,
                 inputs=inputs, mistakes=[Mistake("you returned the router probabilities instead of its logits",
                                                  lambda: _softmax(want_logits), "Return x @ w_router.T itself.")])  # fmt: skip
    expect_close(out, REF[p + "out"], what=what + ": the output", atol=1e-5, reread=BLOCK, inputs=inputs,
                 mistakes=mistakes)  # fmt: skip


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_moe_block(course):
    """The sparse block against transformers (norm_topk_prob = True)"""
    _grade_block(course, "norm", [
        Mistake("the top-k weights were not renormalised", REF["moe.norm.not_renormalised"],
                "norm_topk_prob is True: divide each token's k weights by their sum."),
    ])  # fmt: skip


def test_moe_block_plain(course):
    """The sparse block with norm_topk_prob = False"""
    _grade_block(course, "plain", [
        Mistake("the top-k weights were renormalised although norm_topk_prob is False (or the softmax was taken over "
                "the k chosen logits only)", REF["moe.plain.renormalised"],
                "Keep the plain softmax probabilities over all experts."),
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------ which layers


def test_is_moe_layer(course):
    """Which layers have experts: decoder_sparse_step and mlp_only_layers"""
    names = ["fixture"] + sorted({k.split(".")[1] for k in REF if k.startswith("layers.")} - {"fixture"})
    for name in names:
        p = f"layers.{name}."
        L, E, step = (int(REF[p + key]) for key in ("num_layers", "num_experts", "decoder_sparse_step"))
        only = [int(i) for i in REF[p + "mlp_only_layers"]]
        what = "is_moe_layer for every layer of a config against transformers' Qwen3MoeDecoderLayer"
        got = [
            call(course.ch07.is_moe_layer, i, E, step, list(only), reread=LAYERS, what=what) for i in range(L)
        ]
        got = [bool(g) if isinstance(g, (bool, np.bool_)) else g for g in got]
        want = REF[p + "is_moe"].tolist()
        expect_equal(
            got, want, what=what, reread=LAYERS,
            inputs=f"{L} layers, num_experts={E}, decoder_sparse_step={step}, mlp_only_layers={only}",
            mistakes=[
                Mistake("the sparse step is off by one: layer % step == 0 instead of (layer + 1) % step == 0",
                        [E > 0 and i not in only and i % step == 0 for i in range(L)],
                        "transformers: (layer_idx + 1) % decoder_sparse_step == 0 — with step 2, layers 1, 3, 5."),
                Mistake("mlp_only_layers is ignored", [E > 0 and (i + 1) % step == 0 for i in range(L)],
                        "A layer listed in mlp_only_layers is always dense."),
                Mistake("a model with num_experts = 0 still gets MoE layers",
                        [i not in only and (i + 1) % step == 0 for i in range(L)], "No experts: every layer is dense."),
            ],
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ the loss


def _loss_variant(
    case: str, *, top1_f: bool = False, p_of_logits: bool = False, f_counts: bool = False
) -> float:
    """A classic wrong load-balancing loss, derived by hand: transformers' formula E · Σ_e f_e · P_e over the pooled
    rows (f_e: the share of rows whose top-k include e; P_e: the mean probability of e) with one thing changed."""
    p = f"lbl.{case}."
    E, k = int(REF[p + "num_experts"]), int(REF[p + "top_k"])
    logits = np.concatenate([np.asarray(r, np.float64).reshape(-1, E) for r in REF[p + "logits"]])
    probs = _softmax(logits)
    chosen = np.zeros_like(probs)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, : 1 if top1_f else k]
    np.put_along_axis(chosen, top, 1.0, axis=1)
    f = chosen.sum(0) if f_counts else chosen.mean(0)
    P = logits.mean(0) if p_of_logits else probs.mean(0)
    return float(E * np.sum(f * P))


# every classic loss mistake: cause -> (its value on a case, hint)
LOSS_MISTAKES: dict[str, tuple] = {
    "f_e was normalised to sum to 1 (divided by top_k)": (
        lambda case: REF[f"lbl.{case}.loss_over_k"],
        "f_e is the share of rows whose top-k include e: it sums to top_k, and even routing scores top_k."),
    "f_e counts only each token's first choice (Switch Transformer's top-1 form)": (
        lambda case: _loss_variant(case, top1_f=True),
        "Qwen3 (like Mixtral, GShard-style) counts every one of the top_k choices: f_e is the share of rows "
        "whose top-k include e."),
    "the factor num_experts is missing (or a mean over experts where the formula sums)": (
        lambda case: REF[f"lbl.{case}.no_num_experts"], "The loss is E · Σ_e f_e · P_e: a sum over experts, times E."),
    "P_e was averaged over the chosen (top-k) probabilities only": (
        lambda case: REF[f"lbl.{case}.p_of_topk_only"],
        "P_e is the mean of the full softmax probability of e over all rows, chosen or not."),
    "P_e was averaged from the router LOGITS, not the probabilities": (
        lambda case: _loss_variant(case, p_of_logits=True), "Take the softmax over all experts first: P_e is a "
        "mean probability."),
    "f_e was summed over the rows, not averaged (counts instead of shares)": (
        lambda case: _loss_variant(case, f_counts=True), "f_e = (rows choosing e) / (all rows): a mean, not a sum."),
    "each layer's loss was computed separately and averaged": (
        lambda case: REF[f"lbl.{case}.per_layer_mean"],
        "Pool all layers' rows first (as transformers does), then compute f and P once."),
}  # fmt: skip


def _same_loss(a, b) -> bool:
    try:
        return bool(np.isclose(float(a), float(b), atol=1e-4, rtol=1e-5))
    except (TypeError, ValueError):
        return False


def _loss_mistakes(course, case: str, got, what: str) -> list[Mistake]:
    """The classic mistakes to name for this output. When several give this very number (a balanced router makes
    many of them equal), the learner's function also runs on a second, unbalanced router, and only the mistakes
    that match there too are named."""
    matching = [c for c, (value, _) in LOSS_MISTAKES.items() if _same_loss(got, value(case))]
    if len(matching) > 1:
        probe = "random" if case != "random" else "collapsed"
        p = f"lbl.{probe}."
        again = call(course.ch07.load_balancing_loss, [layer.copy() for layer in REF[p + "logits"]],
                     int(REF[p + "num_experts"]), int(REF[p + "top_k"]), reread=LOSS, what=what)  # fmt: skip
        told = [c for c in matching if _same_loss(again, LOSS_MISTAKES[c][0](probe))]
        matching = told or matching
    return [Mistake(c, LOSS_MISTAKES[c][0](case), LOSS_MISTAKES[c][1]) for c in matching]


def _grade_loss(course, case: str) -> None:
    p = f"lbl.{case}."
    logits, E, k = REF[p + "logits"], int(REF[p + "num_experts"]), int(REF[p + "top_k"])
    what = f"load_balancing_loss ({case} router) against transformers' load_balancing_loss_func"
    got = call(
        course.ch07.load_balancing_loss, [layer.copy() for layer in logits], E, k, reread=LOSS, what=what
    )
    want = REF[p + "loss"]
    mistakes = [] if _same_loss(got, want) else _loss_mistakes(course, case, got, what)
    expect_close(
        got, want, what=what, atol=1e-5, rtol=1e-6, reread=LOSS, mistakes=mistakes,
        inputs=f"{len(logits)} layer(s) of router logits [{logits.shape[1]}, {E}], top_k={k}",
    )  # fmt: skip


def test_load_balancing_loss(course):
    """The load-balancing loss: a balanced and a collapsed router"""
    _grade_loss(course, "balanced")
    _grade_loss(course, "collapsed")


def test_load_balancing_loss_layers(course):
    """The load-balancing loss pooled over layers, and the fixtures' aux_loss"""
    _grade_loss(course, "random")
    _grade_loss(course, "top1")
    for fixture in ("moe-norm-topk", "moe-sparse-step"):
        ref = reference(fixture)
        E, k = ref["router_logits"].shape[-1], 2
        what = f"load_balancing_loss on the router logits of fixture {fixture} against transformers' aux_loss"
        got = call(
            course.ch07.load_balancing_loss,
            [r.copy() for r in ref["router_logits"]],
            E,
            k,
            reread=LOSS,
            what=what,
        )
        expect_close(got, ref["aux_loss"], what=what, atol=1e-5, rtol=1e-6, reread=LOSS,
                     inputs=f"{len(ref['router_logits'])} MoE layers × {ref['router_logits'].shape[1]} tokens, E={E}, top_k={k}")  # fmt: skip


# ------------------------------------------------------------------------------------------ the real model


def test_real_model(course):
    """Your code in the real model: both MoE fixtures"""
    for fixture in ("moe-norm-topk", "moe-sparse-step"):
        model = learner_model(course, upto=7, fixture=fixture)
        what = f"the fixture {fixture} running your moe_block (and your code of chapters 2-6)"
        expect_logits(model, fixture, what=what, reread=FINAL)
        ref = reference(fixture)
        _, router = model(ref["input_ids"], return_router_logits=True)
        expect_close(
            np.stack([np.asarray(r) for r in router]),
            ref["router_logits"],
            atol=LOGITS_ATOL,
            reread=FINAL,
            what=f"{what}: the router logits of its MoE layers {ref['moe_layer_indices'].tolist()}",
        )
