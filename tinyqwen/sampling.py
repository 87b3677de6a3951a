"""Sampling: turning one row of logits into the next token.

The model gives a score (logit) for every token in the vocabulary. Generation picks one, appends it, and asks again.
How to pick is a small pipeline of pure functions over a logits vector, applied in this fixed order:

    logits ──► repetition penalty ──► presence/frequency penalty ──► / temperature
           ──► top-k ──► top-p ──► min-p ──► softmax ──► draw one token with a seeded RNG

The order is the one Hugging Face transformers and vLLM use: the penalties change the raw scores, temperature
reshapes the distribution, and the three filters then cut it down. Each filter keeps at least one token (the most
likely), so the pipeline never ends with nothing to sample. A filtered-out token gets the logit -inf (probability 0).

Temperature 0 means *greedy*: take the arg-max after the penalties (the filters never remove the arg-max, so they
do not matter then).

Qwen's recommended settings (the Qwen3 model cards):
- thinking mode:     temperature 0.6, top-p 0.95, top-k 20, min-p 0  (also what generation_config.json holds)
- non-thinking mode: temperature 0.7, top-p 0.8,  top-k 20, min-p 0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from tinyqwen.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of the sampling pipeline; the defaults switch everything off (greedy, no penalties).

    >>> SamplingParams(temperature=0.7, top_k=20).greedy
    False
    >>> SamplingParams().greedy
    True
    """

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt + output
    presence_penalty: float = 0.0  # 0 = off; > 0 discourages tokens already in the output
    frequency_penalty: float = 0.0  # 0 = off; > 0 discourages tokens by how often they are in the output

    def __post_init__(self) -> None:
        validate(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_generation_config(cls, gen_config: Mapping[str, Any], base: SamplingParams | None = None):
        """Read the sampling keys of a checkpoint's generation_config.json; missing keys keep `base`'s values.

        `do_sample: false` means greedy whatever the temperature says (as in transformers).

        >>> p = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_k": 20,
        ...                                            "top_p": 0.95})
        >>> (p.temperature, p.top_k, p.top_p, p.min_p)
        (0.6, 20, 0.95, 0.0)
        """
        base = base if base is not None else cls()
        known = {f.name for f in fields(cls)}
        values = {k: gen_config[k] for k in known if gen_config.get(k) is not None}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GenerationError(f"generation_config.json: {key!r} must be a number, got {value!r}")
        params = replace(base, **values)
        if gen_config.get("do_sample") is False:
            params = replace(params, temperature=0.0)
        return params

    def override(self, **changes: Any) -> SamplingParams:
        """A copy with the given fields changed; `None` values are ignored (handy for optional CLI flags)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def validate(p: SamplingParams) -> None:
    """Reject values that have no meaning, with a message that names the knob and its allowed range."""

    def number(name: str) -> float:
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise GenerationError(f"{name} must be a number, got {value!r}")
        if not np.isfinite(value):
            raise GenerationError(f"{name} must be finite, got {value!r}")
        return float(value)

    if number("temperature") < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {p.temperature}")
    if not (0.0 < number("top_p") <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1], got {p.top_p}")
    if not (0.0 <= number("min_p") <= 1.0):
        raise GenerationError(f"min_p must be in [0, 1], got {p.min_p}")
    if number("top_k") < 0 or int(p.top_k) != p.top_k:
        raise GenerationError(f"top_k must be a whole number >= 0 (0 = off), got {p.top_k}")
    if number("repetition_penalty") <= 0:
        raise GenerationError(f"repetition_penalty must be > 0 (1 = off), got {p.repetition_penalty}")
    number("presence_penalty")
    number("frequency_penalty")


# Qwen's recommended presets (Qwen3 model cards, "Best Practices")
THINKING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


# ---------------------------------------------------------------- penalties (change scores of seen tokens)


def apply_repetition_penalty(logits: np.ndarray, seen_ids: Iterable[int], penalty: float) -> np.ndarray:
    """Make tokens already seen (prompt + output) less likely: divide a positive logit, multiply a negative one.

    This is the CTRL paper's rule as transformers implements it: each seen token is penalised once, however
    often it appeared. Dividing a negative logit would *raise* it, hence the two cases.

    >>> apply_repetition_penalty(np.array([2.0, -2.0, 1.0]), [0, 1], 2.0)
    array([ 1., -4.,  1.])
    """  # [V], ids -> [V]
    if penalty == 1.0:
        return logits
    ids = np.unique(np.fromiter(seen_ids, dtype=np.int64))
    if ids.size == 0:
        return logits
    out = logits.copy()
    chosen = out[ids]
    out[ids] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out


def apply_presence_penalty(
    logits: np.ndarray, output_ids: Iterable[int], presence: float, frequency: float = 0.0
) -> np.ndarray:
    """OpenAI/vLLM penalties over the *generated* tokens only: subtract `presence` once per distinct token,
    and `frequency` once per occurrence.

    >>> apply_presence_penalty(np.zeros(3), [2, 2], presence=1.5, frequency=0.5)
    array([ 0. ,  0. , -2.5])
    """  # [V], ids -> [V]
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = np.bincount(np.fromiter(output_ids, dtype=np.int64), minlength=logits.shape[-1])[
        : logits.shape[-1]
    ]
    return logits - presence * (counts > 0) - frequency * counts


# ---------------------------------------------------------------- filters (cut the distribution down)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest logits (ties with the k-th are kept, as in transformers); k = 0 keeps all.

    >>> top_k_filter(np.array([1.0, 3.0, 2.0, 0.0]), 2)
    array([-inf,   3.,   2., -inf])
    """  # [V] -> [V]
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]  # the k-th largest value, found in O(V)
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus sampling: keep the smallest set of most likely tokens whose total probability is >= p.

    Sort by probability, descending; a token is kept when the mass *before* it is still < p. So the most likely
    token is always kept, and the token that carries the mass over p is kept too.

    >>> probs = np.array([0.5, 0.3, 0.15, 0.05])
    >>> top_p_filter(np.log(probs), 0.8)   # 0.5 + 0.3 = 0.8 reaches p: two tokens
    array([-0.69314718, -1.2039728 ,        -inf,        -inf])
    >>> top_p_filter(np.log(probs), 0.81)  # needs the third
    array([-0.69314718, -1.2039728 , -1.89711998,        -inf])
    """  # [V] -> [V]
    if p >= 1.0:
        return logits
    # sort only the candidates still alive (after top-k that is 20, not 151,936: a 100x cheaper sort)
    alive = np.flatnonzero(logits > -np.inf)
    probs = softmax(logits[alive])
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    # a little slack so that 0.5 + 0.3 "reaches" 0.8 despite rounding in the sum
    keep_sorted = mass_before < p - 1e-9
    keep_sorted[0] = True
    out = np.full(logits.shape, -np.inf)
    kept = alive[order[keep_sorted]]
    out[kept] = logits[kept]
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least `min_p` times the top token's probability.

    >>> min_p_filter(np.log(np.array([0.6, 0.3, 0.1])), 0.2)  # threshold 0.12
    array([-0.51082562, -1.2039728 ,        -inf])
    """  # [V] -> [V]
    if min_p <= 0.0:
        return logits
    # compare probabilities, as transformers does: the equivalent test on logits (logit_i >= logit_max +
    # log(min_p)) rounds differently when probabilities tie, e.g. min_p = 1 with logits 1e-135 and 0 (equal
    # probabilities: both kept). Only the candidates still alive are softmaxed (after top-k: 20, not 151,936).
    alive = np.flatnonzero(logits > -np.inf)
    probs = softmax(logits[alive])
    kept = alive[probs >= min_p * probs.max() * (1 - 1e-9)]  # the same rounding slack as top_p_filter
    out = np.full(logits.shape, -np.inf, dtype=logits.dtype if logits.dtype.kind == "f" else np.float64)
    out[kept] = logits[kept]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (sampling is where rounding is seen: keep it exact enough). [V] -> [V]"""
    x = logits.astype(np.float64)
    x = np.exp(x - np.max(x))
    return x / x.sum()


# ---------------------------------------------------------------- the whole pipeline


def process_logits(
    logits: np.ndarray,
    params: SamplingParams,
    prompt_ids: Iterable[int] = (),
    output_ids: Iterable[int] = (),
) -> np.ndarray:
    """Penalties, temperature and filters, in the documented order. The result's softmax is what we sample.

    >>> p = SamplingParams(temperature=0.5, top_k=2)
    >>> process_logits(np.array([1.0, 2.0, 0.0]), p)
    array([  2.,   4., -inf])
    """  # [V] -> [V] float64
    x = np.asarray(logits, dtype=np.float64)
    output_ids = list(output_ids)
    x = apply_repetition_penalty(x, [*prompt_ids, *output_ids], params.repetition_penalty)
    x = apply_presence_penalty(x, output_ids, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return x
    x = x / params.temperature
    x = top_k_filter(x, int(params.top_k))
    x = top_p_filter(x, params.top_p)
    x = min_p_filter(x, params.min_p)
    return x


def sample(
    logits: np.ndarray,
    rng: np.random.Generator | None,
    params: SamplingParams,
    prompt_ids: Iterable[int] = (),
    output_ids: Iterable[int] = (),
) -> int:
    """Pick the next token id from one row of logits.

    Greedy (temperature 0) is the arg-max, lowest id on ties, and uses no randomness. Otherwise we draw
    u ~ U[0, 1) and take the first token whose cumulative probability exceeds u (inverse-CDF sampling): one
    random number per token, so a seeded `np.random.Generator` reproduces a run exactly.

    >>> sample(np.array([0.0, 5.0, 1.0]), None, SamplingParams())
    1
    >>> rng = np.random.default_rng(0)
    >>> sample(np.array([0.0, 5.0, 1.0]), rng, SamplingParams(temperature=1.0, top_k=1))
    1
    """  # [V] -> id
    x = process_logits(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return int(np.argmax(x))
    if rng is None:
        raise GenerationError("sampling with temperature > 0 needs a random generator (pass seed= or rng=)")
    alive = np.flatnonzero(x > -np.inf)  # the filters' survivors: exp() of 151,936 -infs is not free
    probs = softmax(x[alive])
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    index = min(int(np.searchsorted(cdf, u, side="right")), alive.size - 1)  # u < cdf[-1]; guard rounding
    return int(alive[index])
