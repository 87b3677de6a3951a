"""Chapter 6 — SwiGLU, the decoder block and the whole dense model: your implementation.

Work through notebooks/06-dense-model.ipynb, then fill in the functions below in order (each replaces a
`raise NotImplementedError`) and grade them with

    pytest exercises/test_ch06_dense_model.py

Weights come exactly as a checkpoint file names them (a dict such as {"model.embed_tokens.weight": [vocab, hidden],
...}), every array float32, every weight matrix in the file's [out, in] layout.

The pieces of chapters 3-5 are imported from tinyqwen below, so this chapter stands on its own. Once your own
versions pass their chapters, import them from `exercises.ch03_...` etc. instead if you like: the last checkpoint of
this chapter runs YOUR rms_norm, apply_rope and attention (chapters 3-5) and YOUR swiglu and linear (this file)
inside the real model anyway.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.attention import attention, causal_mask  # noqa: F401  (chapter 5)
from tinyqwen.config import Qwen3Config
from tinyqwen.norm import rms_norm  # noqa: F401  (chapter 3)
from tinyqwen.rope import apply_rope, rope_cos_sin, rope_parameters  # noqa: F401  (chapter 4)


def silu(z: np.ndarray) -> np.ndarray:
    """SiLU (a.k.a. swish), element-wise: silu(z) = z · sigmoid(z) = z / (1 + exp(-z)).  [...] -> [...]

    It must survive extreme inputs without NaN: silu(-1000) is 0 (or -0.0) and silu(1000) is 1000.

    >>> silu(np.array([0.0, 1.0, -1.0, 2.0], dtype=np.float32)).round(4)
    array([ 0.    ,  0.7311, -0.2689,  1.7616], dtype=float32)
    """
    raise NotImplementedError


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A linear layer without bias, with the weight as checkpoints store it.  [..., d_in], [d_out, d_in] -> [..., d_out]

    Row j of `w` holds the weights of output channel j (PyTorch's nn.Linear layout), so y = x · wᵀ.

    >>> linear(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))   # w is [3, 2]
    array([[1., 2., 3.]])
    """
    raise NotImplementedError


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """Qwen3's feed-forward network: down( silu(gate(x)) * up(x) ).

    Shapes: x [..., d], w_gate [f, d], w_up [f, d], w_down [d, f] -> [..., d]  (any number of leading axes).

    Worked example, d = 1 and f = 2: x = [2], w_gate = [[1], [-1]], w_up = [[1], [1]], w_down = [[1, 1]].
    gate = [2, -2], silu(gate) = [1.7616, -0.2384], up = [2, 2], product = [3.5232, -0.4768], down: 3.0464.

    >>> swiglu(np.array([2.0]), np.array([[1.0], [-1.0]]), np.array([[1.0], [1.0]]), np.array([[1.0, 1.0]])).round(4)
    array([3.0464])
    """
    raise NotImplementedError


def decoder_layer(
    x: np.ndarray,
    weights: dict[str, np.ndarray],
    cos: np.ndarray,
    sin: np.ndarray,
    mask: np.ndarray,
    head_dim: int,
    eps: float,
) -> np.ndarray:
    """One Qwen3 decoder layer (pre-norm):  h = x + attn(RMSNorm₁(x));  out = h + SwiGLU(RMSNorm₂(h)).

    x:       [B, T, hidden]  the residual stream entering the layer
    weights: this layer's tensors by their official names without the "model.layers.{i}." prefix:
             "input_layernorm.weight" [hidden], "post_attention_layernorm.weight" [hidden],
             "self_attn.q_proj.weight" [Hq·head_dim, hidden], "self_attn.k_proj.weight" [Hkv·head_dim, hidden],
             "self_attn.v_proj.weight" [Hkv·head_dim, hidden], "self_attn.o_proj.weight" [hidden, Hq·head_dim],
             "self_attn.q_norm.weight" [head_dim], "self_attn.k_norm.weight" [head_dim],
             "mlp.gate_proj.weight" [f, hidden], "mlp.up_proj.weight" [f, hidden], "mlp.down_proj.weight" [hidden, f]
    cos, sin: [B, T, head_dim]  the RoPE tables of each position (chapter 4)
    mask:    [B, T, T] bool, True where a query may attend to a key (causal)
    eps:     rms_norm_eps of the config, for all four RMSNorms (the two layer norms and QK-Norm)
    returns  [B, T, hidden]

    The attention sublayer: project q, k, v; split into heads ([B, T, H, head_dim]); RMSNorm q and k over
    head_dim with q_norm / k_norm (QK-Norm); move heads forward ([B, H, T, head_dim]); RoPE on q and k;
    grouped-query attention; merge the heads back to [B, T, Hq·head_dim]; o_proj. The number of heads follows
    from the weight shapes (q_proj rows / head_dim).

    Shape example: x [2, 6, 48], q_proj [64, 48] and head_dim 16 (so 4 query heads), k_proj [32, 48] (2 kv heads),
    cos [2, 6, 16], mask [2, 6, 6] -> [2, 6, 48].
    """
    raise NotImplementedError


def lm_head_weight(weights: dict[str, np.ndarray], tie_word_embeddings: bool) -> np.ndarray:
    """The output head's weight [vocab, hidden] for a checkpoint's tensors.

    Untied (e.g. Qwen3-8B): the file's own "lm_head.weight". Tied (Qwen3-0.6B, 4B): the file has no lm_head; the
    head IS the embedding table "model.embed_tokens.weight" — return that very array, not a copy of it (the check:
    `lm_head_weight(w, True) is w["model.embed_tokens.weight"]`, or at least np.shares_memory).
    """
    raise NotImplementedError


def forward(ids: np.ndarray, weights: dict[str, np.ndarray], config: Qwen3Config) -> np.ndarray:
    """The whole dense Qwen3: token ids [B, T] -> logits [B, T, vocab] (float32).

    weights: every tensor of a checkpoint by its official name (see tinyqwen/model.py's docstring for the list).
    config:  a tinyqwen Qwen3Config — hidden_size, num_hidden_layers, head_dim, rms_norm_eps,
             tie_word_embeddings, ... (rope_parameters(config) gives RoPE's inv_freq and attention factor).

    Positions are 0..T-1 in every row; the mask is causal. Steps: embed the ids; run every decoder layer; apply
    the final RMSNorm ("model.norm.weight"); multiply by the head (lm_head_weight).

    Shape example: the fixture dense-tied has vocab 512, hidden 64, 2 layers: ids [2, 12] -> logits [2, 12, 512].
    """
    raise NotImplementedError


def count_parameters(config: Qwen3Config) -> int:
    """The number of parameters of a dense Qwen3 with this config, a tied embedding counted once.

    Embedding vocab·hidden; per layer q, k, v, o projections, q_norm and k_norm [head_dim], the two layer norms
    [hidden], gate/up/down [intermediate, hidden]; the final norm [hidden]; lm_head vocab·hidden only if untied.

    Example: Qwen3-0.6B (tinyqwen/data/configs/Qwen3-0.6B.json) has about 0.6 billion; its exact count is what the
    checkpoint asks you to find.
    """
    raise NotImplementedError
