"""A CPU executor for the project's CUDA C: each CUDA thread a fiber, kernels launched through CudaKernels' own code.

    from cuda_executor import executor_kernels
    ops = executor_kernels()               # CudaKernels with device arrays and the CPU RawModule
    make_backend(ops)                      # the whole cupy backend, every kernel run for real on the CPU

A testing tool (it lives with the tests, and is not part of tinyqwen): cuda_cpu.h defines the CUDA built-ins the
kernels use, launcher.py compiles a source with g++ against it and launches kernels as cupy.RawModule does, and
devicearrays.py is the array namespace standing in for CuPy — arrays that refuse to mix with NumPy's. Limits: see
cuda_cpu.h (libm's exp, static shared memory persisting between blocks, no preemption: a thread spinning on a flag
another thread sets hangs instead of failing).
"""

from __future__ import annotations

from cuda_executor.devicearrays import DeviceArray, DeviceNamespace, device
from cuda_executor.launcher import KernelMisuse, RawModule, asan_environment, kernel_signatures


def executor_kernels(order: str | None = None, seed: int = 0, asan: bool = False):
    """The cupy backend's CudaKernels, with DeviceNamespace for CuPy and the CPU RawModule for cupy.RawModule."""
    from tinyqwen.backends.cupy import CudaKernels

    def module(code, options=(), backend="nvrtc"):
        return RawModule(code, options, backend, order=order, seed=seed, asan=asan)

    return CudaKernels(xp=device, module=module)


__all__ = ["DeviceArray", "DeviceNamespace", "KernelMisuse", "RawModule", "asan_environment", "device",
           "executor_kernels", "kernel_signatures"]  # fmt: skip
