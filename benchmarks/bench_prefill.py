"""Dense bf16 prefill, two ways in one process, interleaved: the AVX-512 panels (backends/numba/prefill_gemm.py,
the default where the CPU has AVX-512) against the earlier road, each product's bf16 weight widened to float32
into NumPy's BLAS (linear.PREFILL_PANELS = False).

    python benchmarks/bench_prefill.py [--model DIR] [--prompt 256] [--decode-rows 16] [--repeat 5] [--threads N]
        [--kernels] [--only-kernels] [--medium]

--medium compares matmul_precision="medium" (on AVX512-BF16 CPUs: the panels on bf16 pairs and vdpbf16ps) against
"highest" (the float32 panels) instead, the same three measures: ratio highest / medium.

Three measures, each A B A B ..., best of --repeat, the ratio panels / BLAS (> 1: the panels faster):
  --kernels   each product of layer 0 on its own ([prompt, K] x [N, K]ᵀ; q/k/v stacked and the whole MLP as the
              model calls them), with GFLOP/s, and NumPy's sgemm on the same shapes with float32 weights (what BLAS
              does without the widening), on 1 and 2 OpenBLAS threads
  prefill     the whole prompt's forward (last_only logits, no cache), as tok/s
  step        a serving step's forward: --decode-rows one-token rows riding along a --prompt chunk
              (tinyqwen/serve/mixed_forward.py), as seconds
and how far the panels' logits are from BLAS's (max |Δ| / max |logit|: float32 rounding of the sums' order), and
whether their arg-max agrees. A busy machine moves every number: read the ratios (and say the load).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

PEER_DIR = os.environ.get("TINYQWEN_PEER_DIR")  # the peers' folder (../shared/peers/setup writes it)


def best_of(fns: dict, repeat: int) -> dict:  # {name: fn} -> {name: best seconds}, run interleaved
    # (a fn that returns a float times itself: the seconds of its part worth timing)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            own = fn()
            best[name] = min(best[name], own if isinstance(own, float) else time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default=PEER_DIR and os.path.join(PEER_DIR, "qwen3-0.6b-random"),
        help="a bf16 checkpoint (default: $TINYQWEN_PEER_DIR/qwen3-0.6b-random)",
    )
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument(
        "--decode-rows", type=int, default=16, help="one-token rows of the serving step (0: no step)"
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--only-kernels", action="store_true", help="--kernels, and no whole prefill")
    ap.add_argument("--medium", action="store_true", help='"medium" against "highest" (not panels vs BLAS)')
    args = ap.parse_args()
    if not args.model:
        ap.error("no model: pass --model or set TINYQWEN_PEER_DIR (the folder holding qwen3-0.6b-random)")
    args.kernels |= args.only_kernels

    import numba

    import tinyqwen
    from tinyqwen.backends.numba import linear, prefill_gemm
    from tinyqwen.blas_threads import blas_threads
    from tinyqwen.serve.mixed_forward import forward_groups

    if args.threads:
        numba.set_num_threads(args.threads)
    if not prefill_gemm.available():
        print("this CPU has no AVX-512: the panels are not used here, both roads are BLAS")

    def use(panels: bool):
        linear.PREFILL_PANELS = panels

    model = tinyqwen.load_model(args.model, backend="numba")
    # the two roads A and B: (name, its model); "panels"/"blas" switch linear.PREFILL_PANELS on the one model
    if args.medium:
        medium = tinyqwen.load_model(args.model, backend="numba", matmul_precision="medium")
        roads = {"medium": medium, "highest": model}
        print(f"vdpbf16ps panels: {prefill_gemm.available_bf16()}")
    else:
        roads = {"panels": model, "blas": model}
    (a_name, a_model), (b_name, b_model) = roads.items()

    def take(name: str):  # the road's model, with PREFILL_PANELS as it wants
        use(name != "blas")
        return roads[name]

    rng = np.random.default_rng(0)
    T = args.prompt
    print(
        f"{args.model}  (numba threads {numba.get_num_threads()}, prompt {T}, load {os.getloadavg()[0]:.1f})"
    )

    # each road runs run(model) (which may return its own seconds); tokens > 0: also tok/s
    def ab(label: str, run, flop: float | None = None, tokens: int = 0) -> None:
        fns = {name: lambda name=name: run(take(name)) for name in roads}
        for fn in fns.values():  # compiled and warm
            fn()
        best = best_of(fns, args.repeat)
        rate = (
            ""
            if flop is None
            else f"  {flop / best[a_name] / 1e9:5.0f} vs {flop / best[b_name] / 1e9:4.0f} GFLOP/s"
        )
        if tokens:
            rate += f"  {tokens / best[a_name]:5.0f} vs {tokens / best[b_name]:4.0f} tok/s"
        print(f"  {label:42s} {a_name} {best[a_name] * 1e3:8.1f} ms  {b_name} {best[b_name] * 1e3:8.1f} ms"
              f"  ratio {best[b_name] / best[a_name]:.2f}{rate}")  # fmt: skip

    if args.kernels:
        layer = model.weights.layers[0]
        a, m = layer.attn, layer.mlp
        H = a.q_proj.shape[1]
        x = rng.standard_normal((T, H)).astype(np.float32)
        h = rng.standard_normal((T, a.o_proj.shape[1])).astype(np.float32)
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        ab("q/k/v", lambda mo: mo.backend.linears(x, qkv), 2.0 * T * H * sum(w.shape[0] for w in qkv))
        ab("o_proj", lambda mo: mo.backend.linear(h, a.o_proj), 2.0 * T * np.prod(a.o_proj.shape))
        F = m.gate_proj.shape[0]
        ab(
            "mlp (gate/up, silu, down)",
            lambda mo: mo.backend.swiglu(x, m.gate_proj, m.up_proj, m.down_proj),
            6.0 * T * H * F,
        )
        for w in (*qkv, a.o_proj, m.gate_proj, m.down_proj):
            xs = rng.standard_normal((T, w.shape[1])).astype(np.float32)
            ab(f"[{T},{w.shape[1]}] x [{w.shape[0]},{w.shape[1]}]", lambda mo, xs=xs, w=w: mo.backend.linear(xs, w),
               2.0 * T * np.prod(w.shape))  # fmt: skip
        print("  NumPy's sgemm, float32 weights (no widening):")
        for w in (*qkv, a.o_proj, m.gate_proj, m.down_proj):
            xs = rng.standard_normal((T, w.shape[1])).astype(np.float32)
            wf = (w.bits.astype(np.uint32) << 16).view(np.float32)
            flop = 2.0 * T * np.prod(w.shape)
            line = []
            for n in (1, 2):
                with blas_threads(n):
                    s = best_of({"x": lambda xs=xs, wf=wf: xs @ wf.T}, args.repeat)["x"]
                line.append(f"{n} thread{'s' if n > 1 else ''} {flop / s / 1e9:4.0f} GFLOP/s")
            print(f"    [{T},{w.shape[1]}] x [{w.shape[0]},{w.shape[1]}]  " + ",  ".join(line))
    if args.only_kernels:
        return

    ids = rng.integers(0, model.config.vocab_size, (1, T))
    logits = {}
    for name in roads:
        logits[name] = np.asarray(take(name).forward(ids, last_only=True).logits, np.float64)
    gap = np.abs(logits[a_name] - logits[b_name]).max() / np.abs(logits[b_name]).max()
    same = (logits[a_name].argmax(-1) == logits[b_name].argmax(-1)).all()
    print(f"  logits: max |{a_name} - {b_name}| / max |logit| = {gap:.1e}, same arg-max: {bool(same)}")
    ab(f"prefill {T} tokens", lambda mo: mo.forward(ids, last_only=True), tokens=T)
    if args.decode_rows:
        D = args.decode_rows
        start = rng.integers(0, model.config.vocab_size, (D, 1))

        def step(
            mo,
        ) -> float:  # a fresh chunk beside D decode rows one position in (that first step not timed)
            dec, chunk = mo.new_cache(D, 64), mo.new_cache(1, T + 1)
            mo.forward(start, cache=dec, last_only=True)
            t = time.perf_counter()
            forward_groups(mo, [(start, dec, None), (ids, chunk, None)])
            return time.perf_counter() - t

        ab(f"step: {D} decode rows + {T}-token chunk", step)


if __name__ == "__main__":
    main()
