"""`--kernels exercises`: chat or generate with the learner's own functions running inside a real model.

    tinyqwen chat --model Qwen/Qwen3-0.6B --kernels exercises       # your exercises/chNN_*.py
    tinyqwen generate --model Qwen/Qwen3-0.6B --kernels solutions "Hi"   # the course's solutions, for comparison

The model is the graded exercises' one (exercises/learner.py, the mechanism every chapter's model checkpoints use):
your loader reads the weights; your embed, norms, RoPE, mask, attention, MLP, MoE and KV cache run the forward; your
tokenizer (chapter 1) and chat template (chapter 9) make the prompt; your greedy loop (chapter 8) generates with
--temperature 0, and your sampling_distribution (chapter 8) picks each token otherwise. A function still left as
its stub falls back to tinyqwen's own; one line on stderr says which of yours are in the model before the first
reply, and another which of them ran, at the end. A function of yours that raises stops the command with one line
naming it (exit code 1).

Decision: the course's `exercises/` folder is not part of the installed package; it is found beside `tinyqwen/` in a
source checkout (where a learner works). Without it, or with another backend than numpy (your functions take
NumPy arrays), the command refuses in one line. Without the model (a Hub id that is not cached and cannot be
downloaded), it runs on a tiny random Qwen3 with the real tokenizer — the test fixtures' recipe — and says so: the
words are real tokens, the replies are noise, and every function of yours still runs.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tinyqwen.errors import CheckpointError, TinyQwenError

KERNELS = ("tinyqwen", "exercises", "solutions")
LAST_CHAPTER = 9  # chapters after 9 (speed, serving, training) have nothing the NumPy model runs


def exercises_root() -> Path:
    """The checkout holding `exercises/` beside `tinyqwen/`, or a one-line error."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "exercises" / "learner.py").is_file():
        raise TinyQwenError(
            "--kernels exercises needs the course's exercises/ folder beside tinyqwen/ (a clone of the repository "
            f"with pip install -e); none at {root / 'exercises'}"
        )
    return root


def your_code(which: str):
    """exercises.learner.YourCode over the learner's files ("exercises") or the solutions, stubs falling back."""
    root = exercises_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    grading = importlib.import_module("exercises.grading")  # a plugin found at run time, not a dependency
    learner = importlib.import_module("exercises.learner")
    course = grading.Course(solutions=which == "solutions")
    return learner.YourCode(course, upto=LAST_CHAPTER, fallback=True, strict_errors=True)


def tiny_stand_in(reason: str) -> Path:
    """A tiny random Qwen3 with the real tokenizer (tinyqwen.testing's recipe), written to a temporary folder."""
    import atexit
    import shutil

    from tinyqwen.testing import END_TO_END_SCALE, write_tiny_qwen3

    folder = Path(tempfile.mkdtemp(prefix="tinyqwen-yours-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    print(
        f"tinyqwen: note: {reason} — running your functions on a tiny random Qwen3 with the real tokenizer instead "
        "(the test fixtures' recipe): real tokens, noise for replies",
        file=sys.stderr,
    )
    return write_tiny_qwen3(folder, seed=0, scale=END_TO_END_SCALE)


def load_yours(args):
    """(model, tokenizer) for --kernels exercises|solutions; prints which of the learner's functions are in."""
    from tinyqwen.cli.loading import load_tokenizer
    from tinyqwen.config import load_config
    from tinyqwen.hub import is_hub_id, resolve_model

    if args.backend != "numpy":
        raise TinyQwenError(
            f"--kernels {args.kernels} runs your NumPy functions: it needs --backend numpy, got {args.backend}"
        )
    code = your_code(args.kernels)
    try:
        path = resolve_model(args.model)
    except CheckpointError as error:
        if not is_hub_id(str(args.model)):
            raise
        why = str(error).splitlines()[0].split(";")[0].removeprefix(f"model {args.model!r} ")
        path = tiny_stand_in(f"{args.model} is not available here ({why})")
    config = load_config(path)
    tokenizer = load_tokenizer(path, getattr(args, "tokenizer", None), config)
    model = code.model(path)
    yours = ", ".join(f"{name} (ch {code.chapter[name]})" for name in code.functions)
    if not yours:
        line = "none of your functions yet (every one is still its stub): tinyqwen's own run instead"
    else:
        line = f"your {yours}" + (
            f"; tinyqwen's for the stubs: {', '.join(code.stubs)}" if code.stubs else ""
        )
    print(f"tinyqwen: --kernels {args.kernels}: {line}", file=sys.stderr)
    return model, YourTokenizer(tokenizer, code)


def report(model) -> None:
    """At the end of a command: which of the learner's functions ran (nothing for tinyqwen's own kernels)."""
    code = getattr(model, "your_code", None)
    if code is not None:
        print(f"tinyqwen: {code.report()}", file=sys.stderr)


class YourTokenizer:
    """tinyqwen's Tokenizer, whose encode, decode and chat template are the learner's where written.

    Everything else (streaming decode for the terminal, special ids) is tinyqwen's: the same vocabulary either way.
    """

    def __init__(self, tokenizer, code):
        self._tokenizer, self._code = tokenizer, code
        self._files = None

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def _tables(self):  # (vocab, ranks, added, id_to_token), as chapter 1's exercises receive them
        if self._files is None:
            t = self._tokenizer
            vocab, ranks = t.vocab, t.ranks
            added = {content: token.id for content, token in t.added_tokens.items()}
            id_to_token = {i: s for s, i in vocab.items()} | {i: s for s, i in added.items()}
            self._files = vocab, ranks, added, id_to_token
        return self._files

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        if not self._code.has("encode") or args or kwargs:
            return self._tokenizer.encode(text, *args, **kwargs)
        vocab, ranks, added, _ = self._tables()
        return [int(i) for i in self._code.traced("encode")(text, vocab, ranks, added)]

    def decode(self, ids: Sequence[int], *args, **kwargs) -> str:
        if not self._code.has("decode") or args or kwargs:
            return self._tokenizer.decode(ids, *args, **kwargs)
        return self._code.traced("decode")([int(i) for i in ids], self._tables()[3])

    def apply_chat_template(self, messages, add_generation_prompt=False, enable_thinking=True, **kwargs):
        if not self._code.has("render_chat") or kwargs.get("tools"):
            return self._tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                **kwargs,
            )
        text = self._code.traced("render_chat")(list(messages), add_generation_prompt, enable_thinking)
        return self.encode(text)


def stream(model, ids: Sequence[int], max_new_tokens: int, eos: Sequence[int], **kwargs) -> Iterator[int]:
    """The reply's ids: the learner's greedy loop or sampler where written and asked for, else tinyqwen's."""
    from tinyqwen.generation import stream_generate

    code = getattr(model, "your_code", None)
    params = kwargs.get("params")
    if code is None or params is None or kwargs.get("thinking_budget") is not None:
        yield from stream_generate(model, ids, max_new_tokens, eos_token_ids=eos, **kwargs)
        return
    if params.greedy and code.has("greedy_generate"):
        loop = code.traced("greedy_generate")
        new = loop(model, [list(ids)], max_new_tokens, pad_id=0, eos_id=eos[0] if eos else None)
        for token in (int(t) for t in new[0]):
            yield token
            if token in eos:
                return
        return
    if not params.greedy and code.has("sampling_distribution"):
        yield from _your_sampling(model, code, ids, max_new_tokens, eos, params, kwargs.get("seed"))
        return
    yield from stream_generate(model, ids, max_new_tokens, eos_token_ids=eos, **kwargs)


def _your_sampling(model, code, ids, max_new_tokens: int, eos, params, seed) -> Iterator[int]:
    """Sampling with the learner's sampling_distribution (chapter 8) at every step, through the model's KV cache."""
    distribution = code.traced("sampling_distribution")
    rng = np.random.default_rng(seed)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    seen, feed = list(ids), np.asarray([ids])
    for _ in range(max_new_tokens):
        logits = model.forward(feed, cache=cache, last_only=True).logits[0, -1]
        probs = np.asarray(
            distribution(logits, list(seen), params.temperature, params.top_k or 0, params.top_p, params.min_p,
                         params.repetition_penalty),
            dtype=np.float64,
        )  # fmt: skip
        total = probs.sum()
        if probs.shape != logits.shape or not np.isfinite(total) or total <= 0:
            raise TinyQwenError(
                f"your sampling_distribution() returned {list(probs.shape)} values summing to {total:.4g}; "
                f"expected {logits.shape[0]} probabilities summing to 1"
            )
        token = int(rng.choice(probs.size, p=probs / total))
        yield token
        if token in eos:
            return
        seen.append(token)
        feed = np.asarray([[token]])
