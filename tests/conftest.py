"""Shared test helpers.

- `StubModel`: a model-shaped object (config, generation_config, new_cache, forward) whose next-token logits are
  a pure function of each row's own history. It lets the generation loop, the thinking budget and sampling be
  tested exactly, with no weights.
- `tiny_qwen3_dir`: a tiny random Qwen3 checkpoint with the REAL vocabulary (151,936 rows) and the real
  tokenizer files, built once per session in a temporary folder (too big to commit: ~20 MB of float32).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinyqwen.errors import GenerationError

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DATA = REPO / "tinyqwen" / "data"
QWEN3_VOCAB = 151936


# ------------------------------------------------------------------------------------------ stub model


@dataclass
class StubCache:
    batch_size: int
    max_len: int
    length: int = 0
    history: list[list[int]] = field(default_factory=list)  # every id fed, per row (padding included)


class StubModel:
    """next-token logits = `rule(history_of_real_ids)` for each row; records every forward call.

    The attention mask is honoured the way the real model does (padding ids are not part of a row's history),
    so a left-padded batch row sees exactly what it would see alone.
    """

    def __init__(
        self,
        rule: Callable[[list[int]], np.ndarray],
        vocab_size: int = QWEN3_VOCAB,
        max_position_embeddings: int = 4096,
        generation_config: dict | None = None,
    ):
        self.rule = rule
        self.config = SimpleNamespace(
            vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, eos_token_id=None
        )
        self.generation_config = generation_config if generation_config is not None else {}
        self.calls: list[tuple[int, int]] = []  # (batch, new tokens) per forward

    def new_cache(self, batch_size: int, max_len: int) -> StubCache:
        return StubCache(batch_size, max_len, history=[[] for _ in range(batch_size)])

    def forward(self, ids, *, cache=None, attention_mask=None, positions=None, last_only=False, **_):
        ids = np.asarray(ids)
        B, T = ids.shape
        assert cache is not None and cache.length + T <= cache.max_len, "stub: cache overflow"
        if attention_mask is None:
            attention_mask = np.ones((B, cache.length + T), dtype=np.int64)
        assert attention_mask.shape == (B, cache.length + T), "stub: mask must cover past + new"
        self.calls.append((B, T))
        logits = np.zeros((B, T, self.config.vocab_size), dtype=np.float32)
        for b in range(B):
            for t in range(T):
                if attention_mask[b, cache.length + t]:
                    cache.history[b].append(int(ids[b, t]))
                if cache.history[b]:  # a padding column before the row's first token: logits unused
                    logits[b, t] = self.rule(cache.history[b])
        cache.length += T
        if last_only:
            logits = logits[:, -1:]
        return SimpleNamespace(logits=logits)


def logits_through_cache(model, ids: np.ndarray, prefill: int = 5):  # [B, T] -> ([B, T, vocab], the cache)
    """The logits of `ids` computed the way generation does: the first `prefill` positions at once into a fresh KV
    cache, then one position at a time (decode). Equal to one full forward when the cache path is right."""
    cache = model.new_cache(batch_size=ids.shape[0], max_len=ids.shape[1])
    steps = [model.forward(ids[:, :prefill], cache=cache).logits]
    steps += [model.forward(ids[:, t : t + 1], cache=cache).logits for t in range(prefill, ids.shape[1])]
    return np.concatenate(steps, axis=1), cache


def one_hot_rule(next_id: Callable[[list[int]], int], vocab: int = QWEN3_VOCAB) -> Callable:
    """A rule whose arg-max is `next_id(history)` by a wide margin (10 logits)."""

    def rule(history: list[int]) -> np.ndarray:
        logits = np.zeros(vocab, dtype=np.float32)
        logits[next_id(history)] = 10.0
        return logits

    return rule


def hashed_rule(vocab: int = 64) -> Callable:
    """Random-looking but deterministic logits from the last two ids: for sampling tests over a small vocab."""

    def rule(history: list[int]) -> np.ndarray:
        key = history[-1] * 1000 + (history[-2] if len(history) > 1 else 0)
        return np.random.default_rng(key).normal(0.0, 2.0, vocab).astype(np.float32)

    return rule


@pytest.fixture
def stub_model_factory():
    return StubModel


# ------------------------------------------------------------------------------------------ tiny checkpoint


def tiny_qwen3_config(**overrides) -> dict:
    """config.json in the official Qwen3 layout (see Qwen3-0.6B's), shrunk but with the real vocabulary."""
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 1024,
        "max_window_layers": 2,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": QWEN3_VOCAB,
    }
    config.update(overrides)
    return config


QWEN3_GENERATION_CONFIG = {  # the official Qwen3 generation_config.json values
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def tiny_qwen3_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    H, I, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def w(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": w(config["vocab_size"], H, scale=0.5),
        "model.norm.weight": w(H) + 1,
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": w(H) + 1,
            p + "post_attention_layernorm.weight": w(H) + 1,
            p + "self_attn.q_proj.weight": w(nq * d, H),
            p + "self_attn.k_proj.weight": w(nkv * d, H),
            p + "self_attn.v_proj.weight": w(nkv * d, H),
            p + "self_attn.o_proj.weight": w(H, nq * d),
            p + "self_attn.q_norm.weight": w(d) + 1,
            p + "self_attn.k_norm.weight": w(d) + 1,
            p + "mlp.gate_proj.weight": w(I, H),
            p + "mlp.up_proj.weight": w(I, H),
            p + "mlp.down_proj.weight": w(H, I),
        }
    return tensors


def write_tiny_qwen3(folder: Path, with_tokenizer: bool = True, **config_overrides) -> Path:
    """Write a tiny random Qwen3 checkpoint (+ generation_config, + the packaged tokenizer files)."""
    from safetensors.numpy import save_file  # dev dependency; independent of tinyqwen's own reader

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen3_config(**config_overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "generation_config.json").write_text(
        json.dumps(QWEN3_GENERATION_CONFIG, indent=4, sort_keys=True)
    )
    save_file(tiny_qwen3_tensors(config), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if with_tokenizer:
        copied = 0
        for name in TOKENIZER_FILES:
            if (PACKAGE_DATA / name).is_file():
                shutil.copy(PACKAGE_DATA / name, folder / name)
                copied += 1
        if copied == 0:
            pytest.skip(f"no tokenizer files in {PACKAGE_DATA} yet")
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 checkpoint with the real vocabulary and tokenizer (session-wide, read-only)."""
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "Tiny-Qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_model(tiny_qwen3_dir):
    import tinyqwen

    return tinyqwen.load_model(tiny_qwen3_dir)


__all__ = ["GenerationError", "StubModel", "one_hot_rule", "hashed_rule", "write_tiny_qwen3"]
