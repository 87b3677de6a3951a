"""Decode GEMVs over quantized blocks, the two ways of `backends/numba/quant.py` side by side, beside the bf16 GEMV.

"int8": x quantized to int8 blocks (Q8_0 / Q8_K), integer dot products (llama.cpp's scheme); "float": the codes
widened to float32 in registers. One token (M = 1) through Qwen3-0.6B's fused gate + up shape ([2·3072, 1024])
and its down shape ([1024, 3072]), random blocks; best of R timings, all in one run, so the ratios hold on a busy
machine even when the absolute figures do not.

    python benchmarks/bench_quant_gemv.py [--repeat 20]

--q8-rows: instead, quant.py's Q8_0 row dots (the "int8" GEMV's inner kernel) side by side on one thread over
the same shapes, interleaved in one process: AVX2's `vpmaddubsw` + `vpmaddwd`, VNNI's `vpdpbusd` on 256-bit
registers and on 512-bit ones (where the CPU has them; all give the same bits), as ratios to the first.

    python benchmarks/bench_quant_gemv.py --q8-rows [--repeat 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tinyqwen.backends import get_backend
from tinyqwen.backends.numba import BF16Weight, linear
from tinyqwen.quantization import BLOCK_BYTES, BLOCK_VALUES, QuantizedTensor

SHAPES = {"gate+up": [(3072, 1024), (3072, 1024)], "down": [(1024, 3072)]}


def random_blocks(rng, qtype: str, rows: int, cols: int) -> np.ndarray:  # sane fp16 scales, random codes
    values, nbytes = BLOCK_VALUES[qtype], BLOCK_BYTES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // values, nbytes), dtype=np.uint8)
    scale = rng.uniform(1e-3, 1e-2, size=(rows, cols // values, 2)).astype(np.float16).view(np.uint8)
    at = {"q8_0": 0, "q4_k": 0, "q6_k": 208}[qtype]
    blocks[..., at : at + 4 if qtype == "q4_k" else at + 2] = scale if qtype == "q4_k" else scale[..., :2]
    return blocks.reshape(rows, -1)


def best(fn, repeat: int) -> float:
    fn()  # compile / warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def q8_rows(repeat: int) -> None:  # the Q8_0 row kernels, ABCABC..., best of `repeat` each
    from numba import njit

    from tinyqwen.backends.numba import quant

    def rows(row):  # every row of w · x's row 0, one thread
        @njit
        def run(w, w8, a, ad, out):
            acc = np.empty(8, np.float32)
            for n in range(w.shape[0]):
                out[n] = row(w, w8, n, a, ad, 0, acc)

        return run

    kernels = {"avx2": quant._row_q8_0_avx2}
    if quant.avx2.HAS_VNNI:
        kernels["vnni256"] = quant._row_q8_0_vnni
    if quant.avx2.HAS_VNNI_512:
        kernels["vnni512"] = quant._row_q8_0_vnni512
    runs = {name: rows(row) for name, row in kernels.items()}
    rng = np.random.default_rng(0)
    print(f"{'shape':<8} {'kernel':<8} {'ms':>7} {'GB/s':>6} {'vs avx2':>8}")
    for name, (rows_, cols) in {"gate+up": (2 * 3072, 1024), "down": (1024, 3072)}.items():
        w = random_blocks(rng, "q8_0", rows_, cols)
        a, ad, *_ = quant._quantize_acts(rng.standard_normal((1, cols)).astype(np.float32), True, True)
        out = np.empty(rows_, np.float32)
        best_of = dict.fromkeys(runs, np.inf)
        for run in runs.values():
            run(w, w.view(np.int8), a, ad, out)  # compile / warm
        for _ in range(repeat):
            for kernel, run in runs.items():
                t = time.perf_counter()
                run(w, w.view(np.int8), a, ad, out)
                best_of[kernel] = min(best_of[kernel], time.perf_counter() - t)
        for kernel, t in best_of.items():
            ratio = best_of["avx2"] / t
            print(f"{name:<8} {kernel:<8} {t * 1e3:7.3f} {w.nbytes / t / 1e9:6.1f} {ratio:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--q8-rows", action="store_true", help="A/B the Q8_0 row kernels (one thread)")
    args = parser.parse_args()
    if args.q8_rows:
        return q8_rows(args.repeat)
    rng = np.random.default_rng(0)
    prepare = get_backend("numba").prepare
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    print(f"{'shape':<8} {'weights':<6} {'GEMV':<6} {'ms':>7} {'GB/s':>6} {'vs bf16':>8}")
    for name, shapes in SHAPES.items():
        xin = rng.standard_normal((1, shapes[0][1])).astype(np.float32) if name == "down" else x
        bf16 = tuple(BF16Weight(rng.integers(0, 1 << 16, size=s, dtype=np.uint16) & 0xBFFF) for s in shapes)
        t_bf16 = best(lambda xin=xin, bf16=bf16: linear.linears(xin, bf16), args.repeat)
        nbytes = sum(w.nbytes for w in bf16)
        print(
            f"{name:<8} {'bf16':<6} {'float':<6} {t_bf16 * 1e3:7.3f} {nbytes / t_bf16 / 1e9:6.1f} {1.0:8.2f}"
        )
        for qtype in ("q8_0", "q4_k", "q6_k"):
            ws = tuple(prepare(QuantizedTensor(qtype, s, random_blocks(rng, qtype, *s))) for s in shapes)
            nbytes = sum(w.nbytes for w in ws)
            for mode in linear.QUANT_GEMV:
                t = best(
                    lambda xin=xin, ws=ws, mode=mode: linear.linears(xin, ws, quant_gemv=mode), args.repeat
                )
                print(
                    f"{name:<8} {qtype:<6} {mode:<6} {t * 1e3:7.3f} {nbytes / t / 1e9:6.1f} {t_bf16 / t:8.2f}"
                )


if __name__ == "__main__":
    main()
