"""Chapter 2 solutions: a .safetensors file read byte by byte with the standard library and NumPy
(tinyqwen/safetensors.py and tinyqwen/checkpoint.py are the library's versions, with validation of every field)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# safetensors dtype -> how its bytes read in NumPy (little-endian); BF16 has no NumPy type: read its bits as uint16
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}  # fmt: skip


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # N: u64 little-endian, the header's length in bytes
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n  # the data area starts right after the header


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:  # [...] uint16 -> [...] float32
    # a bfloat16 is the top half of a float32: shift the bits up, then reinterpret (never convert the integer)
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _locate(path: str | os.PathLike, name: str) -> tuple[str, tuple[int, ...], int, int]:
    header, data_start = read_header(path)
    if name not in header or name == "__metadata__":
        raise KeyError(f"{path}: no tensor named {name!r}")
    t = header[name]
    start, end = t["data_offsets"]  # relative to the data area, not to the file
    return t["dtype"], tuple(t["shape"]), data_start + start, end - start


def read_tensor(path: str | os.PathLike, name: str) -> np.ndarray:
    dtype, shape, offset, nbytes = _locate(path, name)
    with open(path, "rb") as f:
        f.seek(offset)
        a = np.frombuffer(f.read(nbytes), dtype=DTYPES[dtype]).reshape(shape)  # row-major, as stored
    if dtype == "BF16":
        return bf16_to_float32(a)
    if dtype in ("F32", "F16"):
        return a.astype(np.float32)  # a fresh, writable float32 array
    return a.copy()


def map_tensor(path: str | os.PathLike, name: str) -> np.ndarray:
    dtype, shape, offset, _ = _locate(path, name)
    # a view of the file: nothing is read until the values are used (a 16 GB checkpoint "loads" instantly)
    return np.memmap(path, dtype=DTYPES[dtype], mode="r", offset=offset, shape=shape)


def load_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():  # sharded: the index says which file holds each tensor
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        header, _ = read_header(directory / "model.safetensors")
        weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}
    return {name: read_tensor(directory / weight_map[name], name) for name in sorted(weight_map)}


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    c = config
    H, D = c["hidden_size"], c["head_dim"]  # head_dim is its own key: never hidden // heads
    Q, K, V = c["num_attention_heads"] * D, c["num_key_value_heads"] * D, c["vocab_size"]
    E = c.get("num_experts", 0) if c.get("model_type") == "qwen3_moe" else 0
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (Q, H), p + "self_attn.k_proj.weight": (K, H),
                   p + "self_attn.v_proj.weight": (K, H), p + "self_attn.o_proj.weight": (H, Q),
                   p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}  # fmt: skip
        sparse = (
            E > 0 and i not in c.get("mlp_only_layers", []) and (i + 1) % c.get("decoder_sparse_step", 1) == 0
        )
        if sparse:
            M = c["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (E, H)  # the router
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                shapes |= {
                    q + "gate_proj.weight": (M, H),
                    q + "up_proj.weight": (M, H),
                    q + "down_proj.weight": (H, M),
                }
        else:
            F = c["intermediate_size"]
            shapes |= {p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F)}  # fmt: skip
    shapes["model.norm.weight"] = (H,)
    if not c.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes
