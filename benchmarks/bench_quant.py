"""Quantized GGUF files, tinyqwen's numba backend against llama.cpp on the same file, in one run.

For each file: llama.cpp (llama-cpp-python, with the peer's Python) and tinyqwen's numba backend with its two decode
GEMVs over the blocks ("int8": the activations quantized to int8 blocks, integer dot products, llama.cpp's scheme;
"float": the codes widened in registers), each engine in its own process with the same thread count, greedy, the
same random prompt ids. prefill tok/s = P / t(first token); decode tok/s = N / (t(1 + N tokens) − t(first token));
best of R. Peak RSS is the child's (getrusage); "-base" subtracts the peak before any weight was loaded (the
interpreter and the engine's libraries: Python + NumPy + Numba + LLVM are ~150 MB, llama-cpp-python less), and
"/file" is that over the file's size: the weights stay in their blocks, so a process should need little beyond
the file (+ 15 % is the bar). A numba child that had to compile (a cold Numba cache: LLVM's memory then dominates
the excess) is run again from the cache, and that run is the one reported. Timings on a shared machine swing: read the ratios.

    python benchmarks/bench_quant.py MODEL.gguf [MODEL2.gguf ...] --peer-python PY [--prompt 128 --new 32 --repeat 2]
        [--gemv int8 float int8:unfused] [--twice] [--rounds 4]

A bf16 GGUF file runs tinyqwen's bf16 kernels (the --gemv choice does not matter there): by default a decode
step is one call (backends/numba/decode_step.py: every layer, the final norm and the lm_head); "int8:per-layer"
makes each layer one call (backends/numba/decode_layer.py); "int8:per-kernel" runs it kernel by kernel, as before,
and "int8:unfused" also splits SwiGLU into two launches. A quantized dense file's decode step is one call too in
"int8" (its quantized twin of the same function), "int8:per-layer" one call per layer, "int8:per-kernel" kernel by
kernel; "float" is always per kernel. The bf16 comparison with llama.cpp, one run:

    python benchmarks/bench_quant.py qwen3-0.6b-random-bf16.gguf --peer-python PY --gemv int8 int8:per-layer \
        --prompt 128 --new 64 --repeat 3 --twice
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
engine, path, P, N, R, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if engine == "llama.cpp":
    from llama_cpp import Llama
    base = rss()  # the interpreter and the engine's libraries, before any weight
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=P + N + 8, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    vocab = vocab_size = llm.n_vocab()
    def argmax():
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())
    def run(prompt, k):
        llm.reset(); llm.eval(prompt); out = [argmax()]
        while len(out) < k:
            llm.eval([out[-1]]); out.append(argmax())
        return out
else:
    import tinyqwen
    from tinyqwen.backends.numba import backend, compile_clock, linear, quant  # (and Numba, LLVM)
    base = rss()
    clock = compile_clock()
    t0 = time.perf_counter()
    model = tinyqwen.load_model(path, backend="numba")
    model.backend = backend(quant_gemv=engine.split(":")[1])
    vocab_size = model.config.vocab_size
    from dataclasses import replace
    if engine.endswith(":unfused") or engine.endswith(":per-kernel"):  # each layer kernel by kernel
        model.backend = replace(model.backend, decode_step=None, decode_layer=None)
    if engine.endswith(":per-layer"):  # one call per layer (bf16: the whole step is one call by default)
        model.backend = replace(model.backend, decode_step=None)
    if engine.endswith(":unfused"):  # and decode's bf16 SwiGLU as two launches, as before the fused kernel
        linear.FUSED_SWIGLU = False
    def run(prompt, k):
        cache = model.new_cache(1, P + N + 8, "bfloat16")
        out = [int(model.forward(np.asarray([prompt]), cache=cache, last_only=True).logits[0, -1].argmax())]
        while len(out) < k:
            out.append(int(model.forward(np.asarray([[out[-1]]]), cache=cache, last_only=True).logits[0, -1].argmax()))
        return out
load_s = time.perf_counter() - t0
vocab_size = min(vocab_size, 151643)  # (ids of real tokens, not the special ones past them)
prompt = [int(x) for x in np.random.default_rng(0).integers(0, vocab_size, P)]
run(prompt[:8], 2)  # warm-up (JIT, caches)
best1 = bestN = float("inf")
for _ in range(R):
    t = time.perf_counter(); run(prompt, 1); best1 = min(best1, time.perf_counter() - t)
    t = time.perf_counter(); ids = run(prompt, 1 + N); bestN = min(bestN, time.perf_counter() - t)
compile_s = clock.total if engine != "llama.cpp" else 0.0
print(json.dumps({"prefill": P / best1, "decode": N / max(bestN - best1, 1e-9), "ids": ids[:6], "load_s": load_s,
                  "peak_rss": rss(), "base_rss": base, "compile_s": compile_s}))
"""


def run_child(python: str, engine: str, path: Path, args) -> dict:
    env = {**os.environ, **{k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                             "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}  # fmt: skip
    cmd = [python, "-c", CHILD, engine, str(path), str(args.prompt), str(args.new), str(args.repeat)]
    for _ in range(2):
        done = subprocess.run([*cmd, str(args.threads)], capture_output=True, text=True, env=env)
        if done.returncode:
            return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        # a cold Numba cache compiles the kernels in the timed process: LLVM's compile memory (~250 MB here,
        # +0.2 of a 0.6B q8_0 file) lands in its peak RSS. Run it again, now from the cache, as a user's runs are
        if result.get("compile_s", 0.0) < 1.0:
            break
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--peer-python", required=True, help="a python with llama-cpp-python")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--twice", action="store_true", help="time llama.cpp before and after tinyqwen")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of every engine, the order reversed each round; then each engine's median and the ratio "
        "of medians (a shared machine's bandwidth drifts by 10-20 %% between runs minutes apart)",
    )
    parser.add_argument(
        "--gemv", nargs="+", default=["int8", "float"], help="tinyqwen's decode GEMVs to time"
    )
    args = parser.parse_args()
    print(f"P={args.prompt} N={args.new} best of {args.repeat}, {args.threads} threads")
    print(
        f"{'file':<28} {'engine':<20} {'prefill':>8} {'decode':>7} {'vs llama':>8} {'RSS MB':>7} {'-base':>6} {'/file':>6}"
    )
    engines = [("llama.cpp", args.peer_python, "llama.cpp")]
    engines += [(f"numba:{g}", sys.executable, f"numba:{g}") for g in args.gemv]
    for path in args.files:
        size = path.stat().st_size
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in engines}
        for k in range(args.rounds):
            order = engines if k % 2 == 0 else engines[::-1]  # neither engine always first after a pause
            rows = [(name, run_child(python, engine, path, args)) for name, python, engine in order]
            if args.twice:  # llama.cpp again at the end: how much the machine drifted during the run
                rows.append(("llama.cpp (again)", run_child(args.peer_python, "llama.cpp", path, args)))
            ref = dict(rows).get("llama.cpp", {}).get("decode")
            for name, r in rows:
                if "error" in r:
                    print(f"{path.name:<28} {name:<20} error: {r['error']}")
                    continue
                runs.setdefault(name, []).append(r)
                ratio = r["decode"] / ref if ref else float("nan")
                print(
                    f"{path.name:<28} {name:<20} {r['prefill']:8.1f} {r['decode']:7.2f} {ratio:8.2f} "
                    f"{r['peak_rss'] / 1e6:7.0f} {(r['peak_rss'] - r['base_rss']) / 1e6:6.0f} "
                    f"{(r['peak_rss'] - r['base_rss']) / size:6.2f}  ids {r['ids']}",
                    flush=True,
                )
        if args.rounds > 1:
            _medians(path.name, runs)


def _medians(label: str, runs: dict[str, list[dict]]) -> None:  # each engine's median over the rounds
    import statistics

    peer = runs.get("llama.cpp") or []
    if not peer:
        return
    ref = {k: statistics.median(r[k] for r in peer) for k in ("prefill", "decode")}
    for name, rs in runs.items():
        if not rs or name.startswith("llama.cpp ("):
            continue
        med = {k: statistics.median(r[k] for r in rs) for k in ("prefill", "decode")}
        print(
            f"{label:<28} {name:<20} median of {len(rs)}: prefill {med['prefill']:.1f} "
            f"({med['prefill'] / ref['prefill']:.2f}x llama.cpp), decode {med['decode']:.2f} "
            f"({med['decode'] / ref['decode']:.2f}x); decode each round {[round(r['decode'], 1) for r in rs]}"
        )


if __name__ == "__main__":
    main()
