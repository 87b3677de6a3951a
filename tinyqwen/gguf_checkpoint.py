"""A llama.cpp GGUF file as a tinyqwen checkpoint: the config from its metadata, its tensors under Hugging Face names.

llama.cpp's converter renames every tensor and keeps the hyperparameters as typed metadata keys prefixed by the
architecture (`qwen3.` or `qwen3moe.`). This module maps them back, so `tinyqwen.load_model("x.gguf")` reuses the
loader that reads Hugging Face checkpoints:

    token_embd.weight                 model.embed_tokens.weight
    blk.N.attn_norm.weight            model.layers.N.input_layernorm.weight
    blk.N.attn_{q,k,v}.weight         model.layers.N.self_attn.{q,k,v}_proj.weight
    blk.N.attn_output.weight          model.layers.N.self_attn.o_proj.weight
    blk.N.attn_{q,k}_norm.weight      model.layers.N.self_attn.{q,k}_norm.weight
    blk.N.ffn_norm.weight             model.layers.N.post_attention_layernorm.weight
    blk.N.ffn_{gate,up,down}.weight   model.layers.N.mlp.{gate,up,down}_proj.weight
    blk.N.ffn_gate_inp.weight         model.layers.N.mlp.gate.weight                (the MoE router)
    blk.N.ffn_{gate,up,down}_exps     model.layers.N.mlp.experts.E.{...}_proj.weight (one [E, rows, cols] stack)
    output_norm.weight                model.norm.weight
    output.weight                     lm_head.weight      (absent: the embedding is tied)

For Qwen3 the converter does not permute the q/k rows (that is done for LLaMA's interleaved RoPE only; Qwen uses
the half-split "NeoX" rotation as transformers does): a bf16 GGUF tensor is the safetensors tensor byte for byte.

    metadata key (prefix qwen3. / qwen3moe.)     config.json
    block_count                                  num_hidden_layers
    context_length                               max_position_embeddings
    embedding_length                             hidden_size
    feed_forward_length                          intermediate_size
    expert_feed_forward_length                   moe_intermediate_size
    expert_count, expert_used_count              num_experts, num_experts_per_tok
    attention.head_count, .head_count_kv         num_attention_heads, num_key_value_heads
    attention.key_length                         head_dim
    attention.layer_norm_rms_epsilon             rms_norm_eps
    rope.freq_base                               rope_theta
    rope.scaling.{type,factor,original_context_length}   rope_scaling (YaRN)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from tinyqwen.config import Qwen3Config, config_from_dict, load_config
from tinyqwen.errors import GGUFError
from tinyqwen.gguf import GGUFFile, GGUFTensorInfo, StringArray
from tinyqwen.quantization import QuantizedTensor

ARCHITECTURES = {"qwen3": "qwen3", "qwen3moe": "qwen3_moe"}  # general.architecture -> model_type

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EXPERT_STACKS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by its suffix; the reader checks the magic)."""
    return str(path).lower().endswith(".gguf")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None for an expert stack or an unknown name).

    >>> hf_name("blk.3.attn_output.weight"), hf_name("token_embd.weight"), hf_name("rope_freqs.weight")
    ('model.layers.3.self_attn.o_proj.weight', 'model.embed_tokens.weight', None)
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def gguf_name(hf: str) -> str | None:
    """The inverse of `hf_name` (expert tensors excepted)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.weight"
    return None


def load_any_config(path: str | os.PathLike) -> Qwen3Config:
    """config.json of a checkpoint folder, or the config a .gguf file's metadata describes."""
    if is_gguf(path) and Path(path).is_file():
        with GGUFFile(path) as f:
            return config_from_gguf(f)
    return load_config(path)


def config_from_gguf(f: GGUFFile) -> Qwen3Config:
    """The Qwen3Config that a GGUF file's metadata describes (see the table in the module docstring)."""
    md, source = f.metadata, f"{f.path} (GGUF metadata)"
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{f.path}: general.architecture is {arch!r}; tinyqwen runs {' and '.join(map(repr, ARCHITECTURES))}"
        )

    def key(name: str, default=...):
        full = f"{arch}.{name}"
        if full not in md:
            if default is ...:
                raise GGUFError(f"{f.path}: metadata key {full!r} is missing")
            return default
        value = md[full]
        return value.item() if isinstance(value, np.generic) else value

    if "token_embd.weight" not in f.tensors:
        raise GGUFError(f"{f.path}: tensor 'token_embd.weight' is missing")
    vocab = f.tensors["token_embd.weight"].shape[0]
    heads = key("attention.head_count")
    d = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": vocab,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length", 0 if arch == "qwen3moe" else ...),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", None),
        "rms_norm_eps": float(
            str(np.float32(key("attention.layer_norm_rms_epsilon")))
        ),  # 1e-06, not 9.99e-07
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    if d["head_dim"] is None:
        del d["head_dim"]
    if isinstance(d["num_key_value_heads"], np.ndarray):
        raise GGUFError(
            f"{f.path}: per-layer head counts ({arch}.attention.head_count_kv array) are not supported"
        )
    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none", "linear") or (
        scaling == "linear" and key("rope.scaling.factor", 1.0) != 1.0
    ):
        d["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(key("rope.scaling.factor")),
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
        }
    if arch == "qwen3moe":
        d.update(
            num_experts=key("expert_count"),
            num_experts_per_tok=key("expert_used_count"),
            moe_intermediate_size=key("expert_feed_forward_length"),
            norm_topk_prob=True,  # llama.cpp's qwen3moe graph always renormalizes the top-k weights
        )
    for name, meta in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{meta}" in md:
            d[name] = int(md[f"tokenizer.ggml.{meta}"])
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            raise GGUFError(f"{f.path}: metadata for {k} is an array; a single number is expected")
    return config_from_dict(d, source)


class GGUFCheckpoint:
    """A GGUF file behind the interface of `tinyqwen.checkpoint.Checkpoint`: tensors under their Hugging Face names.

    `get` gives float32 (F16/BF16 widened) or a `QuantizedTensor` (still in blocks, a view of the file); each MoE
    expert is a slice of its layer's stack, and `stacked(names)` hands back the whole stack without a copy.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.files = (self.path,)
        self._names: dict[str, tuple[str, int | None]] = {}  # HF name -> (GGUF name, expert index or None)
        for name, info in self.file.tensors.items():
            m = _BLOCK.fullmatch(name)
            if m and m.group(2) in _EXPERT_STACKS:
                if len(info.shape) != 3:
                    raise GGUFError(
                        f"{self.path}: tensor {name!r} has shape {list(info.shape)}, expected 3 dims"
                    )
                for e in range(info.shape[0]):
                    hf = f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_STACKS[m.group(2)]}.weight"
                    self._names[hf] = (name, e)
            else:
                self._names[hf_name(name) or name] = (name, None)
        self.config = config_from_gguf(self.file)

    def keys(self) -> set[str]:
        return set(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def _where(self, name: str) -> tuple[GGUFTensorInfo, int | None]:
        if name not in self._names:
            raise GGUFError(f"{self.path}: no tensor for {name!r}")
        g, e = self._names[name]
        return self.file.tensors[g], e

    def shape(self, name: str) -> tuple[int, ...]:
        info, e = self._where(name)
        return info.shape[1:] if e is not None else info.shape

    def dtype(self, name: str) -> str:
        return self._where(name)[0].ggml_type

    def raw(self, name: str) -> np.ndarray:
        info, e = self._where(name)
        raw = self.file.raw(info.name)
        return raw[e] if e is not None else raw

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The stored values copied into process memory (into `out` when given), read from the file rather than
        through its mapping, so that only this copy stays resident (see `GGUFFile.read_into`)."""
        info, e = self._where(name)
        raw = self.raw(name)  # (a view: its shape and dtype only, no page is touched)
        if out is None:
            out = np.empty(raw.shape, raw.dtype)
        elif out.shape != raw.shape or out.dtype != raw.dtype:
            raise GGUFError(
                f"{self.path}: tensor {name!r} is {raw.dtype} {list(raw.shape)}; cannot read it into a "
                f"{out.dtype} {list(out.shape)} array"
            )
        return self.file.read_into(info.name, out, e or 0)

    def get(self, name: str):
        info, e = self._where(name)
        value = self.file.get(info.name)
        return value[e] if e is not None else value

    def stacked(self, names: list[str]):
        """The experts `names` (in order) as one array or QuantizedTensor when they are one whole GGUF stack."""
        where = [self._names.get(n) for n in names]
        if (
            None in where
            or len({g for g, _ in where}) != 1
            or [e for _, e in where] != list(range(len(names)))
        ):
            return None
        g = where[0][0]
        if self.file.tensors[g].shape[0] != len(names):
            return None
        value = self.file.get(g)
        return value if isinstance(value, QuantizedTensor) else np.asarray(value, np.float32)

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each ggml type the file holds, e.g. {"Q4_K": 168, "Q6_K": 29, "F32": 113}."""
        counts: dict[str, int] = {}
        for t in self.file.tensors.values():
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        return counts

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r})"


def generation_config_from_gguf(f: GGUFFile) -> dict:
    """What generation needs from the metadata: the ids that end a reply. llama.cpp stops at the eos (and eot) id
    and at every control token it knows as an end of generation; for Qwen that adds <|endoftext|> to <|im_end|>,
    the same pair as Qwen3's generation_config.json ([151645, 151643])."""
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in f.metadata and int(f.metadata[key]) not in eos:
            eos.append(int(f.metadata[key]))
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if isinstance(
        tokens, (list, StringArray)
    ):  # (a StringArray finds them by their bytes: no string is made)
        for text in ("<|im_end|>", "<|endoftext|>"):
            try:
                i = tokens.index(text)
            except ValueError:
                continue
            if i not in eos:
                eos.append(i)
    return {"eos_token_id": eos} if eos else {}
