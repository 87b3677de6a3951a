"""Full-size check: a random-weight checkpoint with the exact Qwen3-0.6B config, tinyqwen vs
transformers.

    python benchmarks/full_size_check.py [OUT_DIR] [--seq-len 32] [--batch 2] [--keep]

1. Writes config.json (byte-exact copy of the official one), generation_config.json and a BF16
   model.safetensors with random weights into OUT_DIR (default $TINYQWEN_PEER_DIR/qwen3-0.6b-random; never inside
   the repo).
2. Checks the key set: equal to the expected official Qwen3-0.6B key set (transformers 4.51 naming, tied, so no
   lm_head.weight), and structurally equal to the official Qwen3-4B key list committed in
   tests/fixtures/official_keys/Qwen3-4B.json (same top-level names, same 11 names per layer).
3. Runs transformers (float32, eager) and `tinyqwen.load_model` on a few random prompts and prints the max
   absolute and relative logit differences, arg-max agreement and timings.

Needs torch + transformers (the crosscheck extra). Peak memory is about 6 GB (two float32 copies of 0.6B weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
OFFICIAL_CONFIG = REPO.parent / "shared" / "qwen3-tokenizer" / "models" / "Qwen3-0.6B"
CONFIG_FALLBACK = REPO / "tinyqwen" / "data" / "configs" / "Qwen3-0.6B.json"
OFFICIAL_4B_KEYS = REPO / "tests" / "fixtures" / "official_keys" / "Qwen3-4B.json"
PER_LAYER = (
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
)


def expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Official tensor names -> shapes for a dense Qwen3 config (tied: no lm_head.weight)."""
    H, I, d, V = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = {
        "input_layernorm.weight": (H,),
        "mlp.down_proj.weight": (H, I),
        "mlp.gate_proj.weight": (I, H),
        "mlp.up_proj.weight": (I, H),
        "post_attention_layernorm.weight": (H,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.k_proj.weight": (kv, H),
        "self_attn.o_proj.weight": (H, q),
        "self_attn.q_norm.weight": (d,),
        "self_attn.q_proj.weight": (q, H),
        "self_attn.v_proj.weight": (kv, H),
    }
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(c["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in per_layer.items()}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def structure(keys) -> tuple[frozenset[str], frozenset[str]]:
    """(top-level names, per-layer name suffixes) of a key set."""
    top = frozenset(k for k in keys if not k.startswith("model.layers."))
    suffixes = frozenset(k.split(".", 3)[3] for k in keys if k.startswith("model.layers."))
    return top, suffixes


def build_checkpoint(out: Path, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    source = OFFICIAL_CONFIG / "config.json"
    config_file = source if source.is_file() else CONFIG_FALLBACK
    shutil.copyfile(config_file, out / "config.json")
    if (OFFICIAL_CONFIG / "generation_config.json").is_file():
        shutil.copyfile(OFFICIAL_CONFIG / "generation_config.json", out / "generation_config.json")
    config = json.loads(config_file.read_text())
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:  # RMSNorm weights around 1, so every one of them matters
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # fan-in scaled, larger than the 0.02 init for the embeddings
            std = 0.05 if "embed" in name else shape[1] ** -0.5
            t = torch.randn(shape, generator=g) * std
        tensors[name] = t.to(torch.bfloat16)
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return config


def check_keys(out: Path, config: dict) -> None:
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    expected = set(expected_shapes(config))
    print(
        f"tensors written: {len(keys)} ({', '.join(sorted(dtypes))}); expected official Qwen3-0.6B set: "
        f"{len(expected)} -> {'EQUAL' if keys == expected else 'DIFFERENT'}"
    )
    assert keys == expected, (sorted(keys - expected)[:5], sorted(expected - keys)[:5])
    official = json.loads(OFFICIAL_4B_KEYS.read_text())
    same = structure(keys) == structure(official["tensors"])
    print(
        f"structure vs official Qwen3-4B key list ({official['num_tensors']} tensors, no lm_head): "
        f"top-level + per-layer names {'EQUAL' if same else 'DIFFERENT'}"
    )
    assert same
    # Not settled offline: public GGUF conversions of Qwen3-0.6B hold 311 tensors, which suggests the Hub file
    # also stores a redundant lm_head.weight beside the tied embedding. tinyqwen loads either form (tested).
    print("note: the official 0.6B file may add a redundant lm_head.weight (tied); both forms load")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    folder = os.environ.get("TINYQWEN_PEER_DIR")
    parser.add_argument(
        "out",
        nargs="?",
        default=folder and Path(folder) / "qwen3-0.6b-random",
        type=Path,
        help="OUT_DIR (default: $TINYQWEN_PEER_DIR/qwen3-0.6b-random)",
    )
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep OUT_DIR (about 1.2 GB) afterwards")
    args = parser.parse_args()
    if args.out is None:
        parser.error("no OUT_DIR: pass one or set TINYQWEN_PEER_DIR (a folder outside the repo)")
    if args.out.resolve().is_relative_to(REPO):
        parser.error("OUT_DIR must be outside the repository (the checkpoint is 1.2 GB)")

    import tinyqwen  # after the argument check: importing is cheap, loading is not

    t0 = time.perf_counter()
    config = build_checkpoint(args.out, args.seed)
    print(f"built random BF16 checkpoint in {args.out} in {time.perf_counter() - t0:.1f} s")
    check_keys(args.out, config)

    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, config["vocab_size"], size=(args.batch, args.seq_len))
    single = rng.integers(0, config["vocab_size"], size=args.seq_len + 5)

    t0 = time.perf_counter()
    hf, info = AutoModelForCausalLM.from_pretrained(
        args.out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), f"transformers did not load cleanly: {info}"
    t_hf_load = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        theirs = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
        t_hf = time.perf_counter() - t0
        theirs_single = hf(input_ids=torch.from_numpy(single)[None]).logits[0].numpy()
    del hf

    t0 = time.perf_counter()
    model = tinyqwen.load_model(args.out)
    t_tq_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = model(ids)
    t_tq = time.perf_counter() - t0
    ours_single = model(single)

    for label, a, b in (("batch", ours, theirs), ("single", ours_single, theirs_single)):
        diff = np.abs(a.astype(np.float64) - b)
        print(
            f"{label:6s} {list(a.shape)}: max |logit diff| {diff.max():.3e}, max relative "
            f"{diff.max() / np.abs(b).max():.3e} (|logits| max {np.abs(b).max():.2f}), "
            f"arg-max agreement {np.mean(a.argmax(-1) == b.argmax(-1)) * 100:.1f}%"
        )
    print(
        f"load: transformers {t_hf_load:.1f} s, tinyqwen {t_tq_load:.1f} s; "
        f"forward [{args.batch}, {args.seq_len}]: transformers {t_hf:.2f} s, tinyqwen {t_tq:.2f} s"
    )
    if not args.keep:
        shutil.rmtree(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
