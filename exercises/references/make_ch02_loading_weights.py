"""Reference files for chapter 2 (loading weights), made with the official `safetensors` library, torch and
transformers. tinyqwen is never imported: these files say what the official code reads, not what we read.

    python exercises/references/make_ch02_loading_weights.py    # from the repository root, with .[crosscheck] installed

Needs torch, transformers and safetensors (the `crosscheck` extra). Deterministic (fixed seeds). Writes:

ch02_loading_weights.safetensors
    A small file in four dtypes (F32, BF16, F16, I64; one F32 tensor is a 0-d scalar), written by
    `safetensors.torch.save_file(..., metadata={"format": "pt"})`, as transformers writes checkpoints. (One
    metadata key only: the official writer orders two or more keys arbitrarily, and the file must not change.)

ch02_loading_weights.npz
    tensor.<name>   what torch reads back from that file (`safetensors.torch.load_file`), floats as float32
                    (`tensor.float()`: bf16/f16 widened by torch), ints as int64
    bits.<name>     the stored 16-bit patterns of the BF16 tensors (`tensor.view(torch.int16)`), as uint16
    bf16_bits       all 65,536 bfloat16 bit patterns, uint16 [65536]
    bf16_as_f32     torch's float32 value of each (`.view(torch.bfloat16).float()`), float32 [65536]

ch02_loading_weights.json
    file            the small file's header: `header_length` (its first 8 bytes, read as a little-endian uint64),
                    `data_start` (8 + header_length), `header` (the JSON text parsed with `json.loads`; both by
                    hand from the bytes), and `safe_open`: {name: {dtype, shape}} and `metadata` as the official
                    reader reports them
    checkpoints     for the fixtures `dense-tied` (F32, one file) and `dense-untied-bf16-sharded` (BF16, 2 shards):
                    every tensor's shape, stored dtype and a fingerprint of torch's float32 values
                    (`sum` and `abs_sum` in float64, and `samples`: the values at flat positions FINGERPRINT_AT)
    shapes          {config name: {tensor name: shape}} for the fixtures' configs and two official ones
                    (tinyqwen/data/configs): the fixtures'
                    from their safetensors headers (official reader; these folders load in transformers with no
                    missing or unexpected key), Qwen3-0.6B's and Qwen3-8B's from the `state_dict()` of
                    transformers' model built from the config on the meta device (no memory), minus
                    `lm_head.weight` when `tie_word_embeddings` is true (a tied weight is not saved:
                    `_tied_weights_keys`)
    moe             for Qwen3-30B-A3B (too many tensors to list): the number of checkpoint tensors, the number of
                    parameters (transformers' `model.num_parameters()`), and some shapes. transformers 5 keeps the
                    experts fused (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`); the official
                    files have one tensor per expert, so they are un-fused here into
                    `experts.{e}.{gate,up,down}_proj.weight` ([I, H], [I, H], [H, I]).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "fixtures"
NAME = "ch02_loading_weights"
FINGERPRINT_AT = (
    0,
    1,
    2,
    3,
    100,
    -1,
)  # flat positions (all tensors here have at least 101 values... or fewer:
# positions past the end are skipped, see fingerprint)


def small_file(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(202)
    tensors = {
        "embed.weight": torch.randn(6, 4, generator=g) * 0.5,  # F32
        "norm.weight": (1 + 0.3 * torch.randn(4, generator=g)).to(torch.bfloat16),  # BF16
        # BF16 values chosen to show the format: 1, -2, 1.5, pi (rounded), 2**-20, the largest finite, inf
        "special.bf16": torch.tensor(
            [1.0, -2.0, 1.5, 3.14159265, 2.0**-20, 3.3895313892515355e38, float("inf")]
        ).to(torch.bfloat16),
        "proj.weight": (torch.randn(3, 4, generator=g) * 0.2).to(torch.bfloat16),  # BF16 matrix
        "half.values": (torch.randn(2, 3, generator=g) * 100).to(torch.float16),  # F16
        "token.ids": torch.tensor([151643, 151645, 0, 42, 9], dtype=torch.int64),  # I64
        "scale": torch.tensor(0.125),  # a 0-d F32 scalar: shape [], one value
    }
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def fingerprint(values: np.ndarray) -> dict:
    flat = values.reshape(-1).astype(np.float64)
    return {
        "sum": float(flat.sum()),
        "abs_sum": float(np.abs(flat).sum()),
        "samples": [float(flat[i]) for i in FINGERPRINT_AT if -flat.size <= i < flat.size],
    }


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    return [folder / "model.safetensors"]


def header_shapes(folder: Path) -> dict[str, list[int]]:
    shapes = {}
    for file in checkpoint_files(folder):
        with safetensors.safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    return dict(sorted(shapes.items()))


def meta_model(config_file: Path):
    config = AutoConfig.from_pretrained(str(config_file))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model


def dense_shapes(config_file: Path) -> dict[str, list[int]]:
    config, model = meta_model(config_file)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        del shapes["lm_head.weight"]
    return dict(sorted(shapes.items()))


def moe_facts(config_file: Path) -> dict:
    config, model = meta_model(config_file)
    shapes: dict[str, list[int]] = {}
    for name, value in model.state_dict().items():
        prefix, _, leaf = name.rpartition("experts.")
        if not prefix:
            shapes[name] = list(value.shape)
            continue
        E, rows, cols = value.shape
        for e in range(E):
            if leaf == "gate_up_proj":  # [E, 2I, H]: gate rows first, then up rows
                shapes[f"{prefix}experts.{e}.gate_proj.weight"] = [rows // 2, cols]
                shapes[f"{prefix}experts.{e}.up_proj.weight"] = [rows // 2, cols]
            elif leaf == "down_proj":  # [E, H, I]
                shapes[f"{prefix}experts.{e}.down_proj.weight"] = [rows, cols]
            else:
                raise ValueError(f"unexpected expert tensor {name}")
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert n_params == model.num_parameters(), (n_params, model.num_parameters())
    samples = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.0.gate_proj.weight",
        "model.layers.47.mlp.experts.127.down_proj.weight",
    ]
    return {
        "num_tensors": len(shapes),
        "num_parameters": n_params,
        "samples": {k: shapes[k] for k in samples},
    }


def main() -> None:
    path = HERE / f"{NAME}.safetensors"
    small_file(path)
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_length])
    loaded = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        safe_open = {
            name: {"dtype": f.get_slice(name).get_dtype(), "shape": list(f.get_slice(name).get_shape())}
            for name in f.keys()
        }
        metadata = f.metadata()

    arrays: dict[str, np.ndarray] = {}
    for name, t in loaded.items():
        arrays[f"tensor.{name}"] = t.numpy() if not t.is_floating_point() else t.float().numpy()
        if t.dtype == torch.bfloat16:
            arrays[f"bits.{name}"] = t.view(torch.int16).numpy().view(np.uint16)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    arrays["bf16_bits"] = bits
    arrays["bf16_as_f32"] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.savez_compressed(HERE / f"{NAME}.npz", **arrays)

    checkpoints = {}
    for fixture in ("dense-tied", "dense-untied-bf16-sharded"):
        entry = {}
        for file in checkpoint_files(FIXTURES / fixture):
            with safetensors.safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    entry[name] = {
                        "file": file.name,
                        "dtype": f.get_slice(name).get_dtype(),
                        "shape": list(t.shape),
                        **fingerprint(t.float().numpy()),
                    }
        checkpoints[fixture] = dict(sorted(entry.items()))

    configs = REPO / "tinyqwen" / "data" / "configs"  # the official files
    shapes = {
        f"fixture-{f}": header_shapes(FIXTURES / f)
        for f in ("dense-tied", "dense-untied-bf16-sharded", "moe-norm-topk", "moe-sparse-step")
    }
    for name in ("Qwen3-0.6B", "Qwen3-8B"):
        shapes[name] = dense_shapes(configs / f"{name}.json")

    facts = {
        "made_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
        "fingerprint_at": list(FINGERPRINT_AT),
        "file": {
            "name": path.name,
            "size": len(raw),
            "header_length": header_length,
            "data_start": 8 + header_length,
            "header": header,
            "safe_open": safe_open,
            "metadata": metadata,
        },
        "checkpoints": checkpoints,
        "shapes": shapes,
        "moe": {"Qwen3-30B-A3B": moe_facts(configs / "Qwen3-30B-A3B.json")},
    }
    (HERE / f"{NAME}.json").write_text(json.dumps(facts, indent=1) + "\n")
    for suffix in ("safetensors", "npz", "json"):
        print(f"{NAME}.{suffix}: {(HERE / f'{NAME}.{suffix}').stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
