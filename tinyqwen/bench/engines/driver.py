"""The one timing loop every engine runs through, in the engine's own child process.

The child's argv: checkpoint path, an .npz holding the prompt ids, the .npz to write, then new_tokens, repeat,
threads and the engine's option. It imports nothing of tinyqwen's (it may run in a peer's Python).

    load                         -> load_s, peak RSS after load
    8-token prompt + 2 steps     -> first_call_s, run twice (the first call pays JIT compilation, allocator and
                                    thread-pool start-up)
    P-token prompt, then N steps -> time to the first new token (prefill) and the decode time of N tokens,
                                    each the best of `repeat`
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

import numpy as np


def peak_rss() -> int:  # bytes; Linux gives ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(engine, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    """(time to the first new token, time of `n` more tokens, the tokens)."""
    start = time.perf_counter()
    token = engine.prefill(ids)
    ttft = time.perf_counter() - start
    out = [token]
    start = time.perf_counter()
    for _ in range(n):
        token = engine.step(token)
        out.append(token)
    return ttft, time.perf_counter() - start, out


def main(load: Callable) -> None:
    """Time the engine `load(path, threads, option, max_len)` returns; save the measurements to the output .npz."""
    path, ids_file, out_file, new_tokens, repeat, threads, option = sys.argv[1:8]
    new_tokens, repeat, threads = int(new_tokens), int(repeat), int(threads)
    prompt = [int(t) for t in np.load(ids_file)["prompt"]]

    start = time.perf_counter()
    engine = load(path, threads, option, len(prompt) + new_tokens + 8)
    load_s = time.perf_counter() - start
    rss_load = peak_rss()
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        run(engine, prompt[:8], 2)
        calls.append(time.perf_counter() - start)
    ttft = decode = float("inf")
    for _ in range(repeat):
        t, d, ids = run(engine, prompt, new_tokens)
        ttft, decode = min(ttft, t), min(decode, d)
    peak = peak_rss()
    np.savez(
        out_file, load_s=load_s, first_call_s=calls[0], second_call_s=calls[1], ttft_s=ttft, decode_s=decode,
        peak_rss_load=rss_load, peak_rss=peak, weight_bytes=engine.weight_bytes, version=np.array(engine.version),
        first_ids=np.array(ids[:8]), compile_s=getattr(engine, "compile_s", float("nan")),
        hbm_peak_gb_s=getattr(engine, "hbm_peak_gb_s", float("nan")),
    )  # fmt: skip
