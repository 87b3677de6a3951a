"""Prefill with quantized weights, two ways in one process, interleaved: the int8 tiles (backends/numba/quant_matmul.py,
the default) against the earlier prefill — dense weights' blocks widened to float32 into BLAS, MoE experts dotted
one token per row dot (linear.INT8_PREFILL = (), moe.MOE_PREFILL_TILES = False).

    python benchmarks/bench_quant_prefill.py MODEL.gguf [MODEL2.gguf ...] [--prompt 128] [--repeat 5]
        [--threads N] [--blas-threads N] [--kernels]

Per file: the whole prompt's forward pass (last_only logits, a fresh cache each time), A B A B ..., best of
--repeat each, as tok/s and the ratio int8/BLAS; and how far the int8 prefill's last logits are from the BLAS
ones (max |Δ| / max |logit|: the activations' 8-bit rounding). --kernels first times each distinct weight shape of
layer 0 on its own (one matmul, [prompt, K] · [N, K]ᵀ, best of --repeat). --threads sets Numba's threads,
--blas-threads OpenBLAS's (default: as the process has them). A busy machine moves every number: read the ratios;
with one thread of each, --cpu-time (the process's CPU seconds) leaves out the time other processes took the core.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

CLOCK = time.perf_counter


def best_of(fns: dict, repeat: int) -> dict:  # {name: fn} -> {name: best seconds}, run interleaved
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = CLOCK()
            fn()
            best[name] = min(best[name], CLOCK() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--blas-threads", type=int, default=None)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--only-kernels", action="store_true", help="--kernels, and no whole prefill")
    ap.add_argument(
        "--cpu-time", action="store_true", help="the process's CPU seconds instead of wall seconds"
    )
    args = ap.parse_args()
    args.kernels |= args.only_kernels
    if args.cpu_time:  # on a machine other processes keep busy, time spent descheduled is left out
        global CLOCK
        CLOCK = time.process_time

    import numba

    import tinyqwen
    from tinyqwen.backends.numba import QuantWeight, backend, linear, moe, quant
    from tinyqwen.blas_threads import limit_blas_threads

    if args.threads:
        numba.set_num_threads(args.threads)
    if args.blas_threads:
        limit_blas_threads(args.blas_threads)

    def use(
        int8: bool,
    ):  # the tiles, or the earlier prefill (dense: BLAS; MoE experts: one token per row dot)
        linear.INT8_PREFILL = tuple(quant.KINDS) if int8 else ()  # every format, or none
        moe.MOE_PREFILL_TILES = int8

    for path in args.models:
        model = tinyqwen.load_model(path, backend="numba")
        model.backend = backend(quant_gemv="int8")
        print(f"{path}  (numba threads {numba.get_num_threads()}, prompt {args.prompt})")
        if args.kernels:
            layer = model.weights.layers[0]
            seen = {}
            for part in (layer.attn, layer.mlp):
                for name, w in vars(part).items():
                    if isinstance(w, QuantWeight) and len(w.shape) == 2:
                        seen.setdefault((w.qtype, w.shape), name)
            rng = np.random.default_rng(0)
            for (qtype, shape), name in seen.items():
                w = getattr(layer.attn, name, None)
                w = w if isinstance(w, QuantWeight) else getattr(layer.mlp, name)
                x = rng.standard_normal((args.prompt, shape[1])).astype(np.float32)

                def run(int8, w=w, x=x):
                    use(int8)
                    return linear.linear(x, w)

                run(True), run(False)  # compile
                best = best_of({"int8": lambda: run(True), "blas": lambda: run(False)}, args.repeat)
                print(
                    f"  {name:10s} {qtype:5s} {str(shape):13s} int8 {best['int8'] * 1e3:7.2f} ms  "
                    f"BLAS {best['blas'] * 1e3:7.2f} ms  int8/BLAS speed {best['blas'] / best['int8']:.2f}x"
                )
        if args.only_kernels:
            continue
        ids = np.random.default_rng(0).integers(0, min(model.config.vocab_size, 151643), args.prompt)[None]
        # (a MoE file: "BLAS" below is the earlier prefill, its experts on the row dots)
        logits = {}

        def prefill(int8: bool, model=model, ids=ids, logits=logits):
            use(int8)
            cache = model.new_cache(1, args.prompt + 8, "bfloat16")
            logits[int8] = model.forward(ids, cache=cache, last_only=True).logits[0, -1]

        prefill(True), prefill(False)  # compile, warm
        best = best_of({"int8": lambda: prefill(True), "blas": lambda: prefill(False)}, args.repeat)
        use(True)
        diff = float(np.abs(logits[True] - logits[False]).max() / np.abs(logits[False]).max())
        print(
            f"  prefill: int8 {args.prompt / best['int8']:7.1f} tok/s  BLAS {args.prompt / best['blas']:7.1f} tok/s"
            f"  int8/BLAS {best['blas'] / best['int8']:.2f}x   last logits max|Δ|/max|logit| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
