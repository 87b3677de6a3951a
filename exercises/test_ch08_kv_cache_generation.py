"""Chapter 8 checkpoints: the KV cache and generation.

Expected values come from the official implementation: transformers' logits processors on fixed-seed logits
(exercises/references/ch08_kv_cache_generation.npz, made by make_ch08_kv_cache_generation.py), transformers' logits
and greedy `generate` on the fixtures (tests/fixtures/*/reference.npz and generate.json, made by
tests/fixtures/make_fixtures.py). A few are derived by hand in the test (the cache contents, bytes per token,
positions), which each test says.

The generation checkpoints also watch HOW your loop calls the model (a thin wrapper records every call): the tokens of
a loop that never reads its cache are still right, so the grader counts the positions you feed instead.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from exercises import grading
from exercises.grading import (
    FIXTURES,
    LOGITS_ATOL,
    GradeError,
    Mistake,
    expect,
    expect_close,
    expect_equal,
    learner_model,
    notebook,
    reference,
    reference_file,
)
from tinyqwen.config import CONFIG_DIR
from tinyqwen.kv_cache import KVCache

REMOVED = -1e9  # a filtered logit is -inf; anything at or below this also counts as removed


# reread("...") -> 'notebooks/08-kv-cache-generation.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 8)

# every call of your code: a crash becomes a failure message; an overflowing cache gets its usual cause
call = functools.partial(grading.call, hints={"cache is full": (
    "the cache overflowed: once the prompt is in the cache, feed only the NEW token each step (not the whole text "
    "again)"
)})  # fmt: skip
REF = reference_file("ch08_kv_cache_generation.npz")


@functools.cache
def generations(fixture: str) -> dict:
    return json.loads((FIXTURES / fixture / "generate.json").read_text())


# ------------------------------------------------------------------------------------------ the learner's cache


def learner_cache_class(update):
    """tinyqwen's KVCache whose per-layer update is the learner's kv_cache_update."""

    class LearnerCache(KVCache):
        def update(self, layer, k, v):
            keys, values = update(self.keys[layer], self.values[layer], k, v, self.length)
            want = (*k.shape[:2], self.length + k.shape[2], k.shape[3])
            for name, got in (("keys", keys), ("values", values)):
                shape = tuple(np.shape(got))
                if shape == want:
                    continue
                problem = (f"kv_cache_update returned {name} of shape {list(shape)}; attention needs every position "
                           f"so far, {list(want)} (length {self.length} + {k.shape[2]} new)")  # fmt: skip
                if self.length > 0 and shape[2:3] == (k.shape[2],):
                    problem += (". Likely cause: only the new keys and values are returned, so the cache is "
                                "written but never read")  # fmt: skip
                elif shape[2:3] == (self.max_len,):
                    problem += (
                        ". Likely cause: the whole preallocated buffer is returned, empty slots included"
                    )
                raise GradeError(
                    f"your kv_cache_update inside the model\n  {problem}\n  re-read: {reread('The KV cache')}"
                )
            return np.asarray(keys), np.asarray(values)

    return LearnerCache


def allocate(cache_class, config, batch_size: int, max_len: int) -> KVCache:
    c = config
    return cache_class.allocate(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim)


@dataclass
class Call:
    columns: int  # T: positions fed per row
    batch: int
    past: int | None  # cache length before the call; None = no cache
    mask: np.ndarray | None
    positions: np.ndarray | None


class Watched:
    """A model whose cache runs the learner's kv_cache_update and which records every call made to it."""

    def __init__(self, model, update):
        self.model, self.config, self.generation_config = model, model.config, {}
        self.cache_class = learner_cache_class(update)
        self.calls: list[Call] = []

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if hasattr(self.model, "your_code"):  # a learner_model: its cache already runs the learner's update
            return self.model.new_cache(batch_size, max_len)
        return allocate(self.cache_class, self.config, batch_size, max_len)

    def forward(self, ids, *, cache=None, attention_mask=None, positions=None, last_only=False, **extra):
        ids = np.asarray(ids)
        self.calls.append(
            Call(
                columns=ids.shape[-1],
                batch=ids.shape[0] if ids.ndim == 2 else 1,
                past=None if cache is None else cache.length,
                mask=None if attention_mask is None else np.array(attention_mask),
                positions=None if positions is None else np.array(positions),
            )
        )
        return self.model.forward(ids, cache=cache, attention_mask=attention_mask, positions=positions,
                                  last_only=last_only, **extra)  # fmt: skip

    def __call__(self, ids, **extra):
        ids = np.asarray(ids)
        self.calls.append(Call(ids.shape[-1], ids.shape[0] if ids.ndim == 2 else 1, None, None, None))
        return self.model(ids, **extra)


def check_loop(watched: Watched, prompts, max_new_tokens: int, what: str, inputs: str) -> None:
    """How the loop used the model: cache passed, work done, padding side, mask, positions."""
    section = reread("Measuring that the cache helps")
    calls = watched.calls
    expect(bool(calls), what=what, inputs=inputs, reread=reread("Greedy decoding"),
           problem="greedy_generate never called model.forward")  # fmt: skip
    expect(all(c.past is not None for c in calls), what=what, inputs=inputs, reread=section,
           problem="likely cause: the KV cache is not used — a call went to the model without cache=. "
                   "Make one cache with model.new_cache(batch, prompt + new tokens) and pass it to every call.")  # fmt: skip
    P = max(len(p) for p in prompts)
    fed = sum(c.columns for c in calls)
    expect(fed <= P + max_new_tokens, what=what, inputs=inputs, reread=section,
           problem=f"likely cause: the KV cache is not used — your loop fed {fed} positions per row to make "
                   f"{max_new_tokens} tokens after a {P}-token prompt; with a cache that is the prompt once and then "
                   f"one token per step, at most {P} + {max_new_tokens}. Feed only the new token each step.")  # fmt: skip
    lengths = {len(p) for p in prompts}
    first = calls[0]
    if first.mask is not None:
        m = first.mask.astype(bool)
        right = (m[:, :-1] & ~m[:, 1:]).any()  # a pad after a real token
        expect(not right, what=what, inputs=inputs, reread=reread("Batching with left padding"),
               problem="likely cause: right padding — the mask has padding AFTER real tokens. Pad on the left, so "
                       "every row's last real token is in the last column (see left_pad).")  # fmt: skip
    if len(lengths) > 1:
        expect(all(c.mask is not None for c in calls), what=what, inputs=inputs,
               reread=reread("Batching with left padding"),
               problem="a batch with padding was run without attention_mask, so real tokens attend to the pads: "
                       "pass the mask of every column so far ([B, past + T]) to every call.")  # fmt: skip
    for n, c in enumerate(calls):
        if c.positions is None:
            continue  # the model then derives them from the mask and the cache length, correctly
        T = c.columns
        if c.mask is not None:
            mask = c.mask.astype(np.int64)
            want = (np.cumsum(mask, axis=1) - 1)[:, -T:]
            real = mask[:, -T:] == 1
        else:
            want = np.broadcast_to(np.arange(c.past, c.past + T), (c.batch, T))
            real = np.ones((c.batch, T), dtype=bool)
        got = np.broadcast_to(c.positions, want.shape) if c.positions.size in (T, want.size) else c.positions
        if got.shape != want.shape or not np.array_equal(got[real], want[real]):
            step = "the prefill" if n == 0 else f"decode call {n} (cache length {c.past})"
            problem = (f"{step} was given positions {got.tolist()}, but its real tokens sit at {want.tolist()} "
                       "(padding entries do not matter)")  # fmt: skip
            if n > 0 and got.shape == want.shape and not got[real].any():
                problem += (". Likely cause: positions restart at 0 in every decode step — a new token's position "
                            "is the number of real tokens before it (the cache length for an unpadded row), not 0")  # fmt: skip
            elif c.mask is not None and got.shape == want.shape:
                problem += (". Likely cause: positions that count padding columns — use positions_from_mask on the "
                            "mask of every column so far (cumsum(mask) - 1)")  # fmt: skip
            expect(False, what=what, inputs=inputs, reread=reread("Positions in decode"), problem=problem)


# ------------------------------------------------------------------------------------------ the cache


def test_kv_cache_update(course):
    """The cache keeps what it was given"""
    ch = course.ch08
    rng = np.random.default_rng(80)
    # derived by hand: after writing k1 (4 positions) then k2 (1 position), the keys so far are k1 followed by k2
    cache_k, cache_v = np.zeros((1, 2, 6, 3), np.float32), np.zeros((1, 2, 6, 3), np.float32)
    k1, v1 = rng.standard_normal((2, 1, 2, 4, 3)).astype(np.float32)
    k2, v2 = rng.standard_normal((2, 1, 2, 1, 3)).astype(np.float32)
    section = reread("The KV cache")
    inputs = "cache [1, 2, 6, 3] (max_len 6), first 4 positions at length 0"

    keys, values = call(
        ch.kv_cache_update, cache_k, cache_v, k1, v1, 0, what="kv_cache_update", reread=section
    )
    whole = np.concatenate([k1, np.zeros((1, 2, 2, 3), np.float32)], axis=2)
    expect_close(keys, k1, what="kv_cache_update: keys returned after the prefill", atol=0, inputs=inputs,
                 reread=section, mistakes=[Mistake(
                     "you returned the whole preallocated buffer, empty slots included", whole,
                     "Return only the filled part: cache_k[:, :, :length + T].")])  # fmt: skip
    expect_close(values, v1, what="kv_cache_update: values returned after the prefill", atol=0, inputs=inputs,
                 reread=section)  # fmt: skip

    inputs = "then 1 new position at length 4"
    keys, values = call(
        ch.kv_cache_update, cache_k, cache_v, k2, v2, 4, what="kv_cache_update", reread=section
    )
    want_k, want_v = np.concatenate([k1, k2], axis=2), np.concatenate([v1, v2], axis=2)
    lost = np.concatenate([np.zeros_like(k1), k2], axis=2)
    mistakes = [
        Mistake("only the new keys are returned, so the new token would attend to itself alone", k2,
                "Return every position so far: old ones from the cache, then the new ones."),
        Mistake("the cache array was not written in place, so the first call's keys are lost", lost,
                "Assign into the given array (cache_k[:, :, length:length + T] = k) instead of building a new one."),
    ]  # fmt: skip
    expect_close(keys, want_k, what="kv_cache_update: keys after a decode step", atol=0, inputs=inputs,
                 reread=section, mistakes=mistakes)  # fmt: skip
    expect_close(values, want_v, what="kv_cache_update: values after a decode step", atol=0, inputs=inputs,
                 reread=section)  # fmt: skip
    expect_close(cache_k[:, :, :5], want_k, what="kv_cache_update: the cache array itself after both calls",
                 atol=0, inputs=inputs, reread=section,
                 mistakes=[Mistake("the cache array was not written in place", np.zeros_like(want_k),
                                   "Write the new keys into cache_k (in place); do not only return them.")])  # fmt: skip


def stepwise_logits(model, ids: np.ndarray, cache: KVCache) -> np.ndarray:
    """Feed `ids` one token at a time through the cache; the logits of each step.  [T] -> [T, vocab]"""
    rows = []
    for t, token in enumerate(ids):
        out = model.forward(np.array([[token]]), cache=cache, positions=np.array([[t]]))
        rows.append(out.logits[0, -1])
    return np.stack(rows)


def test_cached_decoding_equals_full_forward(course):
    """Token by token through your cache equals transformers' full forward"""
    model = learner_model(
        course, upto=8, fixture="dense-tied"
    )  # your code of chapters 2-8, your cache included
    ref = reference("dense-tied")
    ids = ref["single_input_ids"]
    cache = model.new_cache(1, len(ids))
    got = call(stepwise_logits, model, ids, cache, what="decoding token by token with your cache",
              reread=reread("Checking the cache against transformers"))  # fmt: skip
    # (a cache that returns only the new keys is caught inside the model, by the shape it returns)
    expect_close(got, ref["single_logits"], atol=LOGITS_ATOL,
                 what="logits of the dense-tied fixture, fed one token at a time through your KV cache",
                 inputs=f"fixture dense-tied, {len(ids)} tokens, positions 0..{len(ids) - 1}",
                 reread=reread("Checking the cache against transformers"))  # fmt: skip


def test_kv_cache_bytes(course):
    """KV-cache memory per official config"""
    ch = course.ch08
    configs = {n: json.loads((CONFIG_DIR / f"{n}.json").read_text())
               for n in ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-30B-A3B")}  # fmt: skip
    cases = [("Qwen3-0.6B", 1, 2), ("Qwen3-0.6B", 40960, 2), ("Qwen3-4B", 4096, 4), ("Qwen3-8B", 1000, 2),
             ("Qwen3-30B-A3B", 32768, 2)]  # fmt: skip
    # derived by hand: 2 (K and V) x layers x kv heads x head_dim x tokens x bytes
    #   0.6B: 2·28·8·128 = 57,344 numbers per token;  4B and 8B: 2·36·8·128 = 73,728;  30B-A3B: 2·48·4·128 = 49,152
    want = [57344 * 2, 57344 * 40960 * 2, 73728 * 4096 * 4, 73728 * 1000 * 2, 49152 * 32768 * 2]
    got = [call(ch.kv_cache_bytes, dict(configs[n]), t, b, what="kv_cache_bytes", reread=reread("How much memory the cache takes"))
           for n, t, b in cases]  # fmt: skip
    got = [int(g) if isinstance(g, (int, float, np.integer, np.floating)) else g for g in got]

    def variant(heads_key=None, factor=2, width=None):
        out = []
        for n, t, b in cases:
            c = configs[n]
            per_head = c["head_dim"] if width is None else width(c)
            heads = c["num_key_value_heads"] if heads_key is None else c[heads_key]
            out.append(factor * c["num_hidden_layers"] * heads * per_head * t * b)
        return out

    expect_equal(got, want, what="kv_cache_bytes for (model, tokens, bytes per value) = " + str(cases),
                 reread=reread("How much memory the cache takes"), mistakes=[
                     Mistake("the query heads were counted (num_attention_heads): the cache stores only the "
                             "key/value heads", variant("num_attention_heads"),
                             "Grouped-query attention shares each kv head among several query heads."),
                     Mistake("the factor 2 is missing: the cache holds keys AND values", variant(factor=1)),
                     Mistake("hidden_size was used as the per-layer width", variant(width=lambda c: c["hidden_size"] // c["num_key_value_heads"]),
                             "A layer caches kv_heads x head_dim numbers per token; in Qwen3 head_dim is not "
                             "hidden_size / heads."),
                 ])  # fmt: skip


# ------------------------------------------------------------------------------------------ sampling


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def kept(z) -> list[int]:
    z = np.asarray(z, dtype=np.float64)
    return np.flatnonzero(z > REMOVED).tolist()


def test_temperature(course):
    """Temperature, against transformers"""
    ch, ref = course.ch08, REF
    logits = ref["logits"].astype(np.float64)
    got = [[call(ch.apply_temperature, row.copy(), float(t), what="apply_temperature", reread=reread("Temperature"))
            for row in logits] for t in ref["temperature_values"]]  # fmt: skip
    wrong = np.stack([logits * t for t in ref["temperature_values"]])
    expect_close(got, ref["temperature_out"], atol=1e-5, rtol=1e-6,
                 what="apply_temperature vs transformers' TemperatureLogitsWarper",
                 inputs=f"4 fixed-seed logits rows [64], T in {ref['temperature_values'].tolist()}",
                 reread=reread("Temperature"),
                 mistakes=[Mistake("the logits were multiplied by T instead of divided", wrong,
                                   "p_i ∝ exp(z_i / T): a small T must sharpen the distribution.")])  # fmt: skip


def check_filter(course, name: str, fn_name: str, variants: dict[str, tuple], section: str) -> None:
    """Same survivors as transformers for every setting and row, and the survivors keep their logits."""
    ch, ref = course.ch08, REF
    fn = getattr(ch, fn_name)
    logits = ref["logits"].astype(np.float64)
    for value, want in zip(ref[f"{name}_values"], ref[f"{name}_out"], strict=True):
        value = int(value) if name == "top_k" else float(value)
        got = [call(fn, row.copy(), value, what=fn_name, reread=section) for row in logits]
        for i, g in enumerate(got):
            expect(g is not None, what=f"{fn_name}({value})", reread=section,
                   problem="your function returned None — is a `return` missing?")  # fmt: skip
            expect(np.shape(g) == logits[i].shape, what=f"{fn_name}({value})", reread=section,
                   problem=f"expected logits of shape {list(logits[i].shape)}, got {list(np.shape(g))}")  # fmt: skip
        mistakes = [Mistake(cause, [kept(wrong(z, value)) for z in logits], hint)
                    for cause, (wrong, hint) in variants.items()]  # fmt: skip
        expect_equal([kept(g) for g in got], [kept(w) for w in want], mistakes=mistakes, reread=section,
                     what=f"{fn_name}({value}): which token ids survive (per row), vs transformers",
                     inputs="4 fixed-seed logits rows [64] (exercises/references/ch08_kv_cache_generation.npz)")  # fmt: skip
        alive = np.isfinite(want)
        expect_close(np.stack(got)[alive], want[alive], atol=1e-5, reread=section,
                     what=f"{fn_name}({value}): the survivors' logits must be unchanged")  # fmt: skip


def _mask_of(z, keep) -> np.ndarray:
    return np.where(keep, z, -np.inf)


def _ranked(z, count) -> np.ndarray:
    keep = np.zeros(len(z), bool)
    keep[np.argsort(-z, kind="stable")[: max(count, 0)]] = True
    return _mask_of(z, keep)


def _top_p_variant(z, p, rule):
    probs = softmax(z)
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    keep = np.zeros(len(z), bool)
    keep[order] = rule(np.cumsum(sorted_probs), sorted_probs, p)
    return _mask_of(z, keep)


def test_top_k(course):
    """Top-k, against transformers"""
    check_filter(course, "top_k", "top_k_filter", {
        "one token too many (k + 1 kept)": (lambda z, k: _ranked(z, k + 1), "Keep exactly the k largest."),
        "one token too few (k - 1 kept)": (lambda z, k: _ranked(z, k - 1), "Keep exactly the k largest."),
        "the k SMALLEST logits were kept": (lambda z, k: _mask_of(z, np.isin(np.arange(len(z)), np.argsort(z)[:k])),
                                            "Sort descending (or use np.sort(z)[-k] as the threshold)."),
    }, reread("Top-k, top-p and min-p"))  # fmt: skip


def test_top_p(course):
    """Top-p (nucleus), against transformers"""
    crossing = (lambda z, p: _top_p_variant(z, p, lambda cum, sp, p: cum < p),
                "Keep the token that carries the sum across p: a token stays when the mass BEFORE it "
                "(cumsum - p_i) is below p. That also always keeps the most likely token.")  # fmt: skip
    extra = (lambda z, p: _top_p_variant(z, p, lambda cum, sp, p: np.r_[True, (cum - sp < p)[:-1]]),
             "A token stays when the mass before it is below p — no extra token after that.")  # fmt: skip
    check_filter(course, "top_p", "top_p_filter", {
        "the token that crosses p was dropped (kept while the sum INCLUDING the token is below p)": crossing,
        "one token too many after the one that crosses p": extra,
    }, reread("Top-k, top-p and min-p"))  # fmt: skip


def test_min_p(course):
    """Min-p, against transformers"""
    check_filter(course, "min_p", "min_p_filter", {
        "the threshold was not scaled by the top probability (p_i >= min_p)": (
            lambda z, m: _mask_of(z, softmax(z) >= m), "Compare with min_p * max(p), not min_p alone."),
        "the threshold was applied to logits instead of probabilities": (
            lambda z, m: _mask_of(z, z >= m * z.max()), "Take the softmax first: p_i >= min_p * p_max."),
    }, reread("Top-k, top-p and min-p"))  # fmt: skip


def test_repetition_penalty(course):
    """Repetition penalty, against transformers"""
    ch, ref = course.ch08, REF
    logits, seen = ref["logits"].astype(np.float64), ref["seen_ids"]
    values = ref["repetition_values"]
    got = [[call(ch.repetition_penalty, z.copy(), s.tolist(), float(r), what="repetition_penalty",
                reread=reread("Repetition penalty")) for z, s in zip(logits, seen, strict=True)] for r in values]  # fmt: skip

    def variant(rule):
        out = np.stack([logits] * len(values))
        for i, r in enumerate(values):
            for row, s in enumerate(seen):
                ids, counts = np.unique(s, return_counts=True)
                out[i, row, ids] = rule(logits[row, ids], r, counts)
        return out

    expect_close(got, ref["repetition_out"], atol=1e-5, reread=reread("Repetition penalty"),
                 what="repetition_penalty vs transformers' RepetitionPenaltyLogitsProcessor",
                 inputs=f"4 fixed-seed logits rows [64] with 12 seen ids each (one repeated), penalty in {values.tolist()}",
                 mistakes=[
                     Mistake("negative logits were divided too, which RAISES them (-2 / 1.3 = -1.54)",
                             variant(lambda z, r, n: z / r), "Divide positive logits, multiply negative ones."),
                     Mistake("a token was penalised once per occurrence instead of once",
                             variant(lambda z, r, n: np.where(z > 0, z / r**n, z * r**n)),
                             "Use the distinct seen ids (np.unique)."),
                 ])  # fmt: skip


def _pipeline(z, seen, t, k, p, m, r, temperature_first=True, penalty=True, probabilities=True):
    """A hand-written pipeline for the known-wrong variants only (the expected values are transformers')."""
    z = np.asarray(z, dtype=np.float64).copy()
    if penalty:
        ids = np.unique(seen)
        z[ids] = np.where(z[ids] > 0, z[ids] / r, z[ids] * r)
    if temperature_first:
        z = z / t
    z = _ranked(z, k) if k else z
    z = _top_p_variant(z, p, lambda cum, sp, p: cum - sp < p)
    probs = softmax(z)
    z = _mask_of(z, probs >= m * probs.max())
    if not temperature_first:
        z = z / t
    return softmax(z) if probabilities else z


def test_sampling_distribution(course):
    """The whole sampling pipeline, in transformers' order"""
    ch, ref = course.ch08, REF
    settings = dict(item.split("=") for item in ref["pipeline_settings"].tolist())
    t, k, p = float(settings["temperature"]), int(settings["top_k"]), float(settings["top_p"])
    m, r = float(settings["min_p"]), float(settings["repetition_penalty"])
    logits, seen = ref["logits"].astype(np.float64), ref["seen_ids"]
    got = [call(ch.sampling_distribution, z.copy(), s.tolist(), t, k, p, m, r, what="sampling_distribution",
               reread=reread("The sampling pipeline")) for z, s in zip(logits, seen, strict=True)]  # fmt: skip

    def variant(**how):
        return np.stack([_pipeline(z, s, t, k, p, m, r, **how) for z, s in zip(logits, seen, strict=True)])

    def ignored_temperature():
        return np.stack([_pipeline(z, s, 1.0, k, p, m, r) for z, s in zip(logits, seen, strict=True)])

    expect_close(got, ref["pipeline_probs"], atol=1e-6, reread=reread("The sampling pipeline"),
                 what="sampling_distribution vs transformers' own pipeline (generate's logits processors)",
                 inputs=f"4 fixed-seed logits rows [64], {', '.join(ref['pipeline_settings'].tolist())}",
                 mistakes=[
                     Mistake("the temperature had no effect — applied after the softmax, renormalising undoes it",
                             ignored_temperature, "Divide the LOGITS by T, before the filters and the softmax."),
                     Mistake("the filters ran before the temperature", variant(temperature_first=False),
                             "Order: penalty -> temperature -> top-k -> top-p -> min-p -> softmax."),
                     Mistake("the repetition penalty is missing", variant(penalty=False)),
                     Mistake("the filtered LOGITS were returned, not probabilities (the final softmax is missing)",
                             variant(probabilities=False), "End with softmax over the filtered logits: a sampler "
                             "draws from probabilities that sum to 1."),
                 ])  # fmt: skip


# ------------------------------------------------------------------------------------------ batching


def test_left_pad(course):
    """Left padding, as transformers' batch was padded"""
    ch = course.ch08
    for fixture in ("dense-tied", "dense-yarn", "moe-norm-topk"):
        gen = generations(fixture)
        got = call(
            ch.left_pad,
            gen["prompts"],
            gen["pad_token_id"],
            what="left_pad",
            reread=reread("Batching with left padding"),
        )
        expect(isinstance(got, tuple) and len(got) == 2, what="left_pad", reread=reread("Batching with left padding"),
               problem=f"left_pad must return (ids, mask), got {type(got).__name__}")  # fmt: skip
        ids, mask = got
        width = max(len(p) for p in gen["prompts"])
        right_ids = [p + [gen["pad_token_id"]] * (width - len(p)) for p in gen["prompts"]]
        right_mask = [[1] * len(p) + [0] * (width - len(p)) for p in gen["prompts"]]
        inputs = f"fixture {fixture}: prompts of lengths {[len(p) for p in gen['prompts']]}, pad id {gen['pad_token_id']}"
        hint = "Put the pads BEFORE the prompt, so every row's last real token is in the last column."
        expect_equal(np.asarray(ids).tolist(), gen["batch"]["input_ids"], what="left_pad: the padded ids",
                     inputs=inputs, reread=reread("Batching with left padding"),
                     mistakes=[Mistake("right padding", right_ids, hint)])  # fmt: skip
        expect_equal(np.asarray(mask).tolist(), gen["batch"]["attention_mask"], what="left_pad: the attention mask",
                     inputs=inputs, reread=reread("Batching with left padding"),
                     mistakes=[Mistake("right padding", right_mask, hint)])  # fmt: skip


def test_positions_from_mask(course):
    """Positions count real tokens only"""
    ch = course.ch08
    gen = generations("dense-tied")
    # derived by hand: a row with z pads on the left has positions 0 (pads, any value) ... then 0, 1, 2, ...
    prompt_mask = np.array(gen["batch"]["attention_mask"])
    masks = [np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
             np.concatenate([prompt_mask, np.ones((3, 4), dtype=np.int64)], axis=1)]  # fmt: skip
    for mask in masks:
        pads = (mask == 0).sum(axis=1)
        want = np.stack([np.r_[np.zeros(z, np.int64), np.arange(mask.shape[1] - z)] for z in pads])
        got = call(
            ch.positions_from_mask,
            mask.copy(),
            what="positions_from_mask",
            reread=reread("Batching with left padding"),
        )
        got = np.asarray(got)
        if got.shape == want.shape:
            got = np.where(mask == 1, got, want)  # padding entries may hold anything
        columns = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)
        expect_equal(got.tolist(), want.tolist(), what="positions_from_mask on a left-padded mask",
                     inputs=f"mask {mask.tolist()}", reread=reread("Batching with left padding"), mistakes=[
                         Mistake("the padding columns were counted (positions = column index)",
                                 np.where(mask == 1, columns, want).tolist(),
                                 "Count real tokens only: cumsum(mask, axis=1) - 1."),
                         Mistake("the count is off by one (positions start at 1)",
                                 np.where(mask == 1, np.cumsum(mask, axis=1), want).tolist(),
                                 "The first real token is position 0: cumsum(mask) - 1."),
                     ])  # fmt: skip


# ------------------------------------------------------------------------------------------ generation


def generate_watched(course, model, prompts, max_new_tokens, eos_id, what, section):
    watched = Watched(model, course.ch08.kv_cache_update)
    loop = (
        grading.your(model, "greedy_generate") if hasattr(model, "your_code") else course.ch08.greedy_generate
    )
    got = call(loop, watched, [list(p) for p in prompts], max_new_tokens,
               kwargs={"pad_id": 0, "eos_id": eos_id}, what=what, reread=section)  # fmt: skip
    return watched, got


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """transformers' tokens cut after the first eos (derived by hand: rows are independent)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def test_greedy_generate_one_prompt(course):
    """Greedy generation with a cache, one prompt at a time"""
    model = learner_model(course, upto=8, fixture="dense-tied")
    gen = generations("dense-tied")
    for prompt, want in zip(gen["prompts"], gen["single"], strict=True):
        what = "greedy_generate on one prompt vs transformers' generate"
        inputs = f"fixture dense-tied, prompt {prompt}, {gen['max_new_tokens']} new tokens"
        watched, got = generate_watched(
            course, model, [prompt], gen["max_new_tokens"], None, what, reread("Greedy decoding")
        )
        check_loop(watched, [prompt], gen["max_new_tokens"], what, inputs)
        expect_equal(got, [want], what=what, inputs=inputs, reread=reread("Greedy decoding"))
    # stopping: the 4th token of the first prompt's output as eos -> that row ends there, eos kept
    prompt, full = gen["prompts"][0], gen["single"][0]
    eos = full[3]
    watched, got = generate_watched(course, model, [prompt], gen["max_new_tokens"], eos, "greedy_generate with eos_id",
                                    reread("Greedy decoding"))  # fmt: skip
    expect_equal(got, [until_eos(full, eos)], what=f"greedy_generate with eos_id={eos}: stop after producing it",
                 inputs=f"fixture dense-tied, prompt {prompt}", reread=reread("Greedy decoding"))  # fmt: skip


def test_greedy_generate_batch(course):
    """A left-padded batch gives each row its own tokens"""
    model = learner_model(course, upto=8, fixture="dense-tied")
    gen = generations("dense-tied")
    want = gen["batch"]["new_tokens"]
    eos = want[0][3]
    for eos_id in (None, eos):
        what = "greedy_generate on a left-padded batch vs transformers' generate" + (
            f" (eos_id={eos_id}: a row stops after producing it)" if eos_id is not None else ""
        )
        inputs = (
            f"fixture dense-tied, {len(gen['prompts'])} prompts of lengths {[len(p) for p in gen['prompts']]}"
        )
        watched, got = generate_watched(course, model, gen["prompts"], gen["max_new_tokens"], eos_id, what,
                                        reread("Batching with left padding"))  # fmt: skip
        check_loop(watched, gen["prompts"], gen["max_new_tokens"], what, inputs)
        expect_equal(got, [until_eos(row, eos_id) for row in want], what=what, inputs=inputs,
                     reread=reread("Batching with left padding"))  # fmt: skip


def test_generation_in_the_real_model(course):
    """Your generation loop in the real model"""
    for fixture in ("dense-tied", "dense-yarn", "moe-norm-topk"):
        model = learner_model(course, upto=8, fixture=fixture)
        gen = generations(fixture)
        n = gen["max_new_tokens"]
        cases = [([gen["prompts"][0]], [gen["single"][0]], "one prompt"),
                 (gen["prompts"], gen["batch"]["new_tokens"], "a left-padded batch")]  # fmt: skip
        for prompts, want, label in cases:
            what = f"your code of chapters 2-7 + your cache + your loop on {label}, vs transformers' generate"
            inputs = f"fixture {fixture}, prompt lengths {[len(p) for p in prompts]}, {n} new tokens"
            watched, got = generate_watched(
                course, model, prompts, n, None, what, reread("Batching with left padding")
            )
            check_loop(watched, prompts, n, what, inputs)
            expect_equal(
                got,
                want,
                what=what,
                inputs=f"{inputs}; {model.your_code.report()}",
                reread=reread("Checkpoint: greedy tokens equal transformers'"),
            )
