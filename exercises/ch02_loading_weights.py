"""Chapter 2 · Loading weights: read an official checkpoint byte by byte.

Work through notebooks/02-loading-weights.ipynb, then replace each `raise NotImplementedError` below, in order.
Grade with `pytest exercises/test_ch02_loading_weights.py`. Use only the standard library and NumPy. The last
checkpoint runs the real model on the weights your `load_checkpoint` reads.
"""

from __future__ import annotations

import os

import numpy as np


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a .safetensors file, and the file position where its data area starts.

    The file starts with N, an unsigned 64-bit little-endian integer, followed by N bytes of UTF-8 JSON. Return the
    parsed JSON object exactly as it is, including its "__metadata__" entry, and 8 + N.

    Example: a file holding one F32 tensor "x" = [1.0, 2.0] is 72 bytes. Its first 8 bytes are 38 00 00 00 00 00 00 00
    (N = 56), so

        read_header(path) == ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 64)
    """
    raise NotImplementedError


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:  # [...] uint16 -> [...] float32
    """Widen bfloat16 bit patterns (stored as uint16) to float32 values, exactly; same shape.

    A bfloat16 is the top 16 bits of a float32: shift each pattern into the high half of a 32-bit word and
    reinterpret those bits as a float32 (don't convert the integer's value).

    Example: bf16_to_float32(np.array([0x3F80, 0xC000, 0x4049, 0x7F80], dtype=np.uint16))
             -> array([1.0, -2.0, 3.140625, inf], dtype=float32)
    """
    raise NotImplementedError


def read_tensor(path: str | os.PathLike, name: str) -> np.ndarray:
    """One tensor of a .safetensors file, with the shape its header gives.

    Its bytes are at file positions [data_start + start, data_start + end), where data_offsets = [start, end], in
    row-major (C) order, little-endian. F32, BF16 and F16 come back as float32 (BF16 via `bf16_to_float32`), and
    integer dtypes (I64, I32, ...) as stored. A 0-d tensor (shape []) comes back with shape ().

    Example: with the 72-byte file above, read_tensor(path, "x") -> array([1., 2.], dtype=float32); on a Qwen3
    checkpoint, read_tensor(path, "model.embed_tokens.weight").shape == (vocab_size, hidden_size).
    """
    raise NotImplementedError


def map_tensor(path: str | os.PathLike, name: str) -> np.ndarray:
    """One tensor *as stored* (BF16 as uint16 bit patterns), memory-mapped read-only: a view of the file, no copy.

    Use np.memmap (or mmap + np.frombuffer) with the tensor's dtype, shape and absolute byte offset. Nothing is
    read until the values are used, and if the file's bytes change, the array shows the new values.

    Example: map_tensor(path, "x") -> memmap([1., 2.], dtype=float32); on a BF16 file, map_tensor(path, name).dtype
    == np.uint16 and bf16_to_float32(map_tensor(path, name)) equals read_tensor(path, name).
    """
    raise NotImplementedError


def load_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face checkpoint folder, by name, as `read_tensor` returns it.

    The folder holds either one `model.safetensors`, or shards plus `model.safetensors.index.json`, whose
    "weight_map" maps each tensor name to the shard file that holds it.

    Example: load_checkpoint("tests/fixtures/dense-untied-bf16-sharded") -> a dict of 36 float32 arrays, e.g.
    ["lm_head.weight"].shape == (512, 64), read from model-00002-of-00002.safetensors.
    """
    raise NotImplementedError


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of every tensor an official checkpoint with this config.json holds.

    Let H = hidden_size, D = head_dim (its own key; never hidden_size // num_attention_heads), Q =
    num_attention_heads * D, K = num_key_value_heads * D, F = intermediate_size, V = vocab_size. A projection
    from width a to width b is stored [b, a]. Then

        model.embed_tokens.weight                        (V, H)
        model.layers.{i}.input_layernorm.weight          (H,)     for i in range(num_hidden_layers)
        model.layers.{i}.post_attention_layernorm.weight (H,)
        model.layers.{i}.self_attn.q_proj.weight         (Q, H)
        model.layers.{i}.self_attn.k_proj.weight         (K, H)   (v_proj the same)
        model.layers.{i}.self_attn.o_proj.weight         (H, Q)
        model.layers.{i}.self_attn.q_norm.weight         (D,)     (k_norm the same)
        model.layers.{i}.mlp.gate_proj.weight            (F, H)   (up_proj the same)
        model.layers.{i}.mlp.down_proj.weight            (H, F)
        model.norm.weight                                (H,)
        lm_head.weight                                   (V, H)   only if tie_word_embeddings is false

    Mixture of experts (model_type "qwen3_moe"): layer i is sparse when num_experts > 0, i is not in
    mlp_only_layers, and (i + 1) % decoder_sparse_step == 0. A sparse layer has, instead of the three mlp
    tensors, a router mlp.gate.weight (num_experts, H) and, for each expert e, mlp.experts.{e}.gate_proj.weight and
    up_proj (M, H) and down_proj (H, M), where M = moe_intermediate_size.

    Example (Qwen3-0.6B: H 1024, D 128, 16 heads, 8 kv heads, F 3072, V 151936, 28 layers, tied):
    310 tensors, ["model.layers.0.self_attn.q_proj.weight"] == (2048, 1024), no "lm_head.weight".
    """
    raise NotImplementedError
