"""The "numba" backend: the model's hot kernels compiled for the CPU, reading bf16 weights directly.

Decoding one token is memory-bound: every weight is read once and used for one multiply-add. So the weights stay in
the checkpoint's dtype — BF16 as its uint16 bit patterns (`BF16Weight`), F32 as the read-only memory map — and a
GEMV widens each bf16 row *in registers* (`u32 << 16` reinterpreted as float32, exact) while it streams: 2 bytes
read per weight instead of 4. The kernels, all behind the `Backend` contract of `backends/contract.py` (same
signatures as the NumPy reference in `tinyqwen/`, which the tests compare them with), one module per concept:

    linear.py     linear: M ≤ GEMV_MAX_ROWS tokens, a parallel bf16 GEMV (each weight row widened once, used
                  for all M rows); more tokens (prefill), widen a block of weight rows into a float32 scratch
                  buffer and call BLAS, the weight's rows split over the threads (each part widened and
                  multiplied by one thread, BLAS on one thread: no spin barriers). swiglu: decode's gate and up GEMVs fused with SiLU·mul (x read once, no
                  [ffn] temporaries), then down
    decode_tiles.py  a batched decode step's products (2 to GEMV_MAX_ROWS tokens: continuous batching) in register
                  tiles of 4 token rows x 3 weight rows, x 6 where the CPU has AVX-512's 32 registers
    prefill_gemm.py  prefill's bf16 products where the CPU has AVX-512: token panels, widened weight blocks and a
                  12 x 32 micro-kernel (NumPy's OpenBLAS may run only its AVX2 kernels on a CPU model it does not
                  know); q/k/v in one launch, the MLP in one (SiLU·mul into the panels down reads)
    norm_rope.py  rms_norm, one pass per row (also QK-Norm: the same kernel over head_dim); apply_rope, one pass,
                  no rotate_half temporaries
    attention.py  one query position (decode): each kv head is read once for its whole group of query heads;
                  longer queries (prefill): blocks of query rows, each block's scores over only the keys its mask
                  allows (causal: half the work) by BLAS, with a fused mask + softmax in between
    gemv_one_row.py  batch 1's bf16 GEMV and SwiGLU: weights read as uint32 pairs, x split into even and odd
                  values once per product
    phases.py     one parallel region that runs several steps in order: threads claim chunks of a phase with
                  atomic counters and meet at its end (no fork/join per step)
    decode_layer.py  a decode step's whole layer (norms, GEMVs, QK-Norm, RoPE, cache write, attention, SwiGLU) as
                  one call and one parallel region: one trip from Python per layer instead of ~11 (bf16 weights,
                  or quantized ones in the "int8" mode)
    decode_step.py  a decode step's every layer, final norm and lm_head in one parallel region: one trip
                  from Python and one fork per token (bf16 weights, or quantized ones in the "int8" mode), and a
                  server's batch of rows (each at its own length) the same way
    moe.py        moe_block: only the routed experts run; decode in one fused kernel over all (token, expert)
                  pairs, prefill groups the tokens by expert (each expert's weights read once per call)
    quant.py      GGUF's quantized weights (q8_0, q4_k, q6_k) kept in their blocks: decode's GEMVs take integer
                  dot products with x quantized to int8 blocks (llama.cpp's scheme) or widen the codes in
                  registers (avx2.py: the whole-row int8 dots in LLVM IR)
    quant_matmul.py  quantized prefill: each weight row's blocks decoded once for a tile of four int8 token rows
                  (the "float" mode instead dequantizes a block of rows into BLAS)
    quant_panels.py  quantized prefill on AVX-512: q/k/v in one launch of prefill_gemm.py's panels, the MLP
                  in one, the MoE's crowded experts' gate/up
    kernel_cache.py  Numba's saved kernels invalidated by an edit anywhere in this package (Numba alone checks only
                  the file a kernel is written in, not the files whose functions are compiled into it), and loaded
                  without starting Numba's compiler (its runtime module and registries: ~30 MiB)

`matmul_precision` (PyTorch's name for the same choice): "highest" (the default) multiplies in float32 — equal to
the reference within float32 rounding. "medium" rounds the activations entering each product with a bf16 weight to
bf16 (nearest-even) and accumulates in float32, as llama.cpp's bf16 path and PyTorch's bf16 models do: on
AVX512-BF16 CPUs prefill and batched decode then multiply bf16 pairs with `vdpbf16ps` (prefill_gemm.py's panels,
decode_tiles.py's tiles: 32 products per instruction, twice float32 FMA's; 1.4-1.5x a 256-token prefill, 1.2-1.4x
a 16-row step), and with oneDNN (`backends/onednn.py`) where it is installed, prefill on the CPU's bf16 matrix
units — at the price of ~3 significant digits in the activations (logits moved by ~1e-2 of their size on the tiny
bf16 test fixtures, 2e-2 in a 0.6B 16-row step; see the tests). One-row decode is memory-bound and gains nothing
from bf16 products, so a lone decoding row takes the one-region step's float32 products in "medium" too, as
PyTorch's "medium" permits (rounding its inputs sent it kernel by kernel: 47 against 34 ms a token).

plus `weights.py` (`BF16Weight`, the embedding lookup, `prepare`), `intrinsics.py` (bit casts, prefetch, exp, bf16
rounding in registers) and `settings.py` (what Numba reads at its import: imported first). This module assembles
the `Backend`.

`@njit(cache=True)`: the first call of a kernel compiles it (seconds) and stores the machine code next to its
module, so later processes start fast. Float32 weights (F32 checkpoints) use NumPy's BLAS for the products, in
float32 whatever the precision.

`nogil=True` on every kernel called from Python: `tinyqwen serve` runs the model in a worker thread beside the
asyncio event loop that reads requests and streams tokens, and a kernel holding the GIL would stop that loop for
the whole call. Numba already lets the GIL go around a `parallel=True` kernel's parallel loops; the serial kernels
(norms, RoPE, short decode attention, prefill's widening) kept it. Measured through HTTP (benchmarks/bench_serve.py,
16 streams, Qwen3-0.6B-shaped): the event loop used ~1 % of the server's CPU and the clients ~0.3 %, so the loop
never waited long either way; it is the rule for a kernel that other threads run beside (tests/test_numba_nogil.py).
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

# isort: off
from tinyqwen.backends.numba import settings  # noqa: F401 (first: Numba reads them when it is imported)
from tinyqwen.backends.numba import kernel_cache  # noqa: F401 (second: installs itself before any kernel exists)

# isort: on
from tinyqwen.backends.contract import Backend, LoadOptions
from tinyqwen.backends.numba import attention, decode_layer, decode_step, linear, moe, norm_rope, quant  # noqa: F401
from tinyqwen.backends.numba.intrinsics import round_bf16  # noqa: F401 (re-exported)
from tinyqwen.backends.numba.weights import BF16Weight, QuantWeight, embed, prepare  # noqa: F401 (re-exported)


def backend(matmul_precision: str = "highest", quant_gemv: str = "int8") -> Backend:
    """The numba backend; `matmul_precision` "highest" (float32 products) or "medium" (bf16 inputs, see above);
    `quant_gemv` how decode multiplies quantized weights: "int8" (x quantized to int8 blocks, integer dot products,
    as llama.cpp) or "float" (the blocks widened in registers; see quant.py)."""
    if quant_gemv not in linear.QUANT_GEMV:
        raise ValueError(f"quant_gemv must be one of {', '.join(linear.QUANT_GEMV)}, got {quant_gemv!r}")
    options = LoadOptions(keep_bf16=True, bf16_in_memory=True, matmul_precision=matmul_precision)
    flags = {"bf16_inputs": matmul_precision == "medium", "quant_gemv": quant_gemv}
    return Backend(
        name="numba",
        linear=partial(linear.linear, **flags),
        linears=partial(linear.linears, **flags),
        rms_norm=norm_rope.rms_norm,
        apply_rope=norm_rope.apply_rope,
        attention=attention.attention,
        swiglu=partial(linear.swiglu, **flags),
        moe_block=partial(moe.moe_block, **flags),
        embed=embed,
        decode_layer=partial(decode_layer.decode_layer, **flags),
        decode_step=partial(decode_step.decode_step, **flags),
        prepare=prepare,
        to_numpy=np.asarray,
        options=options,
    )


class compile_clock:  # noqa: N801 (used like a function)
    """Seconds Numba spends compiling from now on (its "numba:compile" events; nested compiles counted once).

    The benchmark's numba engine reports it: the first call's compile time, never hidden in tokens per second.
    """

    def __init__(self):
        from numba.core import event

        self.total, self._depth, self._start = 0.0, 0, 0.0
        clock = self

        class Listener(event.Listener):
            def on_start(self, ev):
                if clock._depth == 0:
                    clock._start = time.perf_counter()
                clock._depth += 1

            def on_end(self, ev):
                clock._depth -= 1
                if clock._depth == 0:
                    clock.total += time.perf_counter() - clock._start

        event.register("numba:compile", Listener())
