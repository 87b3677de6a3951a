"""Chapter 6 solutions: thin adapters onto tinyqwen's own code (tinyqwen/mlp.py, tinyqwen/model.py)."""

from __future__ import annotations

import numpy as np

from tinyqwen import mlp
from tinyqwen.backends import get_backend
from tinyqwen.config import Qwen3Config
from tinyqwen.config import count_parameters as _count_parameters
from tinyqwen.model import AttentionWeights, LayerWeights, MLPWeights, Qwen3, Weights, load_weights


def silu(z: np.ndarray) -> np.ndarray:
    return mlp.silu(z)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return mlp.linear(x, w)


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    return mlp.swiglu(x, w_gate, w_up, w_down)


def _one_layer_model(weights: dict[str, np.ndarray], hidden: int, head_dim: int, eps: float) -> Qwen3:
    """A one-layer tinyqwen model holding exactly these layer weights (the rest is never used)."""
    w = weights
    config = Qwen3Config(
        model_type="qwen3", vocab_size=1, hidden_size=hidden,
        intermediate_size=w["mlp.gate_proj.weight"].shape[0], num_hidden_layers=1,
        num_attention_heads=w["self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=w["self_attn.k_proj.weight"].shape[0] // head_dim, head_dim=head_dim,
        rms_norm_eps=eps, rope_theta=10000.0, max_position_embeddings=1, tie_word_embeddings=True,
    )  # fmt: skip
    attn = AttentionWeights(
        *(w[f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"))
    )
    layer = LayerWeights(
        input_norm=w["input_layernorm.weight"],
        attn=attn,
        post_attention_norm=w["post_attention_layernorm.weight"],
        mlp=MLPWeights(*(w[f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))),
    )
    empty = np.zeros((1, hidden), dtype=np.float32)
    return Qwen3(config, Weights(embed=empty, layers=[layer], norm=np.ones(hidden, np.float32), lm_head=empty),
                 get_backend("numpy"))  # fmt: skip


def decoder_layer(
    x: np.ndarray,
    weights: dict[str, np.ndarray],
    cos: np.ndarray,
    sin: np.ndarray,
    mask: np.ndarray,
    head_dim: int,
    eps: float,
) -> np.ndarray:
    model = _one_layer_model(weights, x.shape[-1], head_dim, eps)
    layer, k = model.weights.layers[0], model.backend
    # the two residual additions exactly as Qwen3.forward writes them
    x = x + model._attention(layer, x, cos, sin, mask, None, 0)
    h = k.rms_norm(x, layer.post_attention_norm, eps)
    return x + k.swiglu(h, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)


class _DictCheckpoint:
    """The three methods of tinyqwen.checkpoint.Checkpoint that load_weights uses, over a dict of arrays."""

    path = "weights"

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights

    def keys(self) -> set[str]:
        return set(self.weights)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.weights[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self.weights[name]


def lm_head_weight(weights: dict[str, np.ndarray], tie_word_embeddings: bool) -> np.ndarray:
    # tinyqwen.model.load_weights: `lm_head = embed if config.tie_word_embeddings else get("lm_head.weight")`
    return weights["model.embed_tokens.weight"] if tie_word_embeddings else weights["lm_head.weight"]


def forward(ids: np.ndarray, weights: dict[str, np.ndarray], config: Qwen3Config) -> np.ndarray:
    model = Qwen3(
        config, load_weights(_DictCheckpoint(weights), config, progress=False), get_backend("numpy")
    )
    return model(ids)


def count_parameters(config: Qwen3Config) -> int:
    return _count_parameters(config)
