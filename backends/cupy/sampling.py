"""Sampling on the device: the minimal pair (arg-max, temperature sample), DeviceSampler (every option, one id
per row and step to the host) and generate_on_device, a decode loop that samples there.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.backends.contract import CHOOSE
from tinyqwen.errors import GenerationError
from tinyqwen.sampling import SamplingParams


def next_token(ops, logits, temperature: float = 0.0, rng=None):
    """[B, V] logits on the device -> [B] ids on the device: arg-max, or a temperature sample (needs `rng`).

    The minimal pair (argmax_rows, sample_rows: float32, the device's own generator); `DeviceSampler` is the whole
    pipeline (penalties, top-k, top-p, min-p) with the host generator's numbers, equal to host sampling."""
    if temperature <= 0:
        return ops.argmax(logits)
    if rng is None:
        raise GenerationError("sampling with temperature > 0 needs a random generator (pass seed=)")
    return ops.sample(logits, temperature, ops.uniform(rng, logits.shape[0]))


class DeviceSampler:
    """Every sampling option on the device for a batch of rows; per step only the B chosen ids cross to the host.

    It keeps, on the device, which ids each row has seen (prompt + output: the repetition penalty) and how often
    each was generated (presence / frequency); `filter_sample_rows` updates both with the id it picks, so they
    never cross either. The uniform numbers come from the host's generator (one float per row and step, host to
    device): with the same seed the ids equal `tinyqwen.generate`'s host sampler, on any backend.

    >>> from tinyqwen.backends.cupy.twins import NumpyTwins
    >>> s = DeviceSampler(NumpyTwins(), SamplingParams(repetition_penalty=2.0), [[1]], vocab=3)
    >>> s.choose(np.array([[1.0, 1.5, 0.0]], np.float32), [0.0], [CHOOSE]).tolist()  # 1.5 / 2 < 1: id 0
    [0]
    """

    def __init__(self, ops, params: SamplingParams, prompts: list[list[int]], vocab: int):
        self.ops, self.params = ops, params
        seen = np.zeros((len(prompts), vocab), np.uint8)
        for b, prompt in enumerate(prompts):
            seen[b, prompt] = 1
        self.seen = ops.xp.asarray(seen)  # [B, V] uploaded once
        self.counts = ops.xp.zeros((len(prompts), vocab), np.int32)  # [B, V]

    def choose(self, logits, u, forced) -> np.ndarray:
        """[B, V] device logits, [B] uniforms (ignored when greedy or forced), [B] CHOOSE / FINISHED / an id to
        take -> [B] int64 ids on the host (-1: that row's logits are not finite; FINISHED for finished rows)."""
        p, ops = self.params, self.ops
        temperature = 1.0 if p.greedy else p.temperature  # greedy: the arg-max of the penalised logits
        x, bad = ops.penalize(
            logits,
            self.seen,
            self.counts,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
            temperature,
        )
        ids = ops.filter_sample(
            x, int(p.top_k), p.top_p, p.min_p, p.greedy, np.asarray(u, np.float64), np.asarray(forced, np.int64),
            bad, self.seen, self.counts,
        )  # fmt: skip
        return ops.to_numpy(ids)  # the one transfer per step: B ids (8 bytes each)


def generate_on_device(
    model, prompt, max_new_tokens: int, temperature: float = 0.0, seed: int = 0, eos_token_ids=(), **knobs
) -> list[int]:
    """Generate one sequence with every sampling step on the device: per step only the new id (8 bytes) crosses.

    `knobs` are SamplingParams' (top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    all off by default). The uniform numbers come from `np.random.default_rng(seed)`, drawn as tinyqwen.sampling
    draws them, so the ids equal `tinyqwen.generate(model, prompt, ..., seed=seed)` with the same knobs.
    """
    ops = getattr(model.backend, "ops", None)
    if ops is None:
        raise GenerationError(
            f"generate_on_device needs a device backend, the model has {model.backend.name!r}"
        )
    prompt = [int(t) for t in prompt]
    if not prompt or max_new_tokens < 1:
        raise GenerationError("generate_on_device needs a non-empty prompt and max_new_tokens >= 1")
    params = SamplingParams(temperature=temperature, **knobs)
    sampler = DeviceSampler(ops, params, [prompt], model.config.vocab_size)
    rng = None if params.greedy else np.random.default_rng(seed)
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    ids, out = np.asarray([prompt]), []
    for _ in range(max_new_tokens):
        logits = model.forward(ids, cache=cache, last_only=True, on_device=True).logits  # [1, 1, V] on device
        u = [0.0 if rng is None else rng.random()]
        token = int(sampler.choose(logits[:, -1], u, [CHOOSE])[0])
        if token < 0:
            raise GenerationError(f"the model's logits are not finite when choosing new token {len(out) + 1}")
        out.append(token)
        if token in eos_token_ids:
            break
        ids = np.asarray([[token]])
    return out
