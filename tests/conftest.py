"""Shared test helpers.

- `StubModel`: a model-shaped object (config, generation_config, new_cache, forward) whose next-token logits are
  a pure function of each row's own history. It lets the generation loop, the thinking budget and sampling be
  tested exactly, with no weights.
- `tiny_qwen3_dir`: a tiny random Qwen3 checkpoint with the REAL vocabulary (151,936 rows) and the real
  tokenizer files (`tinyqwen.testing.write_tiny_qwen3`), built once per session in a temporary folder (too big
  to commit: ~20 MB of float32).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinyqwen.errors import GenerationError
from tinyqwen.testing import QWEN3_VOCAB, write_tiny_qwen3

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ parallel runs


def _lock_numba_cache_files() -> None:
    """Under pytest-xdist (`pytest -n 2`): saving a kernel into Numba's on-disk cache excludes every other save
    and load of the same cache folder.

    Numba writes each cache file atomically, but a save is several steps (read the function's index, pick the first
    free data-file number, write the index, then the data): two workers that finish compiling two signatures of
    one function in the same instant both pick `.1.nbc`, and the index then names the other signature's machine
    code; and a load between the two writes reads an index whose data file is not written yet. An exclusive lock
    on a file in the cache folder around each save (shared around each load) closes both windows. One process
    (plain `pytest`) never races itself, so this is installed only in xdist's workers.
    """
    try:
        import fcntl

        from numba.core import caching
    except ImportError:  # no numba (the `fast` extra), or not POSIX: nothing to guard
        return
    cache_file = caching.IndexDataCacheFile
    if getattr(cache_file, "locked", False):
        return

    def locked(method, mode):
        def call(self, *args):
            try:
                lock = open(Path(self._cache_path) / "tinyqwen-xdist.lock", "a")
            except OSError:  # a folder Numba cannot write either: it saves nothing there
                return method(self, *args)
            with lock:
                fcntl.flock(lock, mode)  # released when the file closes
                return method(self, *args)

        return call

    cache_file.save = locked(cache_file.save, fcntl.LOCK_EX)
    cache_file.load = locked(cache_file.load, fcntl.LOCK_SH)
    cache_file.locked = True


if os.environ.get("PYTEST_XDIST_WORKER"):
    _lock_numba_cache_files()


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


def assert_logits_match_reference(model, ref: dict) -> list[np.ndarray]:
    """A fixture's `reference.npz` (transformers' float32 outputs) against `model`, within `tolerance`: the padded
    batch's logits, the single row's, and the router logits of every MoE layer. Returns the router logits."""
    from tinyqwen.verify import tolerance

    logits, router_logits = model(ref["input_ids"], return_router_logits=True)
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=tolerance(ref["logits"]))
    single = model(ref["single_input_ids"])
    np.testing.assert_allclose(single, ref["single_logits"], rtol=0, atol=tolerance(ref["single_logits"]))
    for got, want in zip(router_logits, ref.get("router_logits", []), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want))
    return router_logits


def assert_cached_decode_matches_reference(model, ref: dict) -> None:
    """Prefill then one position at a time through the KV cache: the same logits as transformers' full forward."""
    from tinyqwen.verify import tolerance

    steps, _ = logits_through_cache(model, ref["input_ids"])
    np.testing.assert_allclose(steps, ref["logits"], rtol=0, atol=tolerance(ref["logits"]))


def assert_greedy_matches_reference(model, also: Callable | None = None) -> None:
    """The fixture's `generate.json` (transformers' greedy tokens): one prompt at a time and as a left-padded batch.
    `also(model, prompt, n)`, when given, is a second way to generate that must give the same tokens."""
    import json

    from tinyqwen.generation import generate, generate_batch

    ref = json.loads((model.path / "generate.json").read_text())
    n = ref["max_new_tokens"]
    for prompt, expected in zip(ref["prompts"], ref["single"], strict=True):
        assert generate(model, prompt, n, eos_token_ids=()) == expected, prompt
        if also is not None:
            assert also(model, prompt, n) == expected, prompt
    batch = generate_batch(model, ref["prompts"], n, eos_token_ids=(), pad_token_id=ref["pad_token_id"])
    assert batch == ref["batch"]["new_tokens"]


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


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 checkpoint with the real vocabulary and tokenizer (session-wide, read-only)."""
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "Tiny-Qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_model(tiny_qwen3_dir):
    import tinyqwen

    return tinyqwen.load_model(tiny_qwen3_dir)


__all__ = ["GenerationError", "StubModel", "one_hot_rule", "hashed_rule"]
