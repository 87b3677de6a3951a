"""The "cupy" backend: the model on an NVIDIA GPU, with hand-written CUDA kernels and cuBLAS.

Decode reads every weight once per token, so the GPU's memory bandwidth (3.35 TB/s on an H100 SXM, published spec)
sets its speed; prefill multiplies whole matrices and is compute-bound. The plan:

    weights       uploaded once, in the checkpoint's dtype: bf16 stays bf16 (its uint16 bit patterns), F32 stays F32
    linear        decode (≤ GEMV_MAX_ROWS tokens): the bf16 GEMV kernel (2 bytes read per weight); prefill: widen
                  a block of the weight to float32 on the device, then cupy.matmul (cuBLAS SGEMM: fp32 in, fp32
                  accumulation; no TF32 unless the user sets CUPY_TF32=1)
    rms_norm      one block per row (also QK-Norm over head_dim)
    apply_rope    one thread per rotated pair
    attention     decode: one block per (row, query head) over the device KV cache; prefill: batched cuBLAS
                  products and a softmax, written once against the array namespace `xp`
    swiglu        two products, the SiLU·mul kernel, one product
    moe_block     router softmax + top-k on the device; decode: gather the routed rows, one GEMV per (token,
                  expert) pair through its own expert, combine in slot order — no trip to the host; prefill: the
                  tokens grouped by expert on the host (one sync per MoE layer), each expert's GEMMs once
    sampling      every option on the device (filter.cu: penalties from device-side counts, temperature,
                  top-k / top-p by radix select, min-p, the inverse CDF with the host generator's u): per step only
                  the chosen id (8 bytes) comes back, not the [vocab] logits; `tinyqwen.generate` uses it on this
                  backend (`DeviceBackend.device_sampler`), and the ids equal host sampling's with the same seed

The CUDA C sources live in `backends/cuda/*.cu` (compiled at first use by NVRTC, through CuPy). Everything is
written against an *ops* object: `CudaKernels` launches the real kernels (on CuPy arrays, through a module loader
that is `cupy.RawModule` on a GPU); `NumpyTwins` computes the same thing, kernel by kernel, in NumPy.
`make_backend(NumpyTwins())` is this backend's whole orchestration (which kernel runs on which shapes, the KV cache on
the "device", the MoE grouping, device sampling) on a machine without a GPU. The kernels themselves are compiled for
every architecture in `ARCHITECTURES` in CI, and run there too: the tests' CPU executor of CUDA C
(tests/cuda_executor) stands in for `cupy.RawModule`, so `CudaKernels`' own launch code runs every kernel.

One room per concept:

    compile.py        NVRTC: PTX for an architecture, ptxas's register / spill / shared-memory report
    kernels.py        CudaKernels: how each kernel is launched (grid, block, shared memory, argument types)
    twins.py          NumpyTwins: each kernel again in NumPy
    select.py         filter_sample_rows in NumPy: order keys, radix select, one row's filter and draw
    orchestration.py  make_backend: the Backend these kernels make
    sampling.py       DeviceSampler and generate_on_device: sampling with one id per step to the host
"""

from __future__ import annotations

from tinyqwen.backends.contract import CHOOSE, FINISHED
from tinyqwen.backends.cupy.compile import (
    ARCHITECTURES,
    INSTALL,
    KERNEL_DIR,
    compile_options,
    compile_ptx,
    cuda_include_dirs,
    nvrtc_unavailable_reason,
    ptxas_report,
)
from tinyqwen.backends.cupy.kernels import GEMV_MAX_ROWS, KERNELS, SAMPLE_THREADS, CudaKernels
from tinyqwen.backends.cupy.orchestration import WIDEN_BLOCK_BYTES, DeviceBackend, DeviceWeight, make_backend
from tinyqwen.backends.cupy.sampling import DeviceSampler, generate_on_device, next_token
from tinyqwen.backends.cupy.select import (
    ALL_TIES,
    FILTER_THREADS,
    MASS_ONE,
    SLACK,
    filter_sample_row,
    key_value,
    order_keys,
    radix_select_kth,
    radix_select_mass,
)
from tinyqwen.backends.cupy.twins import NumpyTwins
from tinyqwen.errors import BackendError

__all__ = [
    "ALL_TIES", "ARCHITECTURES", "CHOOSE", "FILTER_THREADS", "FINISHED", "GEMV_MAX_ROWS", "INSTALL", "KERNELS",
    "KERNEL_DIR", "MASS_ONE", "SAMPLE_THREADS", "SLACK", "WIDEN_BLOCK_BYTES", "CudaKernels", "DeviceBackend",
    "DeviceSampler", "DeviceWeight", "NumpyTwins", "backend", "compile_options", "compile_ptx", "nvrtc_unavailable_reason",
    "cuda_include_dirs", "device_name", "filter_sample_row", "generate_on_device", "gpu_unavailable_reason",
    "hbm_peak_gb_s", "key_value", "make_backend", "next_token", "order_keys", "ptxas_report", "radix_select_kth",
    "radix_select_mass", "standin_backend",
]  # fmt: skip


def gpu_unavailable_reason() -> str | None:
    """None where CuPy can use a GPU here; otherwise one line saying why not and what to install."""
    try:
        import cupy
    except ImportError:
        return f"backend 'cupy' needs CuPy, which is not installed: {INSTALL}; or use --backend numpy"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or one too old for CUDA 12
        detail = str(e).split(":")[0] or type(e).__name__
        return (
            f"backend 'cupy' needs an NVIDIA GPU with a CUDA 12 driver, and CUDA finds none here ({detail}); "
            "use --backend numpy or numba"
        )
    if count == 0:
        return "backend 'cupy' needs an NVIDIA GPU, and CUDA finds none here; use --backend numpy or numba"
    if not cuda_include_dirs():
        return f"backend 'cupy' needs the CUDA runtime headers (cuda_bf16.h): {INSTALL}"
    return None


def hbm_peak_gb_s() -> float:
    """The GPU's theoretical memory bandwidth from its reported clock and bus width (GB/s): 2 transfers per clock."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    try:  # kHz and bits; CUDA 13 drops memoryClockRate from the properties
        return 2 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8 / 1e9
    except KeyError:
        return float("nan")


def device_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def backend() -> DeviceBackend:
    """The real GPU backend; a one-line BackendError where there is no usable GPU."""
    reason = gpu_unavailable_reason()
    if reason:
        raise BackendError(reason)
    return make_backend(CudaKernels())


def standin_backend() -> DeviceBackend:
    """This backend's orchestration with NumPy standing in for CuPy and the kernels' NumPy twins (no GPU needed)."""
    return make_backend(NumpyTwins(), name="cupy-standin")
