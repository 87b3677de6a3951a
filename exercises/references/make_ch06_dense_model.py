"""Regenerate exercises/references/ch06_dense_model.npz: what transformers computes for chapter 6's checkpoints.

    python exercises/references/make_ch06_dense_model.py      # from the repository root, with .[crosscheck] installed
    (anywhere else: pip install torch==2.13.0 transformers==5.23.0 numpy, then run it the same way)

Never imports tinyqwen: every expected value is computed by torch / transformers' own Qwen3 modules
(`Qwen3MLP`, `Qwen3DecoderLayer`, `Qwen3RotaryEmbedding`, `Qwen3ForCausalLM`) from seeded NumPy inputs.
The file also stores a few *known-wrong* variants (post-norm, a forgotten residual, SiLU on the wrong branch,
a forgotten final norm …), built from the same official modules wired the wrong way: the graded tests use them
only to recognise a classic mistake and print its hint, never as expected values.

Keys (float32 unless said; inputs are drawn with numpy.random.default_rng(SEED + k), one k per input):
    silu.z [53], silu.out                    torch.nn.functional.silu; z spans [-12, 12] plus ±100, ±1000
    silu.sigmoid, silu.gelu                  wrong variants: sigmoid(z), gelu(z)
    linear.x [2, 3, 6], linear.w [5, 6], linear.out [2, 3, 5]      torch.nn.functional.linear (w is [out, in])
    linear_sq.x [4, 6], linear_sq.w [6, 6], linear_sq.out, linear_sq.no_transpose (x @ w, the wrong layout)
    swiglu.{x [2, 4, 16], w_gate [40, 16], w_up [40, 16], w_down [16, 40], out}    transformers' Qwen3MLP
    swiglu.silu_on_up, swiglu.sigmoid_gate   wrong variants
    decoder.x [2, 6, 48], decoder.cos/sin [2, 6, 16], decoder.mask [2, 6, 6] bool, decoder.out,
    decoder.attn_out (the attention sublayer's output, before the residual), decoder.w.<official name>
        one Qwen3DecoderLayer (hidden 48, 4 query / 2 kv heads, head_dim 16, ffn 96, eps 1e-6), eager attention;
        row 1's positions start at 4 (as after a 4-token prefix), so RoPE angles differ between the rows
    decoder.{post_norm, no_attn_residual, no_mlp_residual, norm_in_residual, swapped_norms}   wrong variants
    forward.<fixture>.no_final_norm [2, T, V]   the fixture's logits with the final RMSNorm left out
    forward.<fixture>.embed_as_head [2, T, V]   (untied fixture only) the embedding used as the output head
    params.<model> int64                     sum of numel over the unique parameters of the model transformers
                                             builds from tinyqwen/data/configs/<model>.json (meta device)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3MLP, Qwen3RotaryEmbedding

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "exercises" / "references" / "ch06_dense_model.npz"
SEED = 6006
CONFIGS = ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-30B-A3B"]
FIXTURES = ["dense-tied", "dense-untied-bf16-sharded"]

torch.manual_seed(0)  # nothing below draws from torch, but be explicit


def rng(k: int) -> np.random.Generator:
    return np.random.default_rng(SEED + k)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy().astype(np.float32)


def silu_refs(out: dict) -> None:
    z = np.concatenate([np.linspace(-12, 12, 49), [-1000.0, -100.0, 100.0, 1000.0]]).astype(np.float32)
    out["silu.z"] = z
    out["silu.out"] = f32(torch.nn.functional.silu(t(z)))
    out["silu.sigmoid"] = f32(torch.sigmoid(t(z)))
    out["silu.gelu"] = f32(torch.nn.functional.gelu(t(z)))


def linear_refs(out: dict) -> None:
    g = rng(1)
    x, w = g.normal(size=(2, 3, 6)).astype(np.float32), g.normal(size=(5, 6)).astype(np.float32)
    out["linear.x"], out["linear.w"] = x, w
    out["linear.out"] = f32(torch.nn.functional.linear(t(x), t(w)))
    g = rng(2)
    x, w = g.normal(size=(4, 6)).astype(np.float32), g.normal(size=(6, 6)).astype(np.float32)
    out["linear_sq.x"], out["linear_sq.w"] = x, w
    out["linear_sq.out"] = f32(torch.nn.functional.linear(t(x), t(w)))
    out["linear_sq.no_transpose"] = f32(t(x) @ t(w))


def swiglu_refs(out: dict) -> None:
    cfg = transformers.Qwen3Config(hidden_size=16, intermediate_size=40, hidden_act="silu")
    mlp = Qwen3MLP(cfg).eval()
    g = rng(3)
    w = {
        "gate_proj": g.normal(0, 0.3, size=(40, 16)),
        "up_proj": g.normal(0, 0.3, size=(40, 16)),
        "down_proj": g.normal(0, 0.3, size=(16, 40)),
    }
    with torch.no_grad():
        for name, value in w.items():
            getattr(mlp, name).weight.copy_(t(value))
    x = g.normal(size=(2, 4, 16)).astype(np.float32)
    with torch.no_grad():
        y = mlp(t(x))
        gate, up = mlp.gate_proj(t(x)), mlp.up_proj(t(x))
        silu_on_up = mlp.down_proj(gate * torch.nn.functional.silu(up))
        sigmoid_gate = mlp.down_proj(torch.sigmoid(gate) * up)
    out["swiglu.x"] = x
    out["swiglu.w_gate"], out["swiglu.w_up"], out["swiglu.w_down"] = (
        w[n].astype(np.float32) for n in ("gate_proj", "up_proj", "down_proj")
    )
    out["swiglu.out"] = f32(y)
    out["swiglu.silu_on_up"] = f32(silu_on_up)
    out["swiglu.sigmoid_gate"] = f32(sigmoid_gate)


def decoder_refs(out: dict) -> None:
    cfg = transformers.Qwen3Config(
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # != 48 / 4: q_proj maps 48 -> 64
        num_hidden_layers=1,
        rms_norm_eps=1e-6,
        vocab_size=32,
        max_position_embeddings=64,
        rope_theta=10000.0,
    )
    cfg._attn_implementation = "eager"
    layer = Qwen3DecoderLayer(cfg, layer_idx=0).eval()
    g = rng(4)
    weights = {}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                value = 1.0 + 0.3 * g.normal(size=p.shape)  # norms near 1, but every one matters
            elif "o_proj" in name or "down_proj" in name:
                value = g.normal(0, 0.3, size=p.shape)
            else:
                value = g.normal(0, 0.15, size=p.shape)
            p.copy_(t(value))
            weights[name] = value.astype(np.float32)
    B, T = 2, 6
    x = g.normal(size=(B, T, 48)).astype(np.float32)
    positions = torch.tensor([list(range(T)), list(range(4, 4 + T))])
    rotary = Qwen3RotaryEmbedding(cfg)
    cos, sin = rotary(t(x), positions)
    mask = np.broadcast_to(np.tril(np.ones((T, T), dtype=bool)), (B, T, T)).copy()
    additive = torch.where(torch.from_numpy(mask)[:, None], 0.0, torch.finfo(torch.float32).min)

    def attn(h):
        return layer.self_attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=additive)[0]

    n1, n2, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
    X = t(x)
    with torch.no_grad():
        y = layer(X, attention_mask=additive, position_embeddings=(cos, sin))
        a = attn(n1(X))
        h = X + a
        # classic wrong wirings, built from the same official sublayers
        post = n1(X + attn(X))
        post = n2(post + mlp(post))
        no_attn_res = a + mlp(n2(a))
        no_mlp_res = mlp(n2(h))
        xn = n1(X)  # "x = norm(x)" overwrites the residual stream itself
        h2 = xn + attn(xn)
        norm_in_res = h2 + mlp(n2(h2))
        h3 = X + attn(n2(X))
        swapped = h3 + mlp(n1(h3))
    out["decoder.x"] = x
    out["decoder.cos"], out["decoder.sin"] = f32(cos), f32(sin)
    out["decoder.mask"] = mask
    out["decoder.positions"] = positions.numpy().astype(np.int64)
    out["decoder.out"] = f32(y)
    out["decoder.attn_out"] = f32(a)
    for name, value in weights.items():
        out[f"decoder.w.{name}"] = value
    out["decoder.post_norm"] = f32(post)
    out["decoder.no_attn_residual"] = f32(no_attn_res)
    out["decoder.no_mlp_residual"] = f32(no_mlp_res)
    out["decoder.norm_in_residual"] = f32(norm_in_res)
    out["decoder.swapped_norms"] = f32(swapped)


def forward_refs(out: dict) -> None:
    for fixture in FIXTURES:
        folder = REPO / "tests" / "fixtures" / fixture
        ref = np.load(folder / "reference.npz")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(ref["input_ids"])).logits
            # the same run, with the final RMSNorm skipped: lm_head applied to the last layer's raw output
            hidden = t(ref["hidden_states"][-1])
            no_norm = model.lm_head(hidden)
            # untied only: the embedding used as the head although the file has its own lm_head.weight
            embed_as_head = model.model.norm(hidden) @ model.model.embed_tokens.weight.T
        assert np.allclose(f32(logits), ref["logits"], atol=1e-4), (
            f"{fixture}: logits drifted from the fixture"
        )
        out[f"forward.{fixture}.no_final_norm"] = f32(no_norm)
        if not model.config.tie_word_embeddings:
            out[f"forward.{fixture}.embed_as_head"] = f32(embed_as_head)


def param_refs(out: dict) -> None:
    for name in CONFIGS:
        config = AutoConfig.from_pretrained(REPO / "tinyqwen" / "data" / "configs" / f"{name}.json")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # parameters() yields a tied parameter once; check tying did happen where the config says so
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        assert tied == bool(config.tie_word_embeddings), name
        out[f"params.{name}"] = np.array(sum(p.numel() for p in model.parameters()), dtype=np.int64)
        print(f"{name}: {int(out[f'params.{name}']):,} parameters (tied: {tied})")


def main() -> None:
    out: dict[str, np.ndarray] = {}
    silu_refs(out)
    linear_refs(out)
    swiglu_refs(out)
    decoder_refs(out)
    forward_refs(out)
    param_refs(out)
    out["meta.versions"] = np.array(
        json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
        )
    )
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size / 1024:.0f} KiB, {len(out)} arrays)")


if __name__ == "__main__":
    main()
