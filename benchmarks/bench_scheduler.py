"""The serving scheduler without HTTP: a burst of requests through `tinyqwen.serve.engine.Engine`, step by step, per
prefill chunk and step kind, interleaved in one process.

    python benchmarks/bench_scheduler.py --model QWEN3_0.6B_DIR                      # prompt-heavy, 16 clients
    python benchmarks/bench_scheduler.py --model QWEN3_0.6B_DIR --prompt 0 --new 64  # decode-heavy (32-64 ids)
    python benchmarks/bench_scheduler.py --model DIR --configs 256:mixed,256:two,128:mixed --clock wall
    python benchmarks/bench_scheduler.py --model DIR --configs 256:mixed:whole,256:mixed:split --clock wall

`--clients` requests arrive together (the load benchmark's burst). Each config is `CHUNK:KIND`: the prefill chunk
(`Engine.prefill_chunk`, prompt tokens per step) and how a step with both a prefill round and decode rows runs:
"mixed", one forward for both (tinyqwen/serve/mixed_forward.py, the default with the model itself: each prompt a
group of its own), "padded", the same forward with the prompts of a round padded to one length (`Engine.grouped`
off, the plan a wrapper model gets), or "two", the
chunk's forward and then the decode's; an optional third field, "split" (the default) or "whole", sets the numba
backend's `linear.SPLIT_PREFILL_PRODUCTS` (prefill's products as one part per thread, or OpenBLAS's threads on the
whole: only differs with `--clock wall`, the cpu clock runs one thread). Per config: the burst's time, generated tok/s, TTFT and inter-token latency
(p50/p95, from the burst's start, measured at the scheduler), the steps, the time spent outside the model's
forwards (sampling, parsing, bookkeeping: the scheduler's own cost) and whether every reply equals the first
config's (greedy: they must).

`--clock cpu` (the default) times with the process's CPU time and runs the kernels on ONE thread
(NUMBA_NUM_THREADS=1, one BLAS thread): a figure of work that other processes on a shared machine disturb little,
for comparing schedules; `--clock wall` times what a user would see, on the threads the machine gives.

Measured (Qwen3-0.6B-shaped random bf16 checkpoint, numba, AMD EPYC, one thread, CPU time, a shared machine at load
6-10; benchmarks/results/2026-12-07-scheduler-prompt-heavy-cpu-busy.txt), prompt-heavy, 16 clients x 256-token
prompts x 48 new tokens: chunk 256 "mixed" 81.4 s of work (ITL p95 4.1 s), 256 "two" 82.8 s (4.2 s), 128 "mixed"
91.4 s (ITL p95 2.4 s, TTFT p95 73 s against 60); an earlier run: 256 "two" 76.1 s, 256 "mixed" 75.5 s, 64 "mixed"
113 s (ITL p95 1.8 s). On this compute-bound CPU the decode rows do not ride along a chunk for free (each row still
needs its own lm_head row, a quarter of a row's multiply-adds, and its own attention over its context), and every
forward has a fixed cost (the bf16 weights widened for BLAS, ~0.12 s on one thread, and streamed from memory): the
mixed step saves ~1-2 %, and halving the chunk bought 40 % off the ITL p95 for 11 % of the throughput, so the
default chunk stays 256. The scheduler's own work (sampling, parsing, bookkeeping): 0.3 s of 81 (0.4 %).

On two threads (`--clock wall`, 16 new tokens, the same shared machine at load 5-9;
benchmarks/results/2026-12-07-scheduler-prompt-heavy-split-products-wall-busy.txt) the prefill products split over
the threads ("split", each part widened and multiplied with OpenBLAS on one thread) ran the burst in 196 and 319 s
against 501 and 534 s for OpenBLAS's own threads on the whole widened weight ("whole"): its threads meet at spin
barriers and spin after each product, which a busy machine punishes. Replies identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (or .gguf)")
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--prompt", type=int, default=256, help="prompt ids per request (0: 32-64, decode-heavy)"
    )
    parser.add_argument("--new", type=int, default=48, help="new tokens per request")
    parser.add_argument("--configs", default="256:two,256:mixed,128:mixed")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    if args.clock == "cpu":  # before numba and NumPy's BLAS start their threads
        for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
    import numpy as np

    import tinyqwen
    import tinyqwen.serve.engine as engine_module
    from tinyqwen.kv_cache import kv_bytes_per_token
    from tinyqwen.serve.reply_parser import ReplyParser
    from tinyqwen.tokenizer import Tokenizer

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    engine_module.time = types.SimpleNamespace(perf_counter=clock)  # the scheduler's own stamps on this clock
    model = tinyqwen.load_model(args.model, backend=args.backend)
    tok = Tokenizer.qwen3()
    c = model.config
    rng = np.random.default_rng(0)
    lengths = [args.prompt or int(rng.integers(32, 65)) for _ in range(args.clients)]
    prompts = [[int(t) for t in rng.integers(1000, 100_000, n)] for n in lengths]
    per_token = kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    # every client a KV row: the pool gives each row at least 256 positions (kv_pool.pool_shape), so a budget of
    # prompt + new tokens per client (decode-heavy: ~193) bought only 12 rows for 16 clients, and the burst ran in
    # two waves of smaller steps (12 rows, then 4), not the server's 16-row steps
    budget = args.clients * max(256, max(lengths) + args.new + 1) * per_token

    inside = [0.0]  # time inside the model's forwards

    def timed(fn):
        def run(*a, **k):
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                inside[0] += clock() - t

        return run

    model.forward = timed(model.forward)
    engine_module.forward_groups = timed(engine_module.forward_groups)  # (the engine passes it two groups)

    def burst(
        chunk: int, kind: str, prompts: list, new: int, report: bool = True, products: str = "split"
    ) -> list:
        if args.backend == "numba":
            from tinyqwen.backends.numba import linear

            linear.SPLIT_PREFILL_PRODUCTS = products == "split"
        engine = engine_module.Engine(
            model, tok, max_batch=args.clients, kv_budget=budget, prefill_chunk=chunk
        )
        engine.mixed = engine.mixed and kind in ("mixed", "padded")
        engine.grouped = kind == "mixed"
        stamps: dict[str, list[float]] = {}
        choose = engine._choose

        def stamped(seqs, logits):
            choose(seqs, logits)
            now = clock()
            for seq in seqs:
                stamps.setdefault(seq.job.id, []).append(now)

        engine._choose = stamped
        jobs = [engine_module.Job(p, new, {"eos_token_ids": (), "temperature": 0.0}, ReplyParser(tok, ()))
                for p in prompts]  # fmt: skip
        inside[0], start, steps, widest = 0.0, clock(), 0, 0
        for job in jobs:
            engine._admit(job)
        while engine.waiting or engine.active:
            engine.step()
            steps += 1
            widest = max(widest, engine.pool.decoding)
        total = clock() - start
        ttft = sorted(stamps[j.id][0] - start for j in jobs)
        itl = sorted(b - a for j in jobs for a, b in zip(stamps[j.id], stamps[j.id][1:], strict=False))

        def pct(a: list, q: float) -> float:
            return a[min(len(a) - 1, int(q * len(a)))] if a else float("nan")

        tokens = sum(len(j.output_ids) for j in jobs)
        if not report:
            return []
        print(f"chunk {chunk:4d} {kind:5s} {products:5s}: {total:7.1f} s  {tokens / total:6.2f} tok/s  TTFT p50 {pct(ttft, .5):6.2f} "
              f"p95 {pct(ttft, .95):6.2f} s  ITL p50 {pct(itl, .5) * 1e3:5.0f} p95 {pct(itl, .95) * 1e3:5.0f} ms  "
              f"{steps} steps (up to {widest} rows), {total - inside[0]:.2f} s outside forwards", flush=True)  # fmt: skip
        return [j.output_ids for j in jobs]

    print(f"{args.clients} clients at once, prompts of {min(lengths)}-{max(lengths)} ids, {args.new} new tokens, "
          f"{args.backend}, clock: {args.clock}" + (" (one thread)" if args.clock == "cpu" else ""))  # fmt: skip
    configs = [(int(a), b, *c) for a, b, *c in (item.split(":") for item in args.configs.split(","))]
    for (
        _,
        kind,
        *products,
    ) in configs:  # warm-up: every kernel compiled for both step kinds' shapes, not reported
        burst(4, kind, [[1000 + i] * (6 + i) for i in range(3)], 3, False, *products)
    first = None
    for chunk, kind, *products in configs:
        ids = burst(chunk, kind, prompts, args.new, True, *products)
        first = first or ids
        if ids != first:
            print("   replies differ from the first config's", flush=True)


if __name__ == "__main__":
    main()
