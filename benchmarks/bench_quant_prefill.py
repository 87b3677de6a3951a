"""Prefill with quantized weights, two ways in one process, interleaved: the int8 tiles (backends/numba/quant_matmul.py,
the default) against the earlier prefill — dense weights' blocks widened to float32 into BLAS, MoE experts dotted
one token per row dot (linear.INT8_PREFILL = (), moe.MOE_PREFILL_TILES = False); where Numba compiles for AVX-512 a
third, "panels": the dense weights' blocks dequantized into prefill_gemm.py's panels (linear.QUANT_PREFILL_PANELS),
q/k/v and the MLP in one launch each (linear.QUANT_PANELS_MANY), MoE experts with enough tokens on the panels too
(moe.MOE_PREFILL_PANELS); and a fourth, "panels1": the panels one weight per launch, every MoE expert on the tiles.

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
            # OpenBLAS's threads spin ~0.1 s after an sgemm (linear.py): without a pause the road timed after the
            # BLAS one starts beside them (the panels' [128, 1024] x [3072, 1024] ran 4.3 ms so, 2.0 ms alone)
            time.sleep(0.2)
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
    from tinyqwen.backends.numba import QuantWeight, backend, linear, moe, prefill_gemm, quant
    from tinyqwen.blas_threads import limit_blas_threads

    if args.threads:
        numba.set_num_threads(args.threads)
    if args.blas_threads:
        limit_blas_threads(args.blas_threads)

    roads = ["int8", "blas"] + (["panels", "panels1"] if prefill_gemm.available() else [])

    def use(
        road: str,
    ):  # the tiles, the earlier prefill (dense: BLAS; MoE experts: one token per row dot), or
        # the dense weights' dequantized blocks through prefill_gemm.py's panels (MoE experts as "blas")
        int8 = road == "int8"
        linear.INT8_PREFILL = tuple(quant.KINDS) if int8 else ()  # every format, or none
        linear.QUANT_PREFILL_PANELS = road.startswith("panels")
        linear.QUANT_PANELS_MANY = moe.MOE_PREFILL_PANELS = road == "panels"
        moe.MOE_PREFILL_TILES = road != "blas"

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

                def run(road, w=w, x=x):
                    use(road)
                    return linear.linear(x, w)

                for road in roads:
                    run(road)  # compile
                best = best_of({road: lambda road=road: run(road) for road in roads}, args.repeat)
                line = f"  {name:10s} {qtype:5s} {str(shape):13s}"
                line += "".join(f" {road} {best[road] * 1e3:7.2f} ms" for road in roads)
                line += "".join(
                    f"  {road}/BLAS speed {best['blas'] / best[road]:.2f}x" for road in roads[::2]
                )
                print(line)
        if args.only_kernels:
            continue
        ids = np.random.default_rng(0).integers(0, min(model.config.vocab_size, 151643), args.prompt)[None]
        # (a MoE file: "BLAS" below is the earlier prefill, its experts on the row dots)
        logits = {}

        def prefill(road: str, model=model, ids=ids, logits=logits):
            use(road)
            cache = model.new_cache(1, args.prompt + 8, "bfloat16")
            logits[road] = model.forward(ids, cache=cache, last_only=True).logits[0, -1]

        for road in roads:
            prefill(road)  # compile, warm
        best = best_of({road: lambda road=road: prefill(road) for road in roads}, args.repeat)
        use("int8")
        linear.QUANT_PREFILL_PANELS = linear.QUANT_PANELS_MANY = moe.MOE_PREFILL_PANELS = True  # the defaults
        scale = np.abs(logits["blas"]).max()
        print(
            "  prefill:"
            + "".join(f" {road} {args.prompt / best[road]:7.1f} tok/s" for road in roads)
            + "".join(f"  {road}/BLAS {best['blas'] / best[road]:.2f}x" for road in roads[::2])
            + (f"  panels/int8 {best['int8'] / best['panels']:.2f}x" if "panels" in roads else "")
            + (f"  panels/panels1 {best['panels1'] / best['panels']:.2f}x" if "panels" in roads else "")
        )
        if "panels" in roads:  # the MoE experts' panels: float32 x and h where the tiles had 8-bit blocks
            diff = float(np.abs(logits["panels"] - logits["panels1"]).max())
            print(f"    last logits panels vs panels1: max|Δ| {diff:.2e}, /max|logit| {diff / scale:.2e}")
        for road in roads[
            ::2
        ]:  # int8: the activations' 8-bit rounding; panels: float32 sums in another order
            diff = float(np.abs(logits[road] - logits["blas"]).max())
            print(f"    last logits {road} vs BLAS: max|Δ| {diff:.2e}, /max|logit| {diff / scale:.2e}")


if __name__ == "__main__":
    main()
