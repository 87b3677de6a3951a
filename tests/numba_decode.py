"""The numba backend's decode paths run side by side: the set-up shared by tests/test_numba_backend.py (bf16 weights)
and tests/test_numba_quant.py (GGUF's quantized weights).

Decode has three paths of one result: the whole step in one parallel region (decode_step.py), one call per layer
(decode_layer.py) and kernel by kernel. They run the same serial kernels on the same rows, so a test decodes the same
prompt greedily through each and asks for equal logits and caches, bit for bit.

- `greedy_logits`: the prompt's last logits, then a few greedy steps, stacked.
- `numba_threads`: a block run on a given number of Numba threads (the count before is restored).
- `assert_whole_step_is_bit_identical`: the whole step against one call per layer and kernel by kernel.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np


def greedy_logits(model, prompt: np.ndarray, cache, steps: int = 4) -> np.ndarray:
    """[steps + 1, 1, 1, V]: `prompt` [1, T]'s last logits, then `steps` greedy decode steps, through `cache`."""
    out = [model.forward(prompt, cache=cache, last_only=True).logits]
    for _ in range(steps):
        nxt = out[-1][:, -1].argmax(-1)[:, None]
        out.append(model.forward(nxt, cache=cache, last_only=True).logits)
    return np.stack(out)


@contextlib.contextmanager
def numba_threads(threads: int):
    """Run the block on `threads` Numba threads (at most the pool's size)."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def assert_whole_step_is_bit_identical(
    model, prompt: np.ndarray, monkeypatch, threads: int, workers: int, kv_dtype: str = "float32"
) -> None:
    """Decode `prompt` [1, T] and 4 greedy steps three ways — the whole step ("step"), one call per layer
    ("layer"), kernel by kernel ("kernel") — on `threads` Numba threads with `workers` region iterations
    (decode_layer._workers); assert that the prompt declined the whole step, every decode step took it, and that
    the logits and every layer's k and v are equal bit for bit. The model's backend is restored after."""
    from tinyqwen.backends.numba import decode_layer

    whole = model.backend
    calls = []
    monkeypatch.setattr(decode_layer, "_workers", lambda: workers)
    step_fn = whole.decode_step
    backends = {
        "step": replace(whole, decode_step=lambda *a: calls.append(step_fn(*a)) or calls[-1]),
        "layer": replace(whole, decode_step=None),
        "kernel": replace(whole, decode_step=None, decode_layer=None),
    }
    logits, caches = {}, {}
    try:
        with numba_threads(threads):
            for name, backend in backends.items():
                model.backend = backend
                caches[name] = model.new_cache(1, 12, kv_dtype)
                logits[name] = greedy_logits(model, prompt, caches[name])
    finally:
        model.backend = whole
    assert [c is not None for c in calls] == [False] + [
        True
    ] * 4  # the prompt (T > 1) declined, every step taken
    assert np.array_equal(logits["step"], logits["layer"]) and np.array_equal(
        logits["step"], logits["kernel"]
    )
    for other in ("layer", "kernel"):
        s, o = caches["step"], caches[other]
        assert s.length == o.length == prompt.shape[1] + 4
        for a, b in zip(s.keys + s.values, o.keys + o.values, strict=True):
            assert np.array_equal(a, b)
