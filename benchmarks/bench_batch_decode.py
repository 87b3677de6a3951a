"""A batched decode step's weight products on the numba backend: streamed bf16 GEMV vs widen-a-block + BLAS.

    python benchmarks/bench_batch_decode.py                      # Qwen3-0.6B's shapes, batch 1, 4, 16, 64
    python benchmarks/bench_batch_decode.py --batches 4,16 --repeats 5

A continuous-batching server decodes B sequences per step: every weight product has B rows of input. The numba
backend streams each bf16 weight row once for up to `GEMV_MAX_ROWS` rows (each element widened in registers, used
for every row), and beyond that widens blocks of weights to float32 and calls BLAS. Which is faster depends on B:
this times one decoder layer's products (q/k/v fused, o, gate/up fused + down) and the lm_head of Qwen3-0.6B
(random bf16 weights of the real shapes), per path, per batch size, and prints the ratio. Best of `--repeats`;
timings on a shared machine swing, the ratio within one run is what to read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=28, help="decoder layers counted per step (0.6B: 28)")
    args = parser.parse_args()
    from tinyqwen.backends.numba import linear as lin
    from tinyqwen.backends.numba.weights import BF16Weight
    from tinyqwen.config import published_configs

    c = published_configs()["Qwen3-0.6B"]
    rng = np.random.default_rng(0)

    def weight(n: int, k: int) -> BF16Weight:
        return BF16Weight(
            (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        )

    H, F = c.hidden_size, c.intermediate_size
    q, k, v = weight(c.q_size, H), weight(c.kv_size, H), weight(c.kv_size, H)
    o, gate, up, down = weight(H, c.q_size), weight(F, H), weight(F, H), weight(H, F)
    head = weight(c.vocab_size, H)

    def layer(x: np.ndarray, xo: np.ndarray) -> None:  # [B, 1, hidden], [B, 1, q_size]
        lin.linears(x, (q, k, v))
        lin.linear(xo, o)
        lin.swiglu(x, gate, up, down)

    def best(fn) -> float:
        fn()  # compile / warm
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    original = lin.GEMV_MAX_ROWS
    print(
        f"Qwen3-0.6B shapes, bf16 weights: one layer's products x {args.layers} + lm_head, ms per decode step"
    )
    print(f"{'batch':>5} {'GEMV (stream)':>14} {'BLAS (widen)':>13} {'GEMV/BLAS':>10}")
    try:
        for B in (int(b) for b in args.batches.split(",")):
            x = rng.standard_normal((B, 1, H), dtype=np.float32)
            xo = rng.standard_normal((B, 1, c.q_size), dtype=np.float32)
            t = {}
            for path, limit in (("gemv", 1 << 30), ("blas", 0)):
                lin.GEMV_MAX_ROWS = limit
                t[path] = args.layers * best(lambda x=x, xo=xo: layer(x, xo)) + best(
                    lambda x=x: lin.linear(x, head)
                )
            print(f"{B:5d} {t['gemv'] * 1e3:14.1f} {t['blas'] * 1e3:13.1f} {t['gemv'] / t['blas']:10.2f}")
    finally:
        lin.GEMV_MAX_ROWS = original
    print(f"(GEMV_MAX_ROWS is {original} in backends/numba/linear.py)")


if __name__ == "__main__":
    main()
