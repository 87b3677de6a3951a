"""Generation: prefill the prompt into the KV cache, then decode one token at a time.

    prompt ids ──► prefill (whole prompt, or chunks of it) ──► logits of the last position
                                                                   │ sample (tinyqwen.sampling)
              ┌──────────── feed the new token (one position) ◄────┘
              └─► logits ─► sample ─► ... until an eos id or max_new_tokens

Every forward pass after the prefill sees one new token and reads all earlier keys and values from the cache, so
decoding costs one position per step instead of the whole sequence.

A *batch* of prompts of different lengths is left-padded to a rectangle. An attention mask marks the padding
(0) so no real token attends to it, and each row's positions count only its real tokens (`cumsum(mask) - 1`):
every row then computes exactly what it would compute alone. Left, not right, padding: all rows' next tokens
then land in the same, last, column.

    generate(model, ids, max_new_tokens)                  -> list[int]          (the public API)
    generate_batch(model, [ids, ids, ...], max_new_tokens) -> list[list[int]]
    stream_generate(model, ids, max_new_tokens)           -> iterator of ids, as they are made (for a chat UI)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyqwen.backends.contract import CHOOSE, FINISHED
from tinyqwen.errors import GenerationError
from tinyqwen.kv_cache import PREFILL_CHUNK, kv_dtype_name
from tinyqwen.sampling import SamplingParams, sample
from tinyqwen.thinking import EARLY_STOP_TEXT, ThinkingBudget, early_stop_ids

# keyword arguments `generate(**sampling)` accepts, besides the sampling knobs of SamplingParams
_OPTIONS = (
    "seed", "rng", "params", "thinking_budget", "early_stop", "prefill_chunk_size", "pad_token_id", "kv_dtype",
    "device_sampling",
)  # fmt: skip

_KNOBS = ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def generate(
    model,
    prompt_ids: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] | int | None = None,
    **sampling: Any,
) -> list[int]:
    """Generate up to `max_new_tokens` ids after `prompt_ids`; returns only the new ids.

    - `temperature=0` is greedy (arg-max). With `temperature > 0` the other knobs (`top_k`, `top_p`, `min_p`,
      `repetition_penalty`, `presence_penalty`, `frequency_penalty`) default to the checkpoint's
      generation_config.json, as in transformers; pass them to override (`top_k=0`, `top_p=1`, `min_p=0` turn the
      filters off). `seed=` (or `rng=`, a `np.random.Generator`) makes a sampled run reproducible.
    - Generation stops after an eos id (which is returned, as transformers does) or after `max_new_tokens`.
      `eos_token_ids=None` reads them from generation_config.json (Qwen3: 151645 `<|im_end|>`, 151643
      `<|endoftext|>`); `()` never stops early.
    - `thinking_budget=N` closes an open `<think>` block after N thinking tokens by feeding the early-stop text
      (`early_stop=`, a string or ids; default `tinyqwen.thinking.EARLY_STOP_TEXT`); those ids are part of the
      output and count towards `max_new_tokens`.
    - `prefill_chunk_size=C` runs the prompt through the model C tokens at a time (less memory, same result up
      to float32 rounding). Default: prompts longer than `PREFILL_CHUNK` (2048) go in chunks of 2048.
    - `kv_dtype="bfloat16"` (or "float16") stores the KV cache in 2 bytes per value instead of 4 (default
      "float32", exact); see tinyqwen/kv_cache.py.
    - `max_new_tokens` is cut to what fits in the model's context (`max_position_embeddings`).
    - `input_ids=` (transformers' name) is accepted for `prompt_ids`.
    - On a backend that can sample where its logits live (cupy), every sampling step runs there and only the
      chosen ids cross to the host; the ids equal host sampling's with the same seed. `device_sampling=False`
      samples on the host instead.
    - A model whose logits turn NaN or inf stops with a GenerationError naming the step and the first layer
      whose output went non-finite, instead of "choosing" token 0.
    """
    return list(stream_generate(model, prompt_ids, max_new_tokens, temperature, eos_token_ids, **sampling))


def stream_generate(
    model,
    prompt_ids: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] | int | None = None,
    **sampling: Any,
) -> Iterator[int]:
    """Like `generate`, but yields each new id as soon as it is chosen (the chat REPL prints as it goes)."""
    prompt_ids = _prompt_argument(prompt_ids, sampling, "prompt_ids")
    _check_single(prompt_ids)
    for step in _generate_rows(model, [prompt_ids], max_new_tokens, temperature, eos_token_ids, sampling):
        if step[0] is not None:
            yield step[0]


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] | int | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """`generate` for several prompts at once (left padding + attention mask + per-row positions).

    Row i's result equals `generate(model, prompts[i], ...)`. With an integer `seed`, every row draws from its
    own generator seeded with it, so a sampled row also equals its single run with that seed; pass a list of
    seeds to give rows different streams.
    """
    prompts = _prompt_argument(prompts, sampling, "prompts")
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = prompts.tolist()
    if len(prompts) == 0:
        return []
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in _generate_rows(model, prompts, max_new_tokens, temperature, eos_token_ids, sampling):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs


# --------------------------------------------------------------------------------------------- the loop


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one rectangle, padded on the left, and its attention mask.

    Left, so that every row's last real token sits in the last column: the next tokens of all rows are then
    read from, and appended to, the same column.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """  # B prompts -> [B, P] int64 ids, [B, P] int64 mask (1 real token, 0 padding)
    if len(prompts) == 0:
        raise GenerationError("left_pad needs at least one prompt, got none")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for b, prompt in enumerate(prompts):
        if len(prompt):
            ids[b, width - len(prompt) :] = prompt
            mask[b, width - len(prompt) :] = 1
    return ids, mask


@dataclass
class _Row:
    """One sequence's bookkeeping in the decode loop."""

    prompt: list[int]
    rng: np.random.Generator | None
    budget: ThinkingBudget | None
    output: list[int]
    forced: list[int]  # ids to feed before the model may choose again (the early-stop text)
    done: bool = False


def _generate_rows(model, prompts, max_new_tokens, temperature, eos_token_ids, sampling) -> Iterator[list]:
    """Yield, per decode step, a list with each row's new id (None for rows already finished)."""
    params, options = _resolve_sampling(model, temperature, sampling)
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    prompts = [_check_prompt(p, vocab, i, len(prompts)) for i, p in enumerate(prompts)]
    if max_new_tokens is None:
        raise GenerationError(
            "max_new_tokens is required: the most new ids to generate, e.g. max_new_tokens=64"
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 0
    ):
        raise GenerationError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise GenerationError(
            f"prompt has {longest} tokens but the model's context is {context} tokens "
            f"(max_position_embeddings): shorten the prompt"
        )
    max_new_tokens = min(int(max_new_tokens), context - longest)
    if max_new_tokens == 0:
        return
    eos = _resolve_eos(model, eos_token_ids, vocab)
    rows = _make_rows(prompts, params, options)
    batched = len(rows) > 1
    # a device backend (cupy) samples where its logits are: only the chosen ids cross to the host each step
    backend = getattr(model, "backend", None)  # a model-shaped stand-in (the tests' StubModel) may have none
    sampler = None
    if backend is not None and options["device_sampling"] is not False:
        sampler = backend.device_sampler(params, [row.prompt for row in rows], vocab)  # None: host sampling
    on_device = sampler is not None

    # prefill: left-pad to a rectangle; the running mask covers every column the cache will ever hold
    B, P = len(rows), longest
    pad = options["pad_token_id"]
    ids, prompt_mask = left_pad([row.prompt for row in rows], pad)  # [B, P] x2
    mask = np.concatenate([prompt_mask, np.ones((B, max_new_tokens), dtype=np.int64)], axis=1)
    kv_dtype = options["kv_dtype"]
    cache = (
        model.new_cache(B, P + max_new_tokens)
        if kv_dtype == "float32"
        else model.new_cache(B, P + max_new_tokens, dtype=kv_dtype)
    )
    chunk = options["prefill_chunk_size"] or (PREFILL_CHUNK if P > PREFILL_CHUNK else P)
    device = {"on_device": True} if on_device else {}  # the logits stay the backend's array
    for start in range(0, P, chunk):
        end = min(start + chunk, P)
        out = model.forward(ids[:, start:end], cache=cache, attention_mask=mask[:, :end] if batched else None,
                            last_only=True, **device)  # fmt: skip
    for row in rows:
        if row.budget is not None:
            row.forced.extend(row.budget.pending())

    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]  # [B, vocab]
        chosen = _choose_on_device(model, sampler, rows, params, logits, step) if on_device else None
        if not on_device and not np.isfinite(logits).all():  # one cheap pass; the diagnosis only on failure
            _check_finite(model, rows, logits, step)
        new: list[int | None] = []
        for b, row in enumerate(rows):
            if row.done:
                new.append(None)
                continue
            if row.forced:
                token = row.forced.pop(0)
            elif chosen is not None:
                token = int(chosen[b])
            else:
                token = sample(logits[b], row.rng, params, row.prompt, row.output)
            row.output.append(token)
            if row.budget is not None:
                row.forced.extend(row.budget.step(token))
            row.done = token in eos
            new.append(token)
        yield new
        if all(row.done for row in rows) or step == max_new_tokens - 1:
            return
        # finished rows keep the batch rectangular with a pad token; nothing reads their results
        feed = np.array([[pad if t is None else t] for t in new], dtype=np.int64)  # [B, 1]
        end = cache.length + 1
        out = model.forward(
            feed, cache=cache, attention_mask=mask[:, :end] if batched else None, last_only=True, **device
        )


def _choose_on_device(model, sampler, rows: list[_Row], params: SamplingParams, logits, step: int):
    """Every live row's next id from the device sampler: [B] ids on the host (forced rows get their forced id).

    The uniform numbers are drawn here, row by row, exactly when the host sampler would draw them, so a seeded run
    equals host sampling. A forced id (the thinking budget's early-stop text) goes to the device too, so its
    penalty counts stay right.
    """
    u, forced = [], []
    for row in rows:
        sampling = not row.done and not row.forced
        u.append(row.rng.random() if sampling and not params.greedy else 0.0)
        forced.append(FINISHED if row.done else row.forced[0] if row.forced else CHOOSE)
    chosen = sampler.choose(logits, u, forced)
    if (chosen == -1).any():  # a row's logits are NaN or infinite: bring them over once, to say where from
        _check_finite(model, rows, model.backend.to_numpy(logits), step)
        raise GenerationError(f"the model's logits are not finite when choosing new token {step + 1}")
    return chosen


def _check_finite(model, rows: list[_Row], logits: np.ndarray, step: int) -> None:
    """Raise when a live row's logits hold NaN/inf (finished rows' logits are never read), saying where it came
    from: the step, and the first hidden state (embeddings, then each layer's output) that is non-finite, found
    by running that row's whole sequence again with every hidden state kept."""
    bad = [b for b, row in enumerate(rows) if not row.done and not np.isfinite(logits[b]).all()]
    if not bad:
        return
    b = bad[0]
    kind = "NaN" if np.isnan(logits[b]).any() else "infinite"
    where = f" in batch row {b}" if len(rows) > 1 else ""
    message = f"the model's logits are {kind} when choosing new token {step + 1}{where}"
    first = _first_non_finite(model, rows[b].prompt + rows[b].output)
    if first == "":
        # the same sequence run alone is finite everywhere: the batch's padding or the cache made the NaN
        raise GenerationError(
            message
            + "; run alone (no padding, no cache) this row's values are all finite, so the padded batch "
            "or the KV cache makes them: e.g. a padding position that may attend to no key, its scores masked "
            "with -inf (softmax 0/0 = NaN, which then spreads through the keys and values of the next layer)"
        )
    if first is not None:
        message += f"; the first non-finite values are in {first}"
    raise GenerationError(message + ": check the checkpoint's weights (a NaN or a huge value) and its config")


def _first_non_finite(model, ids: list[int]) -> str | None:
    """Where the sequence `ids`, run alone, first goes non-finite; "" when it stays finite; None: cannot tell."""
    forward = getattr(model, "forward", None)
    if forward is None or "return_hidden_states" not in inspect.signature(forward).parameters:
        return None  # a model-like object without hidden states: the step alone must do
    out = forward(np.asarray([ids]), return_hidden_states=True)
    hidden = out.hidden_states  # [embeddings, layer 0, ...]
    for i, h in enumerate(hidden):
        if not np.isfinite(h).all():
            return "the token embeddings" if i == 0 else f"the output of layer {i - 1} (of {len(hidden) - 1})"
    if np.isfinite(out.logits).all():
        return ""
    return "the final norm or lm_head (every layer's output is finite)"


def _prompt_argument(prompt, sampling: dict, name: str):
    """The prompt argument, or transformers' name for it, `input_ids=`, taken out of `sampling`."""
    if "input_ids" in sampling:
        if prompt is not None:
            raise GenerationError(f"pass the prompt once: {name} or input_ids, not both")
        prompt = sampling.pop("input_ids")
    if prompt is None:
        raise GenerationError(f"no prompt: pass the ids as {name} (or input_ids=)")
    return prompt


def _resolve_sampling(model, temperature, sampling: dict) -> tuple[SamplingParams, dict]:
    """Split `**sampling` into SamplingParams (generation_config defaults + overrides) and loop options."""
    unknown = sorted(set(sampling) - set(_OPTIONS) - set(_KNOBS))
    if unknown:
        raise GenerationError(
            f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(_KNOBS + _OPTIONS)}"
        )
    options = {name: sampling.get(name) for name in _OPTIONS}
    gen_config = getattr(model, "generation_config", None) or {}
    if options["params"] is not None:
        base = options["params"]
        if not isinstance(base, SamplingParams):
            raise GenerationError(f"params must be a SamplingParams, got {type(base).__name__}")
    else:
        # the checkpoint's top_k/top_p/... are the defaults; temperature is always the argument's
        knobs = {k: v for k, v in gen_config.items() if k in _KNOBS}
        base = SamplingParams.from_generation_config(knobs)
    params = base.override(temperature=temperature, **{k: sampling.get(k) for k in _KNOBS})
    if options["pad_token_id"] is None:
        options["pad_token_id"] = _first_int(gen_config.get("pad_token_id"), default=0)
    chunk = options["prefill_chunk_size"]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise GenerationError(f"prefill_chunk_size must be a whole number > 0, got {chunk!r}")
    options["kv_dtype"] = kv_dtype_name(options["kv_dtype"] or "float32")
    if options["device_sampling"] not in (None, True, False):
        raise GenerationError(f"device_sampling must be True or False, got {options['device_sampling']!r}")
    budget = options["thinking_budget"]
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise GenerationError(f"thinking_budget must be a whole number >= 0, got {budget!r}")
    return params, options


def _make_rows(prompts: list[list[int]], params: SamplingParams, options: dict) -> list[_Row]:
    seed, rng = options["seed"], options["rng"]
    if seed is not None and rng is not None:
        raise GenerationError("pass either seed= or rng=, not both")
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise GenerationError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise GenerationError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    stop_ids: list[int] | None = None
    if options["thinking_budget"] is not None:
        stop = options["early_stop"] if options["early_stop"] is not None else EARLY_STOP_TEXT
        stop_ids = early_stop_ids(stop) if isinstance(stop, str) else [int(t) for t in stop]

    rows = []
    for prompt, s in zip(prompts, seeds, strict=True):
        if params.greedy:
            row_rng = None
        elif rng is not None:
            row_rng = rng  # one shared stream, drawn row by row
        else:
            row_rng = np.random.default_rng(s)  # s = None: fresh entropy, not reproducible
        budget = None
        if stop_ids is not None:
            budget = ThinkingBudget.for_prompt(prompt, options["thinking_budget"], stop_ids)
        rows.append(_Row(prompt=prompt, rng=row_rng, budget=budget, output=[], forced=[]))
    return rows


def _resolve_eos(model, eos_token_ids, vocab: int) -> frozenset[int]:
    if eos_token_ids is None:
        gen_config = getattr(model, "generation_config", None) or {}
        eos_token_ids = gen_config.get("eos_token_id")
        if eos_token_ids is None:
            eos_token_ids = getattr(model.config, "eos_token_id", None)
        if eos_token_ids is None:
            eos_token_ids = ()
    if isinstance(eos_token_ids, (int, np.integer)) and not isinstance(eos_token_ids, bool):
        eos_token_ids = (eos_token_ids,)
    try:
        eos = frozenset(int(t) for t in eos_token_ids)
    except (TypeError, ValueError):
        raise GenerationError(f"eos_token_ids must be ids (ints), got {eos_token_ids!r}") from None
    bad = [t for t in eos if not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"eos id {bad[0]} is outside the vocabulary [0, {vocab})")
    return eos


def _check_single(prompt_ids) -> None:
    if isinstance(prompt_ids, np.ndarray) and prompt_ids.ndim != 1:
        raise GenerationError(
            f"prompt_ids must be one sequence of ids (shape [T]), got shape {list(prompt_ids.shape)}; "
            "pass ids[0] for a [1, T] array, or use generate_batch for several prompts"
        )
    if (
        not isinstance(prompt_ids, np.ndarray)
        and len(prompt_ids)
        and isinstance(prompt_ids[0], (list, tuple))
    ):
        raise GenerationError(
            "prompt_ids must be one sequence of ids; use generate_batch for several prompts"
        )


def _check_prompt(prompt, vocab: int, index: int, count: int) -> list[int]:
    where = "prompt" if count == 1 else f"prompt {index}"
    try:
        ids = np.asarray(prompt)
    except ValueError:
        raise GenerationError(f"{where} is not a flat sequence of ids") from None
    if ids.ndim != 1:
        raise GenerationError(f"{where} must be a flat sequence of ids, got shape {list(ids.shape)}")
    if ids.size == 0:
        raise GenerationError(f"{where} is empty: generation needs at least one token to start from")
    if ids.dtype.kind not in "iu":
        raise GenerationError(f"{where} must hold integer ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        position = int(np.argmax(bad))
        raise GenerationError(
            f"{where}: id {int(ids[position])} at position {position} is outside [0, {vocab})"
        )
    return [int(t) for t in ids]


def _first_int(value, default: int) -> int:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default
