"""Threads that stay inside one parallel region: work split into phases of chunks, claimed through atomic counters.

A `prange` loop is a fork and a join: Numba hands its iterations to the OpenMP threads and waits for the last.
A decode layer of five such loops pays five of each (thread wake-up, the slowest thread's tail) on work that
lasts 75-500 us per GEMV. Here the layer is ONE `prange` over the threads, and each thread runs the same list of
phases (the q/k/v GEMV, then the norms and RoPE, then attention, ...). A phase is cut into chunks; a thread takes
the next chunk by an atomic add on the phase's "claimed" counter, and counts it done on its "finished" counter.
A thread starts phase p once phase p - 1 has finished all its chunks, spinning on that counter:

    phase:      0 (norm)   1 (q/k/v rows, 64 chunks)      2 (RoPE)   3 (attention, 8 groups) ...
    thread 0:   [norm]     [c0][c2][c3][c5]...[c62]        [rope]     [g0][g2][g3]...
    thread 1:   ..wait..   [c1][c4]...[c63]  ..wait..      ..wait..   [g1][g4]...

No thread ever waits for a thread by number, only for chunks that a running thread has already claimed and is
working on without waiting itself: so whatever number of threads run the loop, one (NUMBA_NUM_THREADS=1, or a
threading layer that runs two iterations on one thread) or many, every wait ends. A thread that wakes late just
finds fewer chunks left (the work balances itself), where a `prange` over fixed blocks would wait for it.

The counters are int64 in one array, each on its own cache line (two threads bumping neighbours would bounce the
line between their cores). The atomics are LLVM's (`atomicrmw add`, an acquiring load), sequentially consistent
for the add: a chunk's results, written with plain stores before its "finished" add, are visible to every thread
that has seen the count. Spinning threads run `pause` (x86) and, after a while, give their core away
(`sched_yield`, Linux): on a machine whose cores other processes share, the thread they wait for may need it.
"""

from __future__ import annotations

import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
_LINUX = sys.platform.startswith("linux")
LINE = 8  # int64 slots per counter: one 64-byte cache line each
SPINS_BEFORE_YIELD = 2000  # `pause`s (~10-40 ns each) before a waiting thread starts yielding its core


def _slot(context, builder, arrtype, arr, index):  # pointer to arr[index] (1-D int64 array)
    data = context.make_array(arrtype)(context, builder, arr).data
    return builder.gep(data, [index])


@intrinsic
def _atomic_add(typingctx, arr, index, value):
    """arr[index] += value atomically (1-D int64 array) -> the value before the add."""

    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return types.int64(arr, index, types.int64), codegen


@intrinsic
def _atomic_load(typingctx, arr, index):
    """arr[index] read atomically, acquiring: later reads see what was written before the store it reads."""

    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, index), codegen


@intrinsic
def _pause(typingctx):
    """A spin-wait hint (x86 `pause`: saves power, frees the core's sibling); nothing on other CPUs."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _yield_core(typingctx):
    """Give the core to another runnable thread (Linux `sched_yield`); nothing elsewhere."""

    def codegen(context, builder, sig, args):
        if _LINUX:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


def counters(phases: int) -> np.ndarray:  # a fresh set of claimed/finished counters, all zero
    """[2 · phases · LINE] int64: phase p's "claimed" at 2·p·LINE, its "finished" at (2·p + 1)·LINE."""
    return np.zeros(2 * phases * LINE, np.int64)


@njit(cache=True, inline="always")
def claim(ctr, p):  # the next chunk of phase p for this thread (a number ≥ the phase's chunks: none left)
    return _atomic_add(ctr, 2 * p * LINE, 1)


@njit(cache=True, inline="always")
def finish(ctr, p):  # this thread's chunk of phase p is done (its results written)
    _atomic_add(ctr, (2 * p + 1) * LINE, 1)


@njit(cache=True)
def wait_finished(ctr, p, chunks):  # spin until phase p has finished all its chunks
    spins = 0
    while _atomic_load(ctr, (2 * p + 1) * LINE) < chunks:
        if spins < SPINS_BEFORE_YIELD:
            _pause()
            spins += 1
        else:
            _yield_core()


@njit(cache=True)
def finished(ctr, p):  # chunks of phase p finished so far (tests, debugging)
    return _atomic_load(ctr, (2 * p + 1) * LINE)
