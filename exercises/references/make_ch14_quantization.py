"""Reference files for chapter 14 (quantization), made with llama.cpp's own Python package `gguf` (its NumPy
quantization and dequantization, written to be bit-exact with ggml-quants.c). tinyqwen's quantization code is never
imported: these files say what llama.cpp computes, not what we compute. (The model checkpoint's logits come from
tinyqwen's NumPy forward pass, run on the weights gguf dequantized: see model_logits.)

    python exercises/references/make_ch14_quantization.py    # from the repository root, with `pip install gguf`

Deterministic (fixed seeds). Writes ch14_quantization.npz:

q8.x                float32 [R, 256]: rows to quantize: normals × 0.05, an all-zero block, a block whose largest
                    magnitude is negative (max ≠ absmax), a block of exact halves (absmax 127: d = 1, so x·(1/d) lands
                    on k + 0.5 and the rounding rule decides), a row with one outlier 40× the rest
q8.blocks           uint8 [R, 8·34]: gguf.quants.quantize(x, Q8_0), llama.cpp's block_q8_0 bytes
q8.dequant          float32 [R, 256]: gguf.quants.dequantize(q8.blocks, Q8_0)
q4k.scales          uint8 [S, 12]: random 12-byte scale fields (every bit pattern of the top two bits shows up)
q4k.sc, q4k.m       uint8 [S, 8]: gguf's Q4_K.get_scale_min of them (llama.cpp's get_scale_min_k4)
q4k.blocks          uint8 [B, 144]: random Q4_K super-blocks with sane float16 d and dmin (random bytes elsewhere:
                    every scale, min and nibble value occurs)
q4k.dequant         float32 [B, 256]: gguf.quants.dequantize(q4k.blocks, Q4_K)
gemv.<case>.w       uint8 [m, k·34]: Q8_0 weights (gguf's quantization of normals × 0.05)
gemv.<case>.x       float32 [k·32]
gemv.<case>.y       float32 [m]: llama.cpp's Q8_0 × Q8_0 dot product (ggml_vec_dot_q8_0_q8_0): x quantized to Q8_0
                    by gguf, per block the exact integer sum Σ q_w·q_x (int64) times d_w·d_x, summed in float64
                    cases: small [4, 64] (two blocks), wide [64, 1024] (Qwen3-0.6B's hidden size), tall [300, 256]
model.config        the JSON of a 1-layer dense Qwen3 (hidden 256: Q4_K super-blocks need rows of 256)
model.<name>.qtype  its tensors as a quantized file stores them: "q4_k" for the embedding (tied: also the head),
model.<name>.shape  q/k/o_proj, gate/up_proj; "q8_0" for v_proj and down_proj (Q4_K_M keeps those at more bits);
model.<name>.data   "f32" for the norms. data is uint8 [rows, row bytes] (blocks), or float32 for f32.
                    Weights: normals × 0.02 (norms 1 + normals × 0.1), quantized by gguf (Q8_0) or written as Q4_K
                    blocks with random bytes and sane scales (gguf has no Q4_K quantizer)
model.<name>.row0   float32: row 0 of the tensor as gguf dequantizes it (the whole vector for the norms)
model.input_ids     int64 [2, 12]
model.logits        float32 [2, 12, 256]: the forward pass on the weights dequantized by gguf (see model_logits)
model.logits_by     which forward pass made them
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K, dequantize, quantize

OUT = Path(__file__).resolve().parent / "ch14_quantization.npz"

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_sliding_window": False,
    "torch_dtype": "float32",
}


def f16_bytes(v: float) -> np.ndarray:
    return np.frombuffer(np.float16(v).tobytes(), np.uint8)


def q8_rows(rng) -> np.ndarray:
    x = (rng.standard_normal((12, 256)) * 0.05).astype(np.float32)
    x[1, 32:64] = 0.0  # all-zero block: d = 0, every q = 0 (no division by zero)
    x[2, :32] = np.abs(x[2, :32])
    x[2, 5] = -0.3  # the largest magnitude is negative: max(x) is not absmax
    halves = (
        np.arange(-15, 16, dtype=np.float32) + 0.5
    )  # ±0.5 … ±15.5 (31 values), then 127 for d = 1 exactly
    x[3, :32] = np.concatenate([halves, [127.0]]).astype(np.float32)
    x[4] *= 0.2
    x[4, 100] = 2.0  # one outlier: its block's 31 other weights keep only a few levels
    return x


def q4k_blocks(rng, n: int, scale: float = 1.0) -> np.ndarray:
    """Random Q4_K super-blocks: random scale fields and nibbles, float16 d and dmin of a trained layer's size."""
    b = rng.integers(0, 256, (n, 144), dtype=np.uint8)
    d = (
        rng.uniform(0.2, 1.0, n) * 1e-3 * scale
    )  # a 6-bit scale of ~40 times d times 15 → weights of ~0.05·scale
    dmin = rng.uniform(0.2, 1.0, n) * 1e-3 * scale
    for i in range(n):
        b[i, 0:2], b[i, 2:4] = f16_bytes(d[i]), f16_bytes(dmin[i])
    return b


def gemv_case(rng, m: int, n: int) -> dict[str, np.ndarray]:
    w = quantize((rng.standard_normal((m, n)) * 0.05).astype(np.float32), T.Q8_0)  # [m, n/32·34]
    x = rng.standard_normal(n).astype(np.float32)
    xb = quantize(x[None], T.Q8_0).reshape(-1, 34)  # llama.cpp quantizes the activation row to Q8_0 too
    wb = w.reshape(m, -1, 34)
    dw = wb[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)  # [m, k]
    dx = xb[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)  # [k]
    qw = wb[..., 2:].view(np.int8).astype(np.int64)
    qx = xb[:, 2:].view(np.int8).astype(np.int64)
    dots = (qw * qx[None]).sum(axis=-1)  # [m, k], exact integers
    y = (dots * dw * dx[None]).sum(axis=1)
    return {"w": w, "x": x, "y": y.astype(np.float32)}


def model_tensors(rng) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    h, i, d = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["head_dim"]
    hq, hkv = CONFIG["num_attention_heads"] * d, CONFIG["num_key_value_heads"] * d
    plan = {
        "model.embed_tokens.weight": ("q4_k", (CONFIG["vocab_size"], h)),
        "model.layers.0.self_attn.q_proj.weight": ("q4_k", (hq, h)),
        "model.layers.0.self_attn.k_proj.weight": ("q4_k", (hkv, h)),
        "model.layers.0.self_attn.v_proj.weight": ("q8_0", (hkv, h)),
        "model.layers.0.self_attn.o_proj.weight": ("q4_k", (h, hq)),
        "model.layers.0.mlp.gate_proj.weight": ("q4_k", (i, h)),
        "model.layers.0.mlp.up_proj.weight": ("q4_k", (i, h)),
        "model.layers.0.mlp.down_proj.weight": ("q8_0", (h, i)),
        "model.layers.0.self_attn.q_norm.weight": ("f32", (d,)),
        "model.layers.0.self_attn.k_norm.weight": ("f32", (d,)),
        "model.layers.0.input_layernorm.weight": ("f32", (h,)),
        "model.layers.0.post_attention_layernorm.weight": ("f32", (h,)),
        "model.norm.weight": ("f32", (h,)),
    }
    out = {}
    for name, (qtype, shape) in plan.items():
        if qtype == "f32":
            data = (1 + rng.standard_normal(shape) * 0.1).astype(np.float32)
        elif qtype == "q8_0":
            data = quantize((rng.standard_normal(shape) * 0.02).astype(np.float32), T.Q8_0)
        else:  # Q4_K rows of shape[1] // 256 super-blocks; "scale" keeps the weights near normals × 0.02
            rows, per_row = shape[0], shape[1] // 256
            data = q4k_blocks(rng, rows * per_row, scale=0.1).reshape(rows, per_row * 144)
        out[name] = (qtype, shape, data)
    return out


def gguf_dequantize(qtype: str, data: np.ndarray, shape) -> np.ndarray:
    if qtype == "f32":
        return data.astype(np.float32).reshape(shape)
    kind = {"q8_0": T.Q8_0, "q4_k": T.Q4_K}[qtype]
    return dequantize(data, kind).astype(np.float32).reshape(shape)


def model_logits(weights: dict[str, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, str]:
    """The forward pass on the weights gguf dequantized: tinyqwen's NumPy reference (equal to transformers' Qwen3 on
    the test fixtures, tests/test_model.py). Only the forward pass is tinyqwen's; what is graded — the float32
    weights each block decodes to — is llama.cpp's."""
    from tinyqwen.backends import get_backend
    from tinyqwen.config import config_from_dict
    from tinyqwen.model import Qwen3, load_weights

    class Tensors:  # the few methods load_weights reads from a checkpoint
        def keys(self):
            return weights.keys()

        def shape(self, name):
            return weights[name].shape

        def dtype(self, name):
            return "F32"

        def get(self, name):
            return weights[name]

    config = config_from_dict(CONFIG)
    backend = get_backend("numpy")
    model = Qwen3(config, load_weights(Tensors(), config, backend.prepare, progress=False), backend)
    return np.asarray(model(ids), np.float32), "tinyqwen's numpy forward on gguf's dequantized weights"


def main() -> None:
    rng = np.random.default_rng(14)
    out: dict[str, np.ndarray] = {}
    x = q8_rows(rng)
    out["q8.x"] = x
    out["q8.blocks"] = quantize(x, T.Q8_0)
    out["q8.dequant"] = dequantize(out["q8.blocks"], T.Q8_0).astype(np.float32)

    scales = rng.integers(0, 256, (64, 12), dtype=np.uint8)
    out["q4k.scales"] = scales
    out["q4k.sc"], out["q4k.m"] = (a.astype(np.uint8) for a in Q4_K.get_scale_min(scales.copy()))
    blocks = q4k_blocks(rng, 40)
    blocks[0, 4:] = 0  # every scale and nibble 0: the block is all zeros
    out["q4k.blocks"] = blocks
    out["q4k.dequant"] = dequantize(blocks, T.Q4_K).astype(np.float32)

    for case, (m, n) in {"small": (4, 64), "wide": (64, 1024), "tall": (300, 256)}.items():
        for key, value in gemv_case(rng, m, n).items():
            out[f"gemv.{case}.{key}"] = value

    tensors = model_tensors(rng)
    out["model.config"] = np.array(json.dumps(CONFIG))
    for name, (qtype, shape, data) in tensors.items():
        out[f"model.{name}.qtype"] = np.array(qtype)
        out[f"model.{name}.shape"] = np.array(shape, np.int64)
        out[f"model.{name}.data"] = data
    ids = rng.integers(0, CONFIG["vocab_size"], (2, 12)).astype(np.int64)
    weights = {name: gguf_dequantize(q, data, shape) for name, (q, shape, data) in tensors.items()}
    for name, w in weights.items():  # a first check per tensor, before the whole model
        out[f"model.{name}.row0"] = w.reshape(w.shape[0], -1)[0] if w.ndim == 2 else w
    logits, by = model_logits(weights, ids)
    out["model.input_ids"] = ids
    out["model.logits"] = logits
    out["model.logits_by"] = np.array(by)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT.name}: {len(out)} arrays, {OUT.stat().st_size / 1024:.0f} KiB; logits by {by}")


if __name__ == "__main__":
    main()
