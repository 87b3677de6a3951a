"""A batched decode step's weight products on the numba backend: panels vs register tiles vs one-row loops vs BLAS.

    python benchmarks/bench_batch_decode.py                      # Qwen3-0.6B's shapes, batch 1, 4, 16, 64
    python benchmarks/bench_batch_decode.py --batches 4,16 --repeats 5
    python benchmarks/bench_batch_decode.py --model QWEN3_0.6B_DIR --batches 16   # whole steps: panels, 4x3, 4x6

A continuous-batching server decodes B sequences per step: every weight product has B rows of input. Up to
`GEMV_MAX_ROWS` rows the numba backend streams each bf16 weight from memory once, in register tiles of 4 token rows
x 3 weight rows (`BATCH_TILES`: each weight widened once for four rows, twelve FMA chains), or from 12 rows on
(`BATCH_PANELS`) on panels of 16 token rows with blocks of weights widened once into L2 and a 6 x 16 micro-kernel
(batch_gemm.py); beyond that it widens blocks of weights to float32 and calls BLAS. This times one decoder layer's products (q/k/v fused, o, gate/up
fused + down) x layers, and the lm_head, of Qwen3-0.6B (random bf16 weights of the real shapes) per path and batch
size: "panels" (the default where they fit), "tiles" (`BATCH_PANELS = False`), "rows" (the one-row loops run once
per token row, `BATCH_TILES = False`, what a batch took before the tiles) and "BLAS" (widen + sgemm,
`GEMV_MAX_ROWS = 0`), interleaved, best of `--repeats`. GMAC/s is the default path's (peak of one AVX2 core:
2 FMA units x 8 lanes x the clock, ~40-48 GMAC/s here). Timings on a shared machine swing: the ratios within one
run are what to read; "x1" is the step's cost over batch 1's.

One layer's weights (30 MB of bf16 for 0.6B) repeated for every layer stay largely in L3, where a real step streams
every layer's from memory: `--model DIR` times whole decode steps of a checkpoint instead (`Qwen3.forward` on a
ragged cache of B rows at `--context` positions, every row's keys and values written first), panels against tiles
kernel by kernel and the 4 x 6 tiles' step in one region, interleaved; `--clock cpu` for CPU time; `--breakdown`
where one step's time goes, part by part:

    python benchmarks/bench_batch_decode.py --model QWEN3_0.6B_DIR --batches 16 --context 160 --breakdown
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
    parser.add_argument(
        "--model", help="a checkpoint directory: time its whole decode steps (panels vs tiles)"
    )
    parser.add_argument("--context", type=int, default=128, help="--model: positions in each row's cache")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="--model: wall or CPU time")
    parser.add_argument(
        "--breakdown", action="store_true", help="--model: where one B-row step's time goes, per part"
    )
    parser.add_argument("--medium", action="store_true",
                        help='--model: "highest" vs "medium" (vdpbf16ps region, kernel by kernel; f32 tiles)')  # fmt: skip
    args = parser.parse_args()
    if args.model and args.breakdown:
        breakdown(args)
        return
    if args.model:
        (medium_steps if args.medium else whole_steps)(args)
        return
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
    # GEMV_MAX_ROWS, BATCH_TILES, BATCH_PANELS per path
    paths = {"panels": (1 << 30, True, True), "tiles": (1 << 30, True, False), "rows": (1 << 30, False, False),
             "blas": (0, True, False)}  # fmt: skip
    panels_flag = lin.BATCH_PANELS

    def step(path: str, x: np.ndarray, xo: np.ndarray) -> float:  # seconds for one decode step's products
        lin.GEMV_MAX_ROWS, lin.BATCH_TILES, lin.BATCH_PANELS = paths[path]
        try:
            return args.layers * best(lambda: layer(x, xo)) + best(lambda: lin.linear(x, head))
        finally:
            lin.GEMV_MAX_ROWS, lin.BATCH_TILES = original
            lin.BATCH_PANELS = panels_flag

    print(
        f"Qwen3-0.6B shapes, bf16 weights: one layer's products x {args.layers} + lm_head, ms per decode step"
    )
    print(f"{'batch':>5} {'panels':>9} {'tiles':>9} {'rows':>9} {'BLAS':>9} {'tiles/panels':>13} {'rows/tiles':>11} "
          f"{'BLAS/tiles':>11} {'x1':>6} {'GMAC/s':>7}")  # fmt: skip
    one = None
    macs = args.layers * (c.q_size * H + 2 * c.kv_size * H + H * c.q_size + 3 * F * H) + c.vocab_size * H
    for B in (int(b) for b in args.batches.split(",")):
        x = rng.standard_normal((B, 1, H), dtype=np.float32)
        xo = rng.standard_normal((B, 1, c.q_size), dtype=np.float32)
        t = {path: float("inf") for path in paths}
        for _ in range(2):  # interleaved: each path twice, best kept
            for path in paths:
                t[path] = min(t[path], step(path, x, xo))
        best_path = min(t["panels"], t["tiles"]) if panels_flag else t["tiles"]  # what linear.py runs
        one = one or best_path / B * (B == 1) or None
        ratio = f"{best_path / one:6.1f}" if one else f"{'':6}"
        print(f"{B:5d} {t['panels'] * 1e3:9.1f} {t['tiles'] * 1e3:9.1f} {t['rows'] * 1e3:9.1f} {t['blas'] * 1e3:9.1f} "
              f"{t['tiles'] / t['panels']:13.2f} {t['rows'] / t['tiles']:11.2f} {t['blas'] / t['tiles']:11.2f} "
              f"{ratio} {B * macs / best_path / 1e9:7.1f}")  # fmt: skip
    print(f"(GEMV_MAX_ROWS is {original[0]} in backends/numba/linear.py; batch 1 takes the one-row loops on every "
          f"path but BLAS; panels from {lin.PANEL_MIN_ROWS} rows where they fit, else the tiles)")  # fmt: skip


def whole_steps(args) -> None:
    """Whole decode steps of a checkpoint on B rows (a ragged cache at --context positions): panels vs the 4 x 3
    tiles vs the 4 x 6 tiles (`WIDE_TILES`, AVX-512 hosts' default), each kernel by kernel, and the 4 x 6 tiles'
    step in one region (decode_step.py's batched step, `BATCH_STEP`: the default where it applies)."""
    import tinyqwen
    from tinyqwen.backends.numba import decode_step
    from tinyqwen.backends.numba import decode_tiles as tiles
    from tinyqwen.backends.numba import linear as lin
    from tinyqwen.serve.kv_pool import KVPool

    model = tinyqwen.load_model(args.model, backend="numba")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    flags = lin.BATCH_PANELS, tiles.WIDE_TILES, decode_step.BATCH_STEP
    paths = {
        "panels": (True, flags[1], False),
        "tiles4x3": (False, False, False),
        "tiles4x6": (False, True, False),
        "region": (False, True, True),
    }  # PANELS, WIDE, BATCH_STEP
    print(f"{Path(args.model).name}: whole decode steps, {args.context} positions per row, ms per step "
          f"({args.clock} time, best of {args.repeats}, interleaved; WIDE_TILES is {flags[1]} here)")  # fmt: skip
    print(f"{'batch':>5} {'panels':>9} {'4x3':>9} {'4x6':>9} {'4x6 region':>11} {'4x3/panels':>11} {'4x3/4x6':>8} "
          f"{'4x6/region':>11} {'max |dlogit| 4x6 vs 4x3':>24} {'same argmax':>12} {'region == 4x6':>14}")  # fmt: skip
    for B in (int(b) for b in args.batches.split(",")):
        pool = KVPool(model, B, args.context + 4 * args.repeats + 8)
        pool.decoding, pool.owner = B, [object()] * B
        fill_pool(pool, args.context)
        ids = np.arange(1000, 1000 + B)[:, None]
        times: dict[str, list[float]] = {path: [] for path in paths}
        logits = {}
        try:
            for rep in range(args.repeats + 1):  # the first round compiles / warms, not counted
                for path, (panels, wide, region) in paths.items():
                    lin.BATCH_PANELS, tiles.WIDE_TILES, decode_step.BATCH_STEP = panels, wide, region
                    pool.lengths[:] = args.context
                    t = clock()
                    out = model.forward(ids, cache=pool.batch(), last_only=True)
                    if rep:
                        times[path].append(clock() - t)
                    logits[path] = np.asarray(out.logits)[:, -1]
        finally:
            lin.BATCH_PANELS, tiles.WIDE_TILES, decode_step.BATCH_STEP = flags
        p, t3, t6, r6 = (min(times[path]) for path in paths)
        diff = np.abs(logits["tiles4x6"] - logits["tiles4x3"]).max()
        same = bool((logits["tiles4x6"].argmax(-1) == logits["tiles4x3"].argmax(-1)).all())
        equal = bool(np.array_equal(logits["region"], logits["tiles4x6"]))
        print(f"{B:5d} {p * 1e3:9.1f} {t3 * 1e3:9.1f} {t6 * 1e3:9.1f} {r6 * 1e3:11.1f} {t3 / p:11.2f} "
              f"{t3 / t6:8.2f} {t6 / r6:11.2f} {diff:24.2e} {str(same):>12} {str(equal):>14}",
              flush=True)  # fmt: skip


def fill_pool(pool, n: int) -> None:
    """Write values into the first n positions of every row of a KV pool, as a server's prefills would have. The
    pool is mapped lazily: never-written positions all read the one shared zero page, which stays in L1/L2, so a
    step over an unwritten pool times attention at a fraction of its real cost (16 rows at 160 positions: 26 ms
    per step over zero pages against ~60 ms over written ones, loaded machine)."""
    rng = np.random.default_rng(1)
    for store in (pool.cache.keys, pool.cache.values):
        for a in store:
            a[:, :, :n] = rng.standard_normal(a[:, :, :n].shape, dtype=np.float32).astype(a.dtype)


def breakdown(args) -> None:
    """Where one whole B-row decode step's time goes: each backend call of the layer-by-layer step (the products per
    weight, the lm_head, attention, the norms, RoPE, the KV write) timed around the call, wall and CPU (this
    process, every thread), the rest of the step (Python between the calls, reshapes, residual adds, the mask and
    the rotary angles) as "other". The timers add ~1 us per call (~300 calls). Best step of --repeats by wall
    time, after one warm-up step, per batch size; interleaved with the same step as one region (decode_step.py's
    batched step, the default where it applies), whose parts are not timed apart."""
    import dataclasses

    import tinyqwen
    from tinyqwen.backends.numba import decode_step
    from tinyqwen.serve.kv_pool import KVPool

    model = tinyqwen.load_model(args.model, backend="numba")
    k = model.backend
    timed_backend = None
    spent: dict[str, list[float]] = {}

    def timed(name, fn):
        def run(*a, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a, **kw)
            part = name(*a) if callable(name) else name
            w = spent.setdefault(part, [0.0, 0.0, 0])
            w[0] += time.perf_counter() - t
            w[1] += time.process_time() - c
            w[2] += 1
            return out

        return run

    head, o_projs = model.weights.lm_head, {id(layer.attn.o_proj) for layer in model.weights.layers}

    def linear_part(x, w, *_):
        return "lm_head" if w is head else "o_proj" if id(w) in o_projs else "linear (other)"

    def norm_part(x, *_):
        return "rms_norm (q/k heads)" if x.ndim == 4 else "rms_norm"

    timed_backend = dataclasses.replace(
        k,
        linear=timed(linear_part, k.linear),
        linears=timed("q/k/v", k.linears),
        rms_norm=timed(norm_part, k.rms_norm),
        apply_rope=timed("rope", k.apply_rope),
        attention=timed("attention", k.attention),
        swiglu=timed("gate/up + down", k.swiglu),
        embed=timed("embed", k.embed),
    )
    print(f"{Path(args.model).name}: one decode step's parts, {args.context} positions per row, ms "
          f"(best step of {args.repeats} by wall time)")  # fmt: skip
    for B in (int(b) for b in args.batches.split(",")):
        pool = KVPool(model, B, args.context + 2 * args.repeats + 8)
        pool.decoding, pool.owner = B, [object()] * B
        fill_pool(pool, args.context + 8)
        ids = np.arange(1000, 1000 + B)[:, None]
        best_step: tuple[float, float, dict] = (float("inf"), 0.0, {})
        region = [float("inf"), float("inf")]  # the whole step in one region (decode_step.py): wall, CPU
        flag = decode_step.BATCH_STEP
        for rep in range(args.repeats + 1):  # interleaved: the parts kernel by kernel, then the one region
            for whole in (False, True):
                pool.lengths[:] = args.context + np.arange(B) % 8  # ragged: rows a few positions apart
                cache = pool.batch()
                decode_step.BATCH_STEP = whole
                model.backend = k if whole else timed_backend
                if not whole:
                    cache.update = timed("KV write (cache.update)", cache.update)
                spent.clear()
                t, c = time.perf_counter(), time.process_time()
                model.forward(ids, cache=cache, last_only=True)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                decode_step.BATCH_STEP, model.backend = flag, k
                if rep and whole:
                    region = [min(region[0], wall), min(region[1], cpu)]
                elif rep and wall < best_step[0]:
                    best_step = (wall, cpu, {p: list(v) for p, v in spent.items()})
        wall, cpu, parts = best_step
        print(f"batch {B}: one region (decode_step.py) {region[0] * 1e3:.1f} ms wall, {region[1] * 1e3:.1f} ms CPU; "
              f"kernel by kernel {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU ({cpu / wall:.2f} cores), "
              f"{wall / region[0]:.2f}x:")  # fmt: skip
        print(f"  {'part':<26} {'calls':>5} {'wall ms':>8} {'%':>5} {'CPU ms':>8} {'cores':>6}")
        rows = sorted(parts.items(), key=lambda p: -p[1][0])
        rows.append(("other (Python, adds, mask)", [wall - sum(v[0] for v in parts.values()),
                                                    cpu - sum(v[1] for v in parts.values()), 0]))  # fmt: skip
        for part, (w, c, n) in rows:
            print(f"  {part:<26} {n:5d} {w * 1e3:8.2f} {100 * w / wall:5.1f} {c * 1e3:8.2f} "
                  f"{c / w if w > 0 else 0:6.2f}")  # fmt: skip


def medium_steps(args) -> None:
    """Whole decode steps of a checkpoint on B rows, matmul_precision "highest" (the 4 x 6 float32 tiles' step in one
    region) against "medium" on the vdpbf16ps tiles (AVX512-BF16 hosts) in one region (decode_step.py's batched
    step) and kernel by kernel (`BATCH_STEP` off), and on the float32 tiles (x rounded; BATCH_DPBF16 off, kernel by
    kernel). Every row's keys and values written first (fill_pool)."""
    import tinyqwen
    from tinyqwen.backends.numba import decode_step
    from tinyqwen.backends.numba import decode_tiles as tiles
    from tinyqwen.backends.numba import linear as lin
    from tinyqwen.serve.kv_pool import KVPool

    models = {
        p: tinyqwen.load_model(args.model, backend="numba", matmul_precision=p) for p in ("highest", "medium")
    }
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    paths = {  # precision, BATCH_DPBF16, BATCH_STEP
        "highest": ("highest", True, True),
        "medium": ("medium", True, True),
        "medium-kbk": ("medium", True, False),
        "medium-f32": ("medium", False, True),
    }
    flags = lin.BATCH_DPBF16, decode_step.BATCH_STEP
    print(f"{Path(args.model).name}: whole decode steps, {args.context} positions per row, ms per step ({args.clock} "
          f"time, best of {args.repeats}, interleaved; vdpbf16ps tiles here: {tiles.DPBF16_TILES})")  # fmt: skip
    print(f"{'batch':>5} {'highest':>9} {'medium':>9} {'med-kbk':>9} {'med-f32':>9} {'high/med':>9} "
          f"{'kbk/med':>8} {'medf32/med':>11} {'max|dlogit|/max med vs high':>28} {'same argmax':>12} "
          f"{'region == kbk':>14}")  # fmt: skip
    for B in (int(b) for b in args.batches.split(",")):
        pools = {p: KVPool(m, B, args.context + 4 * args.repeats + 8) for p, m in models.items()}
        for pool in pools.values():
            pool.decoding, pool.owner = B, [object()] * B
            fill_pool(pool, args.context)
        ids = np.arange(1000, 1000 + B)[:, None]
        times: dict[str, list[float]] = {path: [] for path in paths}
        logits = {}
        try:
            for rep in range(args.repeats + 1):  # the first round compiles / warms, not counted
                for path, (precision, dpbf16, region) in paths.items():
                    lin.BATCH_DPBF16, decode_step.BATCH_STEP = dpbf16, region
                    pool = pools[precision]
                    pool.lengths[:] = args.context
                    t = clock()
                    out = models[precision].forward(ids, cache=pool.batch(), last_only=True)
                    if rep:
                        times[path].append(clock() - t)
                    logits[path] = np.asarray(out.logits, np.float64)[:, -1]
        finally:
            lin.BATCH_DPBF16, decode_step.BATCH_STEP = flags
        h, m, mk, mf = (min(times[path]) for path in paths)
        diff = np.abs(logits["medium"] - logits["highest"]).max() / np.abs(logits["highest"]).max()
        same = bool((logits["medium"].argmax(-1) == logits["highest"].argmax(-1)).all())
        equal = bool(np.array_equal(logits["medium"], logits["medium-kbk"]))
        print(f"{B:5d} {h * 1e3:9.1f} {m * 1e3:9.1f} {mk * 1e3:9.1f} {mf * 1e3:9.1f} {h / m:9.2f} {mk / m:8.2f} "
              f"{mf / m:11.2f} {diff:28.2e} {str(same):>12} {str(equal):>14}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
