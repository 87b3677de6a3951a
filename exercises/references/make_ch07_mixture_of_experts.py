"""Regenerate exercises/references/ch07_mixture_of_experts.npz: what transformers computes for chapter 7's checkpoints.

    python exercises/references/make_ch07_mixture_of_experts.py   # from the repository root, with .[crosscheck] installed
    (anywhere else: pip install torch==2.13.0 transformers==5.23.0 numpy, then run it the same way)

Never imports tinyqwen: the expected values come from transformers' own Qwen3-MoE code — `Qwen3MoeTopKRouter`,
`Qwen3MoeSparseMoeBlock` (eager experts), `Qwen3MoeDecoderLayer` (which layers get experts) and
`load_balancing_loss_func` — run on seeded NumPy inputs. Known-wrong variants (a softmax over the k chosen
logits only, renormalising when the config says not to, a loss without its probability factor …) are built with
torch from the same router outputs; the graded tests use them only to recognise a classic mistake and print its
hint, never as expected values.

Keys (float32 unless said):
    route.<case>.logits [N, E]        router logits, from Qwen3MoeTopKRouter on random tokens
    route.<case>.weights [N, k], route.<case>.experts [N, k] int64    the router's top-k weights and expert ids
    route.<case>.dense [N, E]         the same as one matrix: weight of expert e for token n, 0 where not chosen
    route.<case>.{softmax_of_topk, renormalised, not_renormalised, raw_logits}   wrong variants, dense [N, E]
        cases: k2 (E 8, top-2, norm_topk_prob false), k2_norm (true), k1 (E 6, top-1, false), k3_norm (E 6, top-3)
    route.<case>.top_k, route.<case>.norm    int64 / bool scalars
    moe.<case>.{x [N, d], w_router [E, d], w_gate [E, f, d], w_up [E, f, d], w_down [E, d, f], out [N, d],
                router_logits [N, E], top_k, norm}   Qwen3MoeSparseMoeBlock (hidden 24, 6 experts of ffn 20, top-2)
    moe.<case>.{renormalised, not_renormalised}   the block with the other norm_topk_prob (wrong variant)
        cases: norm (norm_topk_prob true, N 10), plain (false, N 10)
    layers.<case>.{num_layers, num_experts, decoder_sparse_step, mlp_only_layers [m], is_moe [L] bool}
        which Qwen3MoeDecoderLayer(config, i) transformers builds with a Qwen3MoeSparseMoeBlock
    lbl.<case>.logits [n_layers, N, E], lbl.<case>.{num_experts, top_k, loss}   load_balancing_loss_func
    lbl.<case>.{loss_over_k, no_num_experts, p_of_topk_only, per_layer_mean}   wrong variants (scalars)
        cases: balanced (every expert chosen equally often, mean probability uniform: loss = top_k),
               collapsed (every token prefers experts 0 and 1), random (2 layers), top1 (3 layers, E 6, top-1)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeSparseMoeBlock,
    Qwen3MoeTopKRouter,
    load_balancing_loss_func,
)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "exercises" / "references" / "ch07_mixture_of_experts.npz"
SEED = 7007
MIN_GAP = 1e-3  # every graded token's k-th and (k+1)-th router probabilities differ by at least this much


def rng(k: int) -> np.random.Generator:
    return np.random.default_rng(SEED + k)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy().astype(np.float32)


def config(**kw) -> transformers.Qwen3MoeConfig:
    cfg = transformers.Qwen3MoeConfig(**kw)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the readable per-expert loop, not a fused kernel
    return cfg


def dense(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    # [N, k] weights at [N, k] expert ids -> [N, E]
    return torch.zeros(weights.shape[0], num_experts).scatter(1, experts, weights)


def check_gap(probs: torch.Tensor, k: int, what: str) -> None:
    top = torch.sort(probs, dim=-1, descending=True).values
    gap = float((top[:, k - 1] - top[:, k]).min())
    assert gap >= MIN_GAP, f"{what}: a top-{k} tie (gap {gap:.2e}); pick another seed"


def route_refs(out: dict) -> None:
    cases = {
        "k2": (8, 2, False, 12),
        "k2_norm": (8, 2, True, 12),
        "k1": (6, 1, False, 8),
        "k3_norm": (6, 3, True, 8),
    }
    for i, (name, (E, k, norm, N)) in enumerate(cases.items()):
        d = 16
        router = Qwen3MoeTopKRouter(
            config(hidden_size=d, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm)
        )
        g = rng(10 + i)
        x = g.normal(size=(N, d)).astype(np.float32)
        with torch.no_grad():
            router.weight.copy_(t(g.normal(0, 0.4, size=(E, d))))
            logits, weights, experts = router(t(x))
            probs = torch.softmax(logits, dim=-1)
            check_gap(probs, k, f"route.{name}")
            top_logits, top_idx = torch.topk(logits, k, dim=-1)
            assert torch.equal(top_idx, experts)
            top_probs = torch.gather(probs, 1, experts)
            p = f"route.{name}."
            out[p + "logits"] = f32(logits)
            out[p + "weights"], out[p + "experts"] = f32(weights), experts.numpy().astype(np.int64)
            out[p + "dense"] = f32(dense(weights, experts, E))
            out[p + "top_k"], out[p + "norm"] = np.array(k, dtype=np.int64), np.array(norm)
            # wrong variants, as dense matrices
            out[p + "softmax_of_topk"] = f32(dense(torch.softmax(top_logits, dim=-1), experts, E))
            out[p + "renormalised"] = f32(dense(top_probs / top_probs.sum(-1, keepdim=True), experts, E))
            out[p + "not_renormalised"] = f32(dense(top_probs, experts, E))
            out[p + "raw_logits"] = f32(dense(top_logits, experts, E))


def moe_block(E: int, k: int, norm: bool, w: dict, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    d, f = w["w_gate"].shape[2], w["w_gate"].shape[1]
    cfg = config(
        hidden_size=d, moe_intermediate_size=f, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm
    )
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(t(w["w_router"]))
        # transformers 5 keeps the experts fused: gate_up_proj [E, 2f, d] (gate rows first), down_proj [E, d, f]
        block.experts.gate_up_proj.copy_(torch.cat([t(w["w_gate"]), t(w["w_up"])], dim=1))
        block.experts.down_proj.copy_(t(w["w_down"]))
        y = block(t(x)[None])[0]
        logits = block.gate(t(x))[0]
    return y, logits


def moe_refs(out: dict) -> None:
    E, k, d, f, N = 6, 2, 24, 20, 10
    for i, (name, norm) in enumerate({"norm": True, "plain": False}.items()):
        g = rng(20 + i)
        w = {
            "w_router": g.normal(0, 0.4, size=(E, d)),
            "w_gate": g.normal(0, 0.25, size=(E, f, d)),
            "w_up": g.normal(0, 0.25, size=(E, f, d)),
            "w_down": g.normal(0, 0.3, size=(E, d, f)),
        }
        w = {key: v.astype(np.float32) for key, v in w.items()}
        x = g.normal(size=(N, d)).astype(np.float32)
        y, logits = moe_block(E, k, norm, w, x)
        check_gap(torch.softmax(logits, -1), k, f"moe.{name}")
        counts = np.bincount(torch.topk(logits, k).indices.numpy().ravel(), minlength=E)
        assert (counts > 0).all(), f"moe.{name}: an expert is never chosen; pick another seed"
        wrong, _ = moe_block(E, k, not norm, w, x)
        p = f"moe.{name}."
        for key, value in w.items():
            out[p + key] = value
        out[p + "x"], out[p + "out"], out[p + "router_logits"] = x, f32(y), f32(logits)
        out[p + "top_k"], out[p + "norm"] = np.array(k, dtype=np.int64), np.array(norm)
        out[p + ("not_renormalised" if norm else "renormalised")] = f32(wrong)


def layer_refs(out: dict) -> None:
    cases = {
        "every": (8, 4, 1, []),
        "step2": (8, 4, 2, []),
        "step3": (8, 4, 3, []),
        "fixture": (6, 8, 2, [3]),  # tests/fixtures/moe-sparse-step: MoE layers [1, 5]
        "mlp_only": (8, 4, 1, [0, 7]),
        "step2_mlp_only": (8, 4, 2, [1, 2]),
        "no_experts": (4, 0, 1, []),
        "qwen3_30b_a3b": (48, 128, 1, []),
    }
    for name, (L, E, step, mlp_only) in cases.items():
        cfg = config(
            hidden_size=4, intermediate_size=4, moe_intermediate_size=2, num_attention_heads=1, num_key_value_heads=1,
            head_dim=4, num_hidden_layers=L, num_experts=E, num_experts_per_tok=min(2, max(E, 1)),
            decoder_sparse_step=step, mlp_only_layers=list(mlp_only),
        )  # fmt: skip
        is_moe = [isinstance(Qwen3MoeDecoderLayer(cfg, i).mlp, Qwen3MoeSparseMoeBlock) for i in range(L)]
        p = f"layers.{name}."
        out[p + "num_layers"], out[p + "num_experts"] = (
            np.array(L, dtype=np.int64),
            np.array(E, dtype=np.int64),
        )
        out[p + "decoder_sparse_step"] = np.array(step, dtype=np.int64)
        out[p + "mlp_only_layers"] = np.array(mlp_only, dtype=np.int64)
        out[p + "is_moe"] = np.array(is_moe, dtype=bool)
        print(f"layers.{name}: MoE layers {[i for i, m in enumerate(is_moe) if m]}")


def lbl_variants(layers: list[torch.Tensor], E: int, k: int) -> dict[str, float]:
    """Classic wrong versions of the loss, written with torch from the same router logits."""
    probs = [torch.softmax(x, -1) for x in layers]
    chosen = [torch.zeros_like(p).scatter(1, torch.topk(p, k).indices, 1.0) for p in probs]  # [N, E] 0/1
    P, C = torch.cat(probs), torch.cat(chosen)
    f, p_mean = C.mean(0), P.mean(0)  # f sums to k over the experts
    right = float(E * (f * p_mean).sum())
    per_layer = [float(E * (c.mean(0) * q.mean(0)).sum()) for c, q in zip(chosen, probs, strict=True)]
    return {
        "loss_over_k": right / k,  # f normalised to sum to 1 (divided by k)
        "no_num_experts": right / E,  # the factor E left out
        "p_of_topk_only": float(E * (f * (P * C).mean(0)).sum()),  # P averaged over the chosen entries only
        "per_layer_mean": float(np.mean(per_layer)),  # each layer's loss, then the mean (not pooled rows)
        "_right": right,
    }


def untied_draw(shape: tuple[int, int], k: int, base: int) -> np.ndarray:
    """Random router logits from the first seed base, base+1, … whose top-k has no near-tie (see MIN_GAP)."""
    for seed in range(base, base + 100):
        x = np.random.default_rng(SEED + seed).normal(size=shape)
        top = np.sort(np.exp(x) / np.exp(x).sum(-1, keepdims=True), axis=-1)[:, ::-1]
        if (top[:, k - 1] - top[:, k]).min() >= 2 * MIN_GAP:
            return x
    raise RuntimeError(f"no untied draw of shape {shape} near seed {base}")


def lbl_refs(out: dict) -> None:
    E = 8
    idx = np.arange(16)
    # balanced: token i ranks the experts i, i+1, i+2, … (mod E): each expert is first (and second) equally often,
    # and each expert sees every rank equally often, so the mean probabilities are exactly uniform
    balanced = -0.7 * ((np.arange(E)[None, :] - idx[:, None]) % E)
    g = rng(30)
    collapsed = g.normal(0, 0.3, size=(16, E))
    collapsed[:, 0] += 5.0
    collapsed[:, 1] += 4.0
    cases = {
        "balanced": ([balanced], E, 2),
        "collapsed": ([collapsed], E, 2),
        "random": ([untied_draw((20, E), 2, 100), untied_draw((20, E), 2, 200)], E, 2),
        "top1": ([untied_draw((10, 6), 1, 300 + 100 * i) for i in range(3)], 6, 1),
    }
    for name, (layers, E_, k) in cases.items():
        tensors = tuple(t(x) for x in layers)
        for x in tensors:
            check_gap(torch.softmax(x, -1), k, f"lbl.{name}")
        loss = float(load_balancing_loss_func(tensors, E_, k))
        variants = lbl_variants(list(tensors), E_, k)
        assert abs(variants.pop("_right") - loss) < 1e-5, f"lbl.{name}: the independent formula disagrees"
        p = f"lbl.{name}."
        out[p + "logits"] = np.stack([x.astype(np.float32) for x in layers])
        out[p + "num_experts"], out[p + "top_k"] = np.array(E_, dtype=np.int64), np.array(k, dtype=np.int64)
        out[p + "loss"] = np.array(loss, dtype=np.float32)
        for key, value in variants.items():
            out[p + key] = np.array(value, dtype=np.float32)
        print(f"lbl.{name}: loss {loss:.6f}")


def main() -> None:
    out: dict[str, np.ndarray] = {}
    route_refs(out)
    moe_refs(out)
    layer_refs(out)
    lbl_refs(out)
    out["meta.versions"] = np.array(
        json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
        )
    )
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size / 1024:.0f} KiB, {len(out)} arrays)")


if __name__ == "__main__":
    main()
