"""One decode step of a quantized GGUF model on the numba backend, taken apart: the time of every backend call by
kind and weight shape, each GEMV's bytes/s beside a streaming read of the same bytes (a parallel sum over them, the
ceiling a memory-bound kernel can reach), and the glue (the step minus the calls).

    python benchmarks/profile_quant_step.py MODEL.gguf [--steps 8]

A call slower than its ceiling by much more than the others is kernel-bound (or launch-bound, for small weights);
one near it is memory-bound. Timings on a shared machine swing: compare rows of one run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import numpy as np
from numba import njit, prange

import tinyqwen
from tinyqwen.backends.numba import backend


@njit(parallel=True, cache=True)
def _stream(a, chunks):  # read every 8 bytes once over the threads: the memory ceiling
    n = a.shape[0]
    size = (n + chunks - 1) // chunks
    total = np.uint64(0)
    for c in prange(chunks):
        t = np.uint64(0)
        for i in range(c * size, min(n, (c + 1) * size)):
            t += a[i]
        total += t
    return total


def _weights(args, name: str) -> list:  # the weights a backend call reads
    if name in ("linear", "embed"):
        return [args[1]]
    if name in ("linears", "linear_many"):
        return list(args[1])
    if name == "swiglu":
        return list(args[1:4])
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = tinyqwen.load_model(args.model, backend="numba")
    base = backend()
    times, calls, nbytes, streams = (collections.defaultdict(float) for _ in range(4))

    def wrap(name, fn):
        def timed(*a, **kw):
            ws = _weights(a, name) if name != "embed" else []
            key = name + " " + "+".join(f"{getattr(w, 'qtype', '?')}{list(w.shape)}" for w in ws)
            t = time.perf_counter()
            out = fn(*a, **kw)
            times[key] += time.perf_counter() - t
            calls[key] += 1
            if ws and key not in streams:  # the ceiling for these bytes, once
                flat = [np.asarray(w.data).reshape(-1) for w in ws if hasattr(w, "data")]
                data = np.concatenate(flat) if flat else np.zeros(8, np.uint8)
                data = data[: data.size // 8 * 8].view(np.uint64)
                _stream(data, 16)
                streams[key] = min(_timed(lambda: _stream(data, 16)) for _ in range(5))
                nbytes[key] = data.nbytes
            return out

        return timed

    skip = {"prepare", "to_numpy", "zeros", "options", "name"}
    fields = {
        f.name: wrap(f.name, getattr(base, f.name))
        for f in dataclasses.fields(base)
        if f.name not in skip and callable(getattr(base, f.name))
    }
    model.backend = dataclasses.replace(base, **fields)
    cache = model.new_cache(1, 64 + args.steps * 2, "bfloat16")
    model.forward(np.arange(16)[None], cache=cache, last_only=True)
    for _ in range(args.steps):  # warm
        model.forward(np.array([[5]]), cache=cache, last_only=True)
    for d in (times, calls):
        d.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model.forward(np.array([[5]]), cache=cache, last_only=True)
    step = (time.perf_counter() - t0) / args.steps
    print(f"decode step {step * 1e3:.2f} ms ({1 / step:.1f} tok/s)")
    print(f"{'ms/step':>8} {'calls':>5} {'GB/s':>6} {'ceiling':>7} {'ratio':>5}  call")
    for key, t in sorted(times.items(), key=lambda kv: -kv[1]):
        n = calls[key] / args.steps
        per = t / calls[key]
        rate = " " * 20
        if streams.get(key):
            rate = f"{nbytes[key] / per / 1e9:6.1f} {nbytes[key] / streams[key] / 1e9:7.1f} {streams[key] / per:5.2f}"
        print(f"{t / args.steps * 1e3:8.3f} {n:5.0f} {rate}  {key}")
    print(f"{(step - sum(times.values()) / args.steps) * 1e3:8.3f}       glue (the step minus the calls)")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
