"""`tinyqwen quantize`: a Hugging Face checkpoint (or a GGUF file) written as a llama.cpp GGUF file, in Q8_0 or Q4_K_M.

Which tensor gets which type follows llama.cpp (`llama_tensor_get_type` in its `llama-quant.cpp`), so the files
look like the ones people download:

    1-D tensors (norms) and the MoE router (ffn_gate_inp)    F32, never quantized
    q8_0      every other matrix                              Q8_0
    q4_k_m    every other matrix                              Q4_K, except:
              the output head (the embedding when tied)       Q6_K
              attn_v and ffn_down of layer i                  Q6_K when use_more_bits(i, n_layers): the first and
                                                              last eighth of the layers, and every third between
    bf16/f32  every matrix as it is stored                    BF16 / F32

A row that is not a whole number of 256-value super-blocks cannot be Q4_K or Q6_K; llama.cpp falls back to Q5_0 or
Q8_0 there, tinyqwen (which has no Q5_0) always to Q8_0 — only tiny test models have such rows.

The quantizers are `tinyqwen.quantization`'s ports of llama.cpp's reference quantizers (without an importance
matrix, as `llama-quantize` runs by default), so the blocks are llama.cpp's own: on the random-weight Qwen3-0.6B,
`--to q8_0` wrote llama.cpp's converter's file and `--to q4_k_m` llama.cpp's quantizer's, every tensor byte for byte
(tests/test_gguf_crosscheck.py). NumPy is slow at it: 30 s for q8_0 and 3.5 minutes for q4_k_m of the 0.6B model on
a shared 2-core machine (llama.cpp's C takes 30 s for the Q4_K_M).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinyqwen.bf16 import float32_to_bf16
from tinyqwen.checkpoint import Checkpoint
from tinyqwen.config import Qwen3Config, load_config
from tinyqwen.errors import CheckpointError
from tinyqwen.gguf import LazyTensor, write_gguf
from tinyqwen.gguf_checkpoint import GGUFCheckpoint, gguf_name, is_gguf
from tinyqwen.quantization import QuantizedTensor

TARGETS = ("q8_0", "q4_k_m", "bf16", "f32")
FILE_TYPES = {
    "f32": 0,
    "bf16": 32,
    "q8_0": 7,
    "q4_k_m": 15,
}  # llama.cpp's llama_ftype numbers (general.file_type)
TOKEN_TYPES = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}  # tokenizer.ggml.token_type values


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixes.

    >>> [i for i in range(28) if use_more_bits(i, 28)]
    [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    """
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], config: Qwen3Config, target: str) -> str:
    """The ggml type llama.cpp gives GGUF tensor `name` (shape in NumPy order) when quantizing to `target`."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    if target in ("f32", "bf16"):
        return target.upper()
    if target == "q8_0":
        return "Q8_0"
    kind = "Q4_K"
    is_head = name == "output.weight" or (config.tie_word_embeddings and name == "token_embd.weight")
    if is_head:
        kind = "Q6_K"
    elif ".attn_v." in name or ".ffn_down" in name:
        layer = int(name.split(".")[1])
        if use_more_bits(layer, config.num_hidden_layers):
            kind = "Q6_K"
    if shape[-1] % 256:
        kind = "Q8_0"  # llama.cpp: Q5_0 for Q4_K, Q8_0 for Q6_K; tinyqwen has no Q5_0
    return kind


def model_metadata(config: Qwen3Config, target: str, name: str) -> dict:
    """The GGUF metadata llama.cpp's converter writes for a Qwen3 config (types as llama.cpp reads them)."""
    arch = "qwen3moe" if config.is_moe else "qwen3"
    md = {
        "general.architecture": (arch, "STRING"),
        "general.name": (name, "STRING"),
        "general.file_type": (FILE_TYPES[target], "UINT32"),
        "general.quantization_version": (2, "UINT32"),
        f"{arch}.block_count": (config.num_hidden_layers, "UINT32"),
        f"{arch}.context_length": (config.max_position_embeddings, "UINT32"),
        f"{arch}.embedding_length": (config.hidden_size, "UINT32"),
        f"{arch}.feed_forward_length": (config.intermediate_size, "UINT32"),
        f"{arch}.attention.head_count": (config.num_attention_heads, "UINT32"),
        f"{arch}.attention.head_count_kv": (config.num_key_value_heads, "UINT32"),
        f"{arch}.attention.key_length": (config.head_dim, "UINT32"),
        f"{arch}.attention.value_length": (config.head_dim, "UINT32"),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), "FLOAT32"),
        f"{arch}.rope.freq_base": (float(config.rope_theta), "FLOAT32"),
    }
    if config.rope_scaling is not None:
        md[f"{arch}.rope.scaling.type"] = ("yarn", "STRING")
        md[f"{arch}.rope.scaling.factor"] = (float(config.rope_scaling.factor), "FLOAT32")
        md[f"{arch}.rope.scaling.original_context_length"] = (
            config.rope_scaling.original_max_position_embeddings,
            "UINT32",
        )
    if config.is_moe:
        md[f"{arch}.expert_count"] = (config.num_experts, "UINT32")
        md[f"{arch}.expert_used_count"] = (config.num_experts_per_tok, "UINT32")
        md[f"{arch}.expert_feed_forward_length"] = (config.moe_intermediate_size, "UINT32")
    return md


def tokenizer_metadata(tokenizer, vocab_size: int, folder: Path | None) -> dict:
    """The tokenizer as GGUF keys ("gpt2" BPE, pre-tokenizer "qwen2"): every id's token string padded to the model's
    vocab_size with [PADi] (UNUSED), the token types (added special-looking tokens CONTROL, other added tokens
    USER_DEFINED, as llama.cpp's converter decides), the merges, the special ids and the chat template."""
    tokens, types = [], []
    for i in range(vocab_size):
        if i >= len(tokenizer):
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPES["unused"])
            continue
        token = tokenizer.id_to_token(i)
        tokens.append(token)
        added = tokenizer.added_tokens.get(token)
        if added is None or added.id != i:
            types.append(TOKEN_TYPES["normal"])
        elif added.special or (token.startswith("<|") and token.endswith("|>")):
            types.append(TOKEN_TYPES["control"])
        else:
            types.append(TOKEN_TYPES["user_defined"])
    merges = [f"{a} {b}" for (a, b), _ in sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])]
    md = {
        "tokenizer.ggml.model": ("gpt2", "STRING"),
        "tokenizer.ggml.pre": ("qwen2", "STRING"),
        "tokenizer.ggml.tokens": (tokens, "ARRAY[STRING]"),
        "tokenizer.ggml.token_type": (np.array(types, np.int32), "ARRAY[INT32]"),
        "tokenizer.ggml.merges": (merges, "ARRAY[STRING]"),
        "tokenizer.ggml.add_bos_token": (False, "BOOL"),
    }
    endoftext = tokenizer.token_to_id("<|endoftext|>")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else endoftext
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else endoftext
    for key, value in (("eos_token_id", eos), ("padding_token_id", pad), ("bos_token_id", endoftext)):
        if value is not None:
            md[f"tokenizer.ggml.{key}"] = (int(value), "UINT32")
    template = None
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, str):
        md["tokenizer.chat_template"] = (template, "STRING")
    return md


def quantize_checkpoint(model: str | Path, target: str, out: str | Path, tokenizer=None, log=None) -> dict:
    """Write checkpoint folder (or GGUF file) `model` as GGUF file `out` in `target` ("q8_0", "q4_k_m", "bf16", "f32").

    Tensors are read and quantized one at a time while the file is written (memory: one tensor, not the model).
    Returns {ggml type: tensor count}. `tokenizer`: a Tokenizer to embed (default: the folder's, else none).
    """
    if target not in TARGETS:
        raise CheckpointError(f"unknown quantization target {target!r} (choose from {', '.join(TARGETS)})")
    folder = Path(model).expanduser()
    if is_gguf(folder) and folder.is_file():
        # a GGUF file in, e.g. a bf16 one a converter wrote: its config and tokenizer from the metadata (the
        # tokenizer keys copied as they are, types included); quantized tensors are dequantized and quantized
        # again, which adds the second format's error to the first's
        if Path(out).expanduser().resolve() == folder.resolve():
            raise CheckpointError(
                f"{out}: the output would overwrite the file being read; choose another path"
            )
        checkpoint = GGUFCheckpoint(folder)
        config = checkpoint.config
        source = checkpoint.file
        metadata = model_metadata(config, target, folder.stem)
        if tokenizer is None:
            metadata |= {
                k: (v, source.types[k]) for k, v in source.metadata.items() if k.startswith("tokenizer.")
            }
        else:
            metadata |= tokenizer_metadata(tokenizer, config.vocab_size, None)
    else:
        config = load_config(folder)
        if tokenizer is None:
            from tinyqwen.tokenizer import Tokenizer

            try:
                tokenizer = Tokenizer.from_pretrained(folder)
            except Exception:
                tokenizer = None
        metadata = model_metadata(config, target, folder.name)
        if tokenizer is not None:
            metadata |= tokenizer_metadata(tokenizer, config.vocab_size, folder)
        checkpoint = Checkpoint(folder)
    counts: dict[str, int] = {}
    tensors: dict[str, LazyTensor] = {}

    def lazy(name: str, shape: tuple[int, ...], read) -> LazyTensor:
        kind = tensor_type(name, shape, config, target)
        counts[kind] = counts.get(kind, 0) + 1

        def make():
            x = read()
            if isinstance(x, QuantizedTensor):  # a GGUF source's blocks, widened to be written in `kind`
                x = x.dequantize()
            if log:
                log(f"{name:32s} {kind:5s} {list(shape)}")
            if kind == "F32":
                return np.asarray(x, np.float32)
            if kind == "BF16":
                return ("BF16", float32_to_bf16(x))
            return QuantizedTensor.quantize(x, kind.lower())

        return LazyTensor(kind, shape, make)

    keys = set(checkpoint.keys())
    for hf in sorted(keys, key=_order):
        if ".mlp.experts." in hf:
            continue
        g = gguf_name(hf)
        if g is None:
            raise CheckpointError(f"{folder}: tensor {hf!r} has no GGUF name")
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors[g] = lazy(g, tuple(checkpoint.shape(hf)), lambda hf=hf: checkpoint.get(hf))
    for i in range(config.num_hidden_layers):
        if not config.is_moe_layer(i):
            continue
        for proj, g in (
            ("gate_proj", "ffn_gate_exps"),
            ("up_proj", "ffn_up_exps"),
            ("down_proj", "ffn_down_exps"),
        ):
            names = [f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" for e in range(config.num_experts)]
            shape = (config.num_experts, *checkpoint.shape(names[0]))
            tensors[f"blk.{i}.{g}.weight"] = lazy(
                f"blk.{i}.{g}.weight", shape, lambda names=names: _stack(checkpoint, names)
            )
    try:
        write_gguf(out, metadata, dict(sorted(tensors.items(), key=lambda kv: _gguf_order(kv[0]))))
    finally:
        checkpoint.close()
    return counts


def _stack(checkpoint, names: list[str]):  # one layer's experts as one [E, ...] tensor
    whole = checkpoint.stacked(names) if isinstance(checkpoint, GGUFCheckpoint) else None
    if whole is not None:  # a GGUF source's own stack, as it is stored
        return whole
    parts = [checkpoint.get(n) for n in names]
    return np.stack([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts])


def _order(hf: str):
    parts = hf.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1, hf)


def _gguf_order(name: str):
    # llama.cpp's order: token_embd, then the layers in order, then output_norm and output
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)
