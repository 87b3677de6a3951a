"""The settings Numba and its OpenMP threads read once, when Numba is first imported: set before that import.

`tinyqwen.backends.numba` imports this module first, so every kernel module of the package (each imports numba)
runs after it.
"""

from __future__ import annotations

import os
import sys

# Numba's OpenMP threads spin after each parallel kernel by default. On a machine whose cores are shared (other
# processes runnable), a spinning thread holds the core its partner needs, and a 0.3 ms GEMV took 11 ms (measured
# on 2 shared cores). Sleeping at once (passive) costs a wake-up per launch instead, and a decode step launches
# ~200 kernels: Qwen3-0.6B decoded in 92 ms per token passive, 70 ms spinning forever (active). A short spin
# (GOMP_SPINCOUNT iterations, then sleep) gets both: 70 ms quiet, and no worse than passive beside a busy process
# (measured on 2 cores, Sapphire Rapids). Must be set before libgomp starts; values the user set win.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _prefer_512_bit_vectors() -> None:
    # LLVM's tuning for AVX-512 Intel CPUs prefers 256-bit vectors (older chips slowed their clock for 512-bit
    # instructions). A GEMV streaming bf16 from memory wants the opposite: with 512-bit vectors each instruction
    # window holds twice the loads in flight, and one core streamed 13.1 GB/s instead of 10.9; Qwen3-0.6B decoded
    # in 74 ms per token instead of 88 (Sapphire Rapids, 2 cores). Numba reads NUMBA_CPU_FEATURES when it is
    # first imported, so this runs before that; a value the user set wins, and an already imported Numba keeps
    # its own (then the kernels are 256-bit: correct, a little slower).
    if "NUMBA_CPU_FEATURES" in os.environ or "NUMBA_CPU_NAME" in os.environ or "numba" in sys.modules:
        return
    features = _host_features()
    if "+avx512f" in features:
        os.environ["NUMBA_CPU_FEATURES"] = ",".join(features) + ",-prefer-256-bit"


def host_cpu_name() -> str:  # the CPU model Numba compiles for: LLVM's name ("znver3", "sapphirerapids", ...)
    name = os.environ.get("NUMBA_CPU_NAME", "")
    if name and name != "host":
        return name
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return llvm.get_host_cpu_name()


def _host_features() -> list[str]:  # LLVM's names for this CPU's features: "+avx512f", "-amx-tile", ...
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return llvm.get_host_cpu_features().flatten().split(",")


_prefer_512_bit_vectors()
