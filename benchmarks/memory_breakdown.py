"""Where a GGUF run's resident memory goes: the numba backend's process, stage by stage (Linux: /proc/self).

bench_quant.py reports one number per engine, the peak RSS (and "/file": the peak less the process before any weight,
over the file's bytes). This script takes the same run apart, in the same order as bench_quant's child (load,
warm-up, a prefill alone, a prefill and the decode): after each stage it reads VmRSS and VmHWM (the peak so far)
from /proc/self/status and splits the resident pages by mapping (/proc/self/smaps): the GGUF file's mapping (the
weights, in their blocks), LLVM's library (libllvmlite.so, paged in when Numba starts its JIT), anonymous memory
(the interpreter's objects, NumPy arrays, Numba's runtime, and the KV cache's own mapping,
tinyqwen.kv_cache.lazy_zeros) and other files (libraries).

    python benchmarks/memory_breakdown.py MODEL.gguf [--prompt 128 --new 64] [--numba-first] [--tokenizer]

Numba starts at the warm-up's first kernel; `--numba-first` starts it before load_model with one small kernel (the
RMSNorm's), as a process that ran kernels before loading does (what loading frees is then not reused by Numba's
registries, and shows). Numba, left to itself, pays its start at the first call of any kernel, even one loaded
from its cache: it compiles its runtime's helper functions (NRT) through LLVM's whole optimizer and code generator,
which pages in ~28 MiB of libllvmlite's code, and installs its typing and lowering registries (~15 MiB of Python
objects). The package's lean start (backends/numba/kernel_cache.py, `install_lean_start`) loads saved kernels
without either (~10 MiB: the runtime's C API registered, the loader's share of LLVM); TINYQWEN_NUMBA_LEAN_START=0
gives Numba's own start, to compare. It is counted at that first load. Each kernel then loaded from the cache adds
its LLVM module and machine code (counted per kernel: ~9 MiB for a Q4_K_M decode, ~5 of them the fused decode
layer and the parallel runtime's start). The last lines compare the peak with
its floor — what this engine cannot run without: the tensors' bytes (the data section: the header's pages are
handed back after parsing) + the KV cache's bytes + Numba started + the kernels loaded. Numbers are MiB (2^20
bytes); "/file" as bench_quant's: (peak − the process after the imports) ÷ the file's bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

MIB = 1 << 20


def snapshot(path: Path) -> dict[str, float]:
    """This process's resident memory now, in MiB: total, peak, and by kind of mapping."""
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            status[key] = int(value.split()[0]) / 1024
    by_name: dict[str, float] = {}
    name = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            by_name[name] = by_name.get(name, 0.0) + int(head[1]) / 1024
    gguf = by_name.get(str(path.resolve()), 0.0)
    llvm = sum(v for k, v in by_name.items() if "libllvmlite" in k)
    return {
        "rss": status["VmRSS"],
        "peak": status["VmHWM"],
        "anon": status["RssAnon"],
        "gguf": gguf,
        "llvm": llvm,
        "other files": status["RssFile"] - gguf - llvm,
    }


def _data_bytes(path: Path) -> float:
    """MiB of the file's data section (the tensors), from the reader's parse."""
    from tinyqwen.gguf import GGUFFile

    with GGUFFile(path) as f:
        return (os.path.getsize(path) - f.data_start) / MIB


def _count_kernel_loads() -> dict[str, float]:
    """{kernel: MiB its load from Numba's cache added to the resident memory}, filled as kernels are first called.

    The first load also starts Numba (its runtime compiled through LLVM, its registries): that kernel's entry
    holds both, as "Numba started (with KERNEL)"."""
    from numba.core import caching
    from numba.core.runtime import rtsys

    loads: dict[str, float] = {}
    original = caching.Cache.load_overload

    def load_overload(self, sig, target_context):
        first = not rtsys._init
        before = snapshot(Path("/dev/null"))["rss"]
        result = original(self, sig, target_context)
        name = self._py_func.__name__
        if first:
            name = f"Numba started (with {name})"
        loads[name] = loads.get(name, 0.0) + snapshot(Path("/dev/null"))["rss"] - before
        return result

    caching.Cache.load_overload = load_overload
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument(
        "--numba-first",
        action="store_true",
        help="start Numba (one small kernel) before load_model, as a process that ran kernels before does",
    )
    parser.add_argument("--tokenizer", action="store_true", help="also load the file's tokenizer at the end")
    args = parser.parse_args()
    path, P, N = args.model, args.prompt, args.new

    def stage(name: str) -> dict[str, float]:
        s = snapshot(path)
        print(
            f"{name:<40} {s['rss']:7.1f} {s['peak']:7.1f} {s['gguf']:7.1f} {s['llvm']:6.1f} {s['anon']:6.1f} "
            f"{s['other files']:6.1f}",
            flush=True,
        )
        return s

    print(f"{path.name}: {os.path.getsize(path) / MIB:.1f} MiB; prompt {P}, {N} new tokens; MiB")
    print(f"{'stage':<40} {'VmRSS':>7} {'peak':>7} {'gguf':>7} {'llvm':>6} {'anon':>6} {'files':>6}")
    stage("interpreter + NumPy")
    import tinyqwen
    from tinyqwen.backends.numba import backend, compile_clock

    base = stage("+ tinyqwen, numba backend (base)")
    clock = compile_clock()
    kernels = _count_kernel_loads()
    if args.numba_first:
        from tinyqwen.backends.numba.norm_rope import rms_norm

        rms_norm(
            np.ones((1, 4), np.float32), np.ones(4, np.float32), 1e-6
        )  # one small kernel, from the cache
        stage("+ Numba started (one small kernel)")
    model = tinyqwen.load_model(path, backend="numba")
    model.backend = backend(quant_gemv="int8")
    stage("+ load_model (nothing read yet)")
    vocab = min(model.config.vocab_size, 151643)
    prompt = np.random.default_rng(0).integers(0, vocab, (1, P))

    def run(ids, k):  # bench_quant's run(): a fresh cache, a prefill, k - 1 decode steps
        cache = model.new_cache(1, P + N + 8, "bfloat16")
        out = [int(model.forward(np.asarray([ids]), cache=cache, last_only=True).logits[0, -1].argmax())]
        while len(out) < k:
            out.append(
                int(
                    model.forward(np.asarray([[out[-1]]]), cache=cache, last_only=True).logits[0, -1].argmax()
                )
            )
        return cache

    run(prompt[0, :8], 2)
    stage("+ warm-up (8 tokens, 1 step; Numba starts)")
    run(prompt[0], 1)
    stage(f"+ prefill {P} (its cache dropped after)")
    cache = run(prompt[0], 1 + N)
    end = stage(f"+ prefill {P}, decode {N} (cache kept)")
    if clock.total > 1.0:
        print(f"(Numba compiled for {clock.total:.0f} s in this run: run it again for the cached figures)")
    size = os.path.getsize(path)
    kv = cache.nbytes / MIB
    tensors = _data_bytes(path)
    numba_start = {k: v for k, v in kernels.items() if k.startswith("Numba started")}
    loaded = {k: v for k, v in kernels.items() if k not in numba_start}
    started = sum(numba_start.values())
    floor = tensors + kv + started + sum(loaded.values())  # above base: what this run cannot do without
    print(
        f"\npeak {end['peak']:.1f} MiB; peak − base {end['peak'] - base['rss']:.1f} MiB = "
        f"{(end['peak'] - base['rss']) * MIB / size:.3f} × the file (bench_quant's /file)"
    )
    top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(loaded.items(), key=lambda kv: -kv[1])[:3])
    print(
        f"floor: the tensors {tensors:.1f} (of the file's {size / MIB:.1f}) + the KV cache {kv:.1f} + "
        f"{', '.join(numba_start)} {started:.1f} + {len(loaded)} more kernels loaded from the cache "
        f"{sum(loaded.values()):.1f} ({top}) = {floor:.1f} MiB = {floor * MIB / size:.3f} × the file "
        f"(the bar, + 15 %: {1.15 * size / MIB:.1f} MiB above base)"
    )
    print(
        f"above the floor: {end['peak'] - base['rss'] - floor:.1f} MiB (the interpreter's objects, allocator "
        "slack, a prefill's live temporaries, libraries paged in later)"
    )
    from numba.core.runtime import rtsys

    from tinyqwen.backends.numba.kernel_cache import LEAN_START_ENV

    lean = os.environ.get(LEAN_START_ENV, "1") != "0"
    print(
        f"Numba's start: {'lean (kernel_cache.install_lean_start)' if lean else f'its own ({LEAN_START_ENV}=0)'}; "
        f"its runtime module (NRT) compiled in this run: {'yes' if rtsys._init and rtsys._library else 'no'}"
    )
    if args.tokenizer:
        from tinyqwen.tokenizer import Tokenizer

        del model, cache
        before = stage("(model and cache dropped)")
        tok = Tokenizer.from_gguf(path)
        after = stage("+ the file's tokenizer")
        print(f"tokenizer: {after['rss'] - before['rss']:.1f} MiB resident ({len(tok.vocab)} tokens)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
