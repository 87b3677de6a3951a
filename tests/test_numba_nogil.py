"""The numba kernels a serving step runs let other Python threads run while they compute.

`tinyqwen serve` runs the model in a worker thread and the HTTP server (an asyncio event loop) in the main one. A
compiled kernel that kept the GIL would freeze the event loop for the whole call: no request read, no token sent.
Numba releases the GIL around a `parallel=True` kernel's parallel loops on its own; a serial kernel (and a parallel
kernel's serial parts) keep it unless compiled with `nogil=True`, which the kernels called from Python are (see
backends/numba/__init__.py). Each test runs one long kernel call in a thread while this thread wakes up again and again, and
asserts that this thread kept making progress during the call: its longest pause is a fraction of the kernel's time
alone (with the GIL held, the pause is at least the whole call: the serial cases fail without `nogil=True`).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("numba")

from tinyqwen.backends.numba import attention, linear, norm_rope  # noqa: E402 (the kernels themselves)
from tinyqwen.backends.numba.weights import BF16Weight  # noqa: E402


def _longest_pause(call) -> tuple[float, float]:
    """Run `call()` in a thread; meanwhile this thread wakes up every half millisecond. -> (the call's seconds,
    this thread's longest pause while it ran)."""
    started, done = threading.Event(), threading.Event()
    span = [0.0, 0.0]

    def worker():
        started.set()
        span[0] = time.perf_counter()
        call()
        span[1] = time.perf_counter()
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    stamps = []
    while not done.is_set():  # wake up every half millisecond: each wake-up needs the GIL to go on
        time.sleep(0.0005)
        stamps.append(time.perf_counter())
    thread.join()
    edges = [span[0], *(t for t in stamps if span[0] <= t <= span[1]), span[1]]
    return span[1] - span[0], max(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))


def _cases() -> dict:
    rng = np.random.default_rng(0)
    # a 256 MiB bf16 weight (its float32 copy 512 MiB): every call takes tens to hundreds of ms. With a 64 MiB one
    # the serial widening took 7 ms on a 2-core Zen 5 with AVX-512, under the 10 ms this test needs to tell
    K, N = 2048, 65536
    bits = (rng.standard_normal((N, K), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    w, w2 = BF16Weight(bits), BF16Weight(np.ascontiguousarray(bits.reshape(K, N)))
    x16 = rng.standard_normal((16, K), dtype=np.float32)
    x256 = rng.standard_normal((256, K), dtype=np.float32)
    # the product alone on 64 rows (the most that take the register tiles): with AVX-512's 4 x 6 tiles 16 rows
    # took under 10 ms on a 2-core Zen 5, too short to tell
    x64 = rng.standard_normal((64, K), dtype=np.float32)
    scratch = np.empty((N, K), np.float32)  # 512 MiB, reused (in place) by the serial kernels' cases
    linear._widen(bits, scratch)
    B, Hq, Hkv, S, d = 16, 16, 8, 8192, 128
    q, kv = rng.standard_normal((B, Hq, d), dtype=np.float32), scratch.reshape(B, Hkv, S, d)
    mask, out = np.ones((B, S), bool), np.empty((B, Hq, d), np.float32)
    ones, rows = np.ones(K, np.float32), scratch.reshape(1, 1024, 1024, d)
    cos = rng.standard_normal((1, 1024, d), dtype=np.float32)
    return {
        # parallel kernels (Numba lets the GIL go around their parallel loops): a batched decode step's products
        # (64 and 16 token rows, register tiles) and its SwiGLU
        "linear, 64 rows": lambda: linear.linear(x64, w),
        "swiglu, 16 rows": lambda: linear.swiglu(x16, w, w, w2),
        # a prefill's product (256 token rows: prefill_gemm.py's panels where the CPU has AVX-512, else BLAS)
        "linear, 256 rows": lambda: linear.linear(x256, w),
        # serial kernels (nogil=True): a prefill's widening of a bf16 weight for BLAS, decode attention of a short
        # batch, RMSNorm and RoPE (the last two in place)
        "widen bf16 (serial)": lambda: linear._widen(bits, scratch),
        "decode attention (serial)": lambda: attention._decode_attention_serial(q, kv, kv, mask, out),
        "rms_norm (serial)": lambda: norm_rope._rms_norm(scratch, ones, np.float32(1e-6), scratch),
        "rope (serial)": lambda: norm_rope._rope(rows, cos, cos, rows),
    }


NAMES = ["linear, 64 rows", "swiglu, 16 rows", "linear, 256 rows", "widen bf16 (serial)", "decode attention (serial)",
         "rms_norm (serial)", "rope (serial)"]  # fmt: skip


@pytest.fixture(scope="module")
def cases() -> dict:
    return _cases()


@pytest.mark.parametrize("case", NAMES)
def test_kernel_lets_other_threads_run(cases, case):
    call = cases[case]
    call()  # compiled (or loaded from the cache) before the measured calls
    alone = []
    for _ in range(3):
        t = time.perf_counter()
        call()
        alone.append(time.perf_counter() - t)
    # the shortest pause of three tries: on a busy machine the OS may keep this thread waiting in any one of them
    pause = min(_longest_pause(call)[1] for _ in range(3))
    assert min(alone) > 0.01, f"{case}: the call took only {min(alone) * 1e3:.1f} ms, too short to tell"
    # with the GIL held this thread waits at least the whole call (pause >= its time alone); released, a sleeping
    # thread woken is run at once (a millisecond or two, even on a busy machine)
    assert pause < 0.5 * min(alone), (
        f"{case}: this thread stood still for {pause * 1e3:.0f} ms, the kernel alone takes "
        f"{min(alone) * 1e3:.0f} ms: the kernel holds the GIL"
    )
