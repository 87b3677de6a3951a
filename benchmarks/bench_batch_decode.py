"""A batched decode step's weight products on the numba backend: register tiles vs one-row loops vs widen + BLAS.

    python benchmarks/bench_batch_decode.py                      # Qwen3-0.6B's shapes, batch 1, 4, 16, 64
    python benchmarks/bench_batch_decode.py --batches 4,16 --repeats 5

A continuous-batching server decodes B sequences per step: every weight product has B rows of input. Up to
`GEMV_MAX_ROWS` rows the numba backend streams each bf16 weight from memory once, in register tiles of 4 token rows
x 3 weight rows (`BATCH_TILES`: each weight widened once for four rows, twelve FMA chains); beyond that it widens
blocks of weights to float32 and calls BLAS. This times one decoder layer's products (q/k/v fused, o, gate/up
fused + down) x layers, and the lm_head, of Qwen3-0.6B (random bf16 weights of the real shapes) per path and batch
size: "tiles" (the default), "rows" (the one-row loops run once per token row, `BATCH_TILES = False`, what a batch
took before the tiles) and "BLAS" (widen + sgemm, `GEMV_MAX_ROWS = 0`), interleaved, best of `--repeats`. Timings
on a shared machine swing: the ratios within one run are what to read; "x1" is the step's cost over batch 1's.
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

    original = lin.GEMV_MAX_ROWS, lin.BATCH_TILES
    paths = {"tiles": (1 << 30, True), "rows": (1 << 30, False), "blas": (0, True)}

    def step(path: str, x: np.ndarray, xo: np.ndarray) -> float:  # seconds for one decode step's products
        lin.GEMV_MAX_ROWS, lin.BATCH_TILES = paths[path]
        try:
            return args.layers * best(lambda: layer(x, xo)) + best(lambda: lin.linear(x, head))
        finally:
            lin.GEMV_MAX_ROWS, lin.BATCH_TILES = original

    print(
        f"Qwen3-0.6B shapes, bf16 weights: one layer's products x {args.layers} + lm_head, ms per decode step"
    )
    print(f"{'batch':>5} {'tiles':>9} {'rows':>9} {'BLAS':>9} {'rows/tiles':>11} {'BLAS/tiles':>11} "
          f"{'tiles x1':>9} {'GMAC/s':>7}")  # fmt: skip
    one = None
    macs = args.layers * (c.q_size * H + 2 * c.kv_size * H + H * c.q_size + 3 * F * H) + c.vocab_size * H
    for B in (int(b) for b in args.batches.split(",")):
        x = rng.standard_normal((B, 1, H), dtype=np.float32)
        xo = rng.standard_normal((B, 1, c.q_size), dtype=np.float32)
        t = {path: float("inf") for path in paths}
        for _ in range(2):  # interleaved: each path twice, best kept
            for path in paths:
                t[path] = min(t[path], step(path, x, xo))
        one = one or t["tiles"] / B * (B == 1) or None
        ratio = f"{t['tiles'] / one:9.1f}" if one else f"{'':9}"
        print(f"{B:5d} {t['tiles'] * 1e3:9.1f} {t['rows'] * 1e3:9.1f} {t['blas'] * 1e3:9.1f} "
              f"{t['rows'] / t['tiles']:11.2f} {t['blas'] / t['tiles']:11.2f} {ratio} "
              f"{B * macs / t['tiles'] / 1e9:7.1f}")  # fmt: skip
    print(f"(GEMV_MAX_ROWS is {original[0]} in backends/numba/linear.py; batch 1 takes the one-row loops on every "
          "path but BLAS)")  # fmt: skip


if __name__ == "__main__":
    main()
