"""Capstone of parts II and III (chapters 3-8): Qwen3 from the math, with no scaffolding.

Chapters 3-7 handed you one function at a time, each with its formula and a worked example. Here there is neither:
write one decoder layer and the whole forward pass — dense layers and mixture-of-experts layers, plain RoPE and
YaRN — from what you know of the architecture. The docstrings give the inputs, the shapes and what is graded; how
to compute it is yours to decide. Grade with

    pytest exercises/test_ch15_capstone_model.py

The expected values are transformers' (a `Qwen3DecoderLayer` and `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` run on
the test fixtures), stored in exercises/references/ch06_dense_model.npz and tests/fixtures/*/reference.npz.

Rules: NumPy only, and nothing from tinyqwen except the config object you are handed (no `tinyqwen.model`,
`tinyqwen.attention`, ... — those are what you are writing). Your own functions from exercises/ch03-ch07 are
fair game: importing them is reuse, not scaffolding. When you are stuck, the chapters' notebooks are the
reference; exercises/solutions/ch15_capstone_model.py is the last resort.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.config import Qwen3Config  # a frozen dataclass of the config.json fields (see its attributes)


def decoder_layer(
    x: np.ndarray, weights: dict[str, np.ndarray], config: Qwen3Config, positions: np.ndarray
) -> np.ndarray:
    """One Qwen3 decoder layer, causal over the T tokens given.   x [B, T, hidden], positions [B, T] -> [B, T, hidden]

    weights: the layer's tensors by their official names without the "model.layers.{i}." prefix, float32, each
             matrix in the checkpoint's [out, in] layout. A dense layer has "mlp.gate_proj.weight" and its two
             siblings; a sparse layer has "mlp.gate.weight" and "mlp.experts.{e}.{gate,up,down}_proj.weight".
    config:  everything else you need (widths, heads, head_dim, rms_norm_eps, rope_theta, rope_scaling, the MoE
             fields).
    positions: each token's position (a row need not start at 0: row 1 of the graded input is at 4..9). Token t
             may attend to tokens 0..t of its own row.

    Graded on transformers' Qwen3DecoderLayer (hidden 48, 4 query / 2 kv heads of head_dim 16) at |Δ| <= 1e-4.
    """
    raise NotImplementedError


def forward(ids: np.ndarray, weights: dict[str, np.ndarray], config: Qwen3Config) -> np.ndarray:
    """The whole model: token ids [B, T] -> logits [B, T, vocab_size] (float32), positions 0..T-1 in every row.

    weights: every tensor of the checkpoint by its official name ("model.embed_tokens.weight", "model.layers.0....",
             "model.norm.weight", "lm_head.weight" when the config does not tie it), float32.

    Graded on five fixtures against transformers' logits (|Δ| <= 1e-5 · max(1, max |logit|)): tied and untied
    dense models, one with YaRN, and two Qwen3-MoE models (renormalised top-k; sparse only every other layer).
    """
    raise NotImplementedError
