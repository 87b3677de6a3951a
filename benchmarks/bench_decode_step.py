"""Where one batch-1 decode step of the numba backend spends its time: kernels, launches, glue, bandwidth.

    python benchmarks/bench_decode_step.py breakdown [--model M] [--prompt 128] [--steps 16]
    python benchmarks/bench_decode_step.py fused [--model M] [--steps 16] [--repeat 3]   # one call per layer or not
    python benchmarks/bench_decode_step.py launch            # an empty parallel kernel under OpenMP settings
    python benchmarks/bench_decode_step.py stream [--threads 1 2]   # GEMV bytes/s against a plain streaming read
    python benchmarks/bench_decode_step.py prefetch --model M.gguf [--threads 1 2] [--repeat 30]   # row prefetch A/B

breakdown: the model decodes with every backend kernel and every Numba kernel timed from Python (its wrapper's
Python = the first minus the second); "glue" is the step minus the backend kernels: the model's own NumPy between
them (reshapes, residual adds, the KV cache write). It also counts parallel launches per step.
launch: each OpenMP setting in its own process: an empty `prange` kernel back to back, and after ~50 us of Python
(the threads have gone idle: what a decode step's launches meet), microseconds per launch.
fused: the same decode steps with the backend's one-call step (decode_step: every layer, the norm and the lm_head
in one parallel region; bf16, or a quantized GGUF file's "int8" step), one call per layer (decode_layer) as one parallel region, as five `prange` loops
(decode_layer.ONE_REGION = False), and kernel by kernel, interleaved in one process, median ms per step of each round, wall and CPU time (run it with NUMBA_NUM_THREADS=1 on a busy machine:
then CPU time is the work, not the waits).
stream: one pass over a bf16 buffer the size of the lm_head (the machine's streaming ceiling for these threads)
against the decode GEMVs over that buffer (the general loop, and the one-row kernel over uint32 pairs), GB/s. Timings on a shared machine swing: compare within one run.
prefetch: the one-row bf16 GEMV (gemv_one_row.py's row dot) over a bf16 GGUF's own file-mapped weights — every
2 KiB-row matrix of the layers, then the lm_head — with and without asking for the next row ahead
(gemv_one_row.ROW_PREFETCH, chosen per CPU model), interleaved, best of --repeat, GB/s by wall and by CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np

PEER_DIR = os.environ.get("TINYQWEN_PEER_DIR")  # the peers' folder (../shared/peers/setup writes it)

# ----------------------------------------------------------------------------------------------- breakdown


def _timed(fn, name: str, table: dict):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        table[name].append(time.perf_counter() - t)
        return out

    return wrapper


def breakdown(model_path: str, prompt: int, steps: int) -> None:
    import tinyqwen

    model = tinyqwen.load_model(model_path, backend="numba")
    fused = model.backend
    for label, backend in (
        ("kernel by kernel", replace(fused, decode_step=None, decode_layer=None)),
        ("one call per layer", replace(fused, decode_step=None)),
        ("one call per step", fused),
    ):
        print(f"\n=== {label}")
        model.backend = backend
        _breakdown(model, prompt, steps)


def _breakdown(model, prompt: int, steps: int) -> None:
    from tinyqwen.backends.numba import attention, decode_layer, linear, norm_rope

    ids = np.random.default_rng(0).integers(0, 151643, prompt)

    def decode(
        n: int, tables: tuple = ()
    ) -> list[float]:  # seconds per step of n steps after a fresh prefill
        cache = model.new_cache(1, prompt + n + 8, "bfloat16")
        model.forward(ids[None], cache=cache, last_only=True)
        for table in tables:  # count the decode steps only
            table.clear()
        out, tok = [], 0
        for _ in range(n):
            t = time.perf_counter()
            logits = model.forward(np.array([[tok]]), cache=cache, last_only=True).logits
            out.append(time.perf_counter() - t)
            tok = int(logits[0, -1].argmax())
        return out

    decode(2)  # compile / warm
    plain = decode(steps)
    backend = model.backend
    kernels: dict[str, list[float]] = defaultdict(list)
    inner: dict[str, list[float]] = defaultdict(list)
    names = ("linear", "linears", "rms_norm", "apply_rope", "attention", "swiglu", "embed", "decode_layer")
    names = [n for n in names if getattr(backend, n) is not None]
    model.backend = replace(backend, **{n: _timed(getattr(backend, n), n, kernels) for n in names})
    patched = []  # (module, attribute, original): the Numba kernels, timed where the wrappers call them
    for module in (linear, norm_rope, attention, decode_layer):
        for attr in dir(module):
            obj = getattr(module, attr)
            if type(obj).__name__ in ("CPUDispatcher",) and attr.startswith("_"):
                parallel = bool(obj.targetoptions.get("parallel"))
                patched.append((module, attr, obj))
                setattr(module, attr, _timed(obj, attr + (" [parallel]" if parallel else ""), inner))
    try:
        timed = decode(steps, (kernels, inner))
    finally:
        model.backend = backend
        for module, attr, obj in patched:
            setattr(module, attr, obj)
    step = float(np.median(plain))
    step_timed = float(np.median(timed))
    print(
        f"decode step (median of {steps}, prompt {prompt}): {step * 1e3:.2f} ms plain, "
        f"{step_timed * 1e3:.2f} ms instrumented"
    )
    print(f"{'backend call':<28}{'calls/step':>11}{'ms/step':>10}{'us/call':>10}")
    total = 0.0
    for name, ts in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        per_step = sum(ts) / steps
        total += per_step
        print(
            f"{name:<28}{len(ts) / steps:>11.0f}{per_step * 1e3:>10.2f}{per_step / (len(ts) / steps) * 1e6:>10.1f}"
        )
    print(f"{'glue (step - calls)':<28}{'':>11}{(step_timed - total) * 1e3:>10.2f}")
    print(f"\n{'numba kernel':<40}{'calls/step':>11}{'ms/step':>10}{'us/call':>10}")
    launches = 0
    for name, ts in sorted(inner.items(), key=lambda kv: -sum(kv[1])):
        per_step = sum(ts) / steps
        calls = len(ts) / steps
        launches += calls if "parallel" in name else 0
        print(f"{name:<40}{calls:>11.0f}{per_step * 1e3:>10.2f}{per_step / calls * 1e6:>10.1f}")
    inner_total = sum(sum(ts) for ts in inner.values()) / steps
    print(f"{'python in the backend wrappers':<40}{'':>11}{(total - inner_total) * 1e3:>10.2f}")
    print(f"parallel kernel calls per step: {launches:.0f}")


def fused_ab(model_path: str, prompt: int, steps: int, repeat: int) -> None:
    import tinyqwen
    from tinyqwen.backends.numba import decode_layer

    model = tinyqwen.load_model(model_path, backend="numba")
    fused = model.backend
    # (backend, decode_layer.ONE_REGION): the whole step as one parallel region (decode_step.py), each layer as
    # one, as five `prange` loops, or kernel by kernel
    per_layer = replace(fused, decode_step=None)
    variants = {
        "one region per step": (fused, True),
        "one region per layer": (per_layer, True),
        "five loops per layer": (per_layer, False),
        "kernel by kernel": (replace(per_layer, decode_layer=None), True),
    }
    ids = np.random.default_rng(0).integers(0, 151643, prompt)
    best = dict.fromkeys(variants, float("inf"))
    best_cpu = dict(
        best
    )  # CPU seconds of the process: with one thread (NUMBA_NUM_THREADS=1) the work itself,
    # whatever the time other processes take from it on a shared machine
    for r in range(repeat + 1):  # the first round warms up (compiles)
        for name, (backend, region) in variants.items():
            model.backend = backend
            decode_layer.ONE_REGION = region
            cache = model.new_cache(1, prompt + steps + 8, "bfloat16")
            model.forward(ids[None], cache=cache, last_only=True)
            ts, cpu, tok = [], [], 0
            for _ in range(steps if r else 2):
                t, c = time.perf_counter(), time.process_time()
                logits = model.forward(np.array([[tok]]), cache=cache, last_only=True).logits
                ts.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                tok = int(logits[0, -1].argmax())
            if r:
                best[name] = min(best[name], float(np.median(ts)))
                best_cpu[name] = min(best_cpu[name], float(np.median(cpu)))
                print(
                    f"round {r}: {name:<20} {np.median(ts) * 1e3:7.2f} ms/step wall, "
                    f"{np.median(cpu) * 1e3:7.2f} ms CPU",
                    flush=True,
                )
    for label, table in (("wall", best), ("CPU", best_cpu)):
        a = table["one region per step"]
        print(
            f"best {label}: {' / '.join(f'{k} {v * 1e3:.2f} ms' for k, v in table.items())}; "
            f"each / one region per step: {' / '.join(f'{v / a:.3f}' for v in table.values())}"
        )


# ----------------------------------------------------------------------------------------------- launch

LAUNCH_CHILD = r"""
import time, json, sys
import numpy as np
from tinyqwen.backends.numba import settings  # noqa (the project's defaults, unless the env set them)
import numba
from numba import njit, prange

@njit(parallel=True)
def empty(a):
    for i in prange(a.shape[0]):
        a[i] += 1.0

a = np.zeros(2 * numba.get_num_threads(), np.float32)
empty(a)
def gap(us):
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass
out = {"layer": numba.threading_layer()}
for g in (0, 50, 500):
    best = []
    for _ in range(5):
        ts = []
        for _ in range(400):
            gap(g)
            t = time.perf_counter(); empty(a); ts.append(time.perf_counter() - t)
        best.append(np.median(ts))
    out[f"gap{g}"] = min(best) * 1e6
print(json.dumps(out))
"""

LAUNCH_SETTINGS = {
    "passive, spin 10000 (current)": {},
    "passive, spin 0": {"GOMP_SPINCOUNT": "0"},
    "passive, spin 100000": {"GOMP_SPINCOUNT": "100000"},
    "passive, spin 1000000": {"GOMP_SPINCOUNT": "1000000"},
    "active (spin forever)": {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "infinite"},
    "workqueue layer": {"NUMBA_THREADING_LAYER": "workqueue"},
}


def launch(threads: int) -> None:
    print(f"empty prange kernel, {threads} threads: median us per call after a Python gap of 0 / 50 / 500 us")
    for label, extra in LAUNCH_SETTINGS.items():
        env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), **extra}
        done = subprocess.run([sys.executable, "-c", LAUNCH_CHILD], capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"{label:<34} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{label:<34}{r['layer']:>10}{r['gap0']:>9.1f}{r['gap50']:>9.1f}{r['gap500']:>9.1f}")


# ----------------------------------------------------------------------------------------------- stream


def stream(threads: list[int], repeat: int) -> None:
    import numba
    from numba import njit, prange

    from tinyqwen.backends.numba import gemv_one_row, linear
    from tinyqwen.backends.numba.intrinsics import FAST, _bf16

    @njit(cache=False, fastmath=FAST, error_model="numpy")
    def _sum_rows(w, lo, hi):
        acc = np.float32(0.0)
        for r in range(lo, hi):
            for k in range(w.shape[1]):
                acc += _bf16(w[r, k])
        return acc

    @njit(parallel=True, cache=False)
    def read_all(w, out, chunks):  # the same chunking as the GEMV, one sum instead of a dot product
        n = w.shape[0]
        size = (n + chunks - 1) // chunks
        for c in prange(chunks):
            out[c] = _sum_rows(w, c * size, min(n, (c + 1) * size))

    rng = np.random.default_rng(0)
    shapes = {"lm_head [151936, 1024]": (151936, 1024), "gate [3072, 1024]": (3072, 1024),
              "down [1024, 3072]": (1024, 3072), "q [2048, 1024]": (2048, 1024)}  # fmt: skip
    for label, shape in shapes.items():
        w = rng.integers(0x3C00, 0x3F00, shape, dtype=np.uint16)  # bf16 bits of modest values
        x = rng.standard_normal((1, shape[1])).astype(np.float32)
        out = np.empty((1, shape[0]), np.float32)
        starts = np.array([0, shape[0]], np.int64)
        for t in threads:
            numba.set_num_threads(t)
            chunks = 8 * t
            sums = np.empty(chunks, np.float32)
            kinds = {  # the one-weight-at-a-time loop over fixed blocks; the uint32-pair kernel, claimed chunks
                "read": (read_all, (w, sums, chunks)),
                "GEMV loop": (linear._gemv_many_bf16, (x, (w,), (out,), starts, chunks)),
                "GEMV pairs": (gemv_one_row._gemv1_many_bf16, (x, (w,), (out,), starts, t)),
            }
            for fn, fn_args in kinds.values():
                fn(*fn_args)
            # enough passes for ~0.3 s per kind, interleaved
            passes = max(3, int(0.3 / max(w.nbytes / 20e9, 1e-5)))
            best = dict.fromkeys(kinds, float("inf"))
            for _ in range(repeat):
                for kind, (fn, fn_args) in kinds.items():
                    t0 = time.perf_counter()
                    for _ in range(passes):
                        fn(*fn_args)
                    best[kind] = min(best[kind], (time.perf_counter() - t0) / passes)
            print(
                f"{label:<24} {t} thread(s): "
                + ", ".join(f"{k} {w.nbytes / v / 1e9:5.1f} GB/s" for k, v in best.items())
                + f" (pairs {best['GEMV pairs'] * 1e6:.0f} us)"
            )


def prefetch_ab(model_path: str, threads: list[int], repeat: int) -> None:
    import numba
    from numba import njit, prange

    from tinyqwen.backends.numba import gemv_one_row
    from tinyqwen.backends.numba.gemv_one_row import _dot_pairs
    from tinyqwen.backends.numba.intrinsics import FAST, _prefetch_weight_row
    from tinyqwen.gguf import GGUFFile

    @njit(cache=False, fastmath=FAST, error_model="numpy")
    def rows(xe, xo, w, out, lo, hi, ahead):  # gemv_one_row._gemv1_rows_bf16's loop, the prefetch a choice
        w2 = w.view(np.uint32)
        for n in range(lo, hi):
            if ahead and n + 1 < hi:
                _prefetch_weight_row(w2[n + 1])
            out[0, n] = _dot_pairs(xe, xo, w2[n])

    @njit(parallel=True, cache=False)
    def gemv(
        xe, xo, w, out, workers, ahead
    ):  # chunks of 64 rows (128 KiB), a contiguous run of them per thread
        n = w.shape[0]
        chunks = (n + 63) // 64
        per = (chunks + workers - 1) // workers
        for t in prange(workers):
            for c in range(t * per, min(chunks, (t + 1) * per)):
                rows(xe, xo, w, out, c * 64, min(n, c * 64 + 64), ahead)

    f = GGUFFile(model_path)
    names = [n for n in f.tensors if n.startswith("blk.") and f.info(n).ggml_type == "BF16"]
    ws = [f.raw(n) for n in names if len(f.info(n).shape) == 2 and f.info(n).shape[1] == 1024]
    ws.append(f.raw("token_embd.weight"))  # the lm_head of a tied model
    x = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
    xe, xo = x[0::2].copy(), x[1::2].copy()
    outs = [np.empty((1, w.shape[0]), np.float32) for w in ws]
    nbytes = sum(w.nbytes for w in ws)
    print(
        f"{len(ws)} matrices of 2 KiB rows, {nbytes / 1e6:.0f} MB; ROW_PREFETCH here: {gemv_one_row.ROW_PREFETCH}"
    )
    for t in threads:
        numba.set_num_threads(t)
        best = {ahead: [float("inf")] * 2 for ahead in (False, True)}
        for ahead in best:
            for w, o in zip(ws, outs, strict=True):
                gemv(xe, xo, w, o, t, ahead)  # compile, warm
        for _ in range(repeat):
            for ahead, b in best.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for w, o in zip(ws, outs, strict=True):
                    gemv(xe, xo, w, o, t, ahead)
                b[0] = min(b[0], time.perf_counter() - t0)
                b[1] = min(b[1], time.process_time() - c0)
        (w0, c0), (w1, c1) = best[False], best[True]
        print(
            f"{t} thread(s): without {nbytes / w0 / 1e9:5.1f} GB/s wall ({nbytes * t / c0 / 1e9:5.1f} of CPU time), "
            f"with {nbytes / w1 / 1e9:5.1f} ({nbytes * t / c1 / 1e9:5.1f}); time with/without {w1 / w0:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("breakdown", "fused", "launch", "stream", "prefetch"))
    parser.add_argument(
        "--model",
        default=PEER_DIR and os.path.join(PEER_DIR, "qwen3-0.6b-random"),
        help="checkpoint (default: $TINYQWEN_PEER_DIR/qwen3-0.6b-random)",
    )
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.what in ("breakdown", "fused") and not args.model:
        parser.error("no model: pass --model or set TINYQWEN_PEER_DIR (the folder holding qwen3-0.6b-random)")
    if args.what == "breakdown":
        breakdown(args.model, args.prompt, args.steps)
    elif args.what == "fused":
        fused_ab(args.model, args.prompt, args.steps, args.repeat)
    elif args.what == "launch":
        launch(max(args.threads))
    elif args.what == "prefetch":
        if not (args.model or "").endswith(".gguf"):
            parser.error("prefetch: pass --model with a bf16 .gguf file (its weights as the file maps them)")
        from tinyqwen.backends.numba import settings  # noqa: F401 (before Numba)

        prefetch_ab(args.model, args.threads, args.repeat)
    else:
        from tinyqwen.backends.numba import settings  # noqa: F401 (before Numba)

        stream(args.threads, args.repeat)


if __name__ == "__main__":
    main()
