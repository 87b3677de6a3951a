"""The CPU executor of CUDA C (tests/cuda_executor) checked on small kernels: it synchronises as a GPU does and
reports as a failure what a GPU would get wrong silently or crash on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cuda_executor import DeviceArray, KernelMisuse, RawModule, asan_environment, device, kernel_signatures

from tinyqwen.backends.cupy import KERNEL_DIR, KERNELS

REPO = Path(__file__).resolve().parent.parent
ORDERS = ["forward", "reverse", "random"]

REDUCE = r"""
#include "common.cuh"
extern "C" __global__ void sums(const float* __restrict__ x, float* __restrict__ out, int n) {
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[(long long)blockIdx.x * n + i];
    v = block_sum(v);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}
extern "C" __global__ void reverse(const int* __restrict__ x, int* __restrict__ out) {
    extern __shared__ int tile[];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void racy_reverse(const int* __restrict__ x, int* __restrict__ out) {
    extern __shared__ int tile[];
    tile[threadIdx.x] = x[threadIdx.x];  // no barrier: a thread may read its partner's slot before it is written
    out[threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void lanes(int* __restrict__ out) {
    int v = threadIdx.x;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 1) + 100 * __shfl_sync(0xffffffffu, v, 0);
}
extern "C" __global__ void early_exit_barrier(int* __restrict__ out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void exited_lane(float* __restrict__ out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
extern "C" __global__ void inactive_lane(float* __restrict__ out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 16);  // lanes 0-15 read lanes 16-31: not in the mask
}
extern "C" __global__ void deadlock(float* __restrict__ out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);  // lanes 16-31 never come
    else __syncthreads();
}
extern "C" __global__ void oob(const float* __restrict__ x, float* __restrict__ out, int n) {
    out[threadIdx.x] = x[threadIdx.x + n];
}
"""


@pytest.fixture(scope="module")
def module():
    return RawModule(REDUCE, (f"-I{KERNEL_DIR}",))


def test_signatures_of_every_kernel_source():
    for source, names in KERNELS.items():
        assert sorted(kernel_signatures((KERNEL_DIR / source).read_text())) == sorted(names)


@pytest.mark.parametrize("order", ORDERS)
def test_block_reductions_and_barriers_in_every_order(order):
    m = RawModule(REDUCE, (f"-I{KERNEL_DIR}",), order=order, seed=3)
    x = np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32)
    out = np.zeros(4, np.float32)
    m.get_function("sums")((4,), (256,), (x, out, np.int32(1000)))
    np.testing.assert_allclose(out, x.sum(1), rtol=1e-5)
    xs, got = np.arange(64, dtype=np.int32), np.zeros(64, np.int32)
    m.get_function("reverse")((1,), (64,), (xs, got), shared_mem=256)
    assert got.tolist() == xs[::-1].tolist()


def test_a_missing_barrier_shows_as_order_dependence():
    results = set()
    for order in ORDERS:
        m = RawModule(REDUCE, (f"-I{KERNEL_DIR}",), order=order, seed=1)
        xs, got = np.arange(64, dtype=np.int32), np.zeros(64, np.int32)
        m.get_function("racy_reverse")((1,), (64,), (xs, got), shared_mem=256)
        results.add(tuple(got.tolist()))
    assert len(results) > 1  # forward reads unwritten (NaN-byte) slots, reverse does not


def test_shuffles_wait_for_their_warp(module):
    out = np.zeros(64, np.int32)
    module.get_function("lanes")((1,), (64,), (out,))
    lane = np.arange(64) % 32
    down = np.where(lane < 31, np.arange(64) + 1, np.arange(64))  # the last lane keeps its own value
    assert out.tolist() == (down + 100 * (np.arange(64) // 32 * 32)).tolist()


@pytest.mark.parametrize(
    "kernel, message",
    [
        (
            "early_exit_barrier",
            r"__syncthreads at line \d+ .* not reached by every thread: thread 5 has exited",
        ),
        ("exited_lane", r"waits for lane 3, which has exited"),
        ("inactive_lane", r"reads lane 16, which is not in the mask 0x0000ffff"),
        ("deadlock", r"deadlock in block \(0, 0, 0\)"),
    ],
)
def test_misuse_is_a_test_failure(module, kernel, message):
    with pytest.raises(KernelMisuse, match=message):
        module.get_function(kernel)(
            (1,), (64,), (np.zeros(64, np.int32 if kernel == "early_exit_barrier" else np.float32),)
        )


def test_launch_arguments_are_checked(module):
    f = module.get_function("sums")
    x, out = np.zeros((2, 8), np.float32), np.zeros(2, np.float32)
    with pytest.raises(KernelMisuse, match=r"argument 2 \(int n\): needs int32, got int"):
        f((2,), (32,), (x, out, 8))
    with pytest.raises(KernelMisuse, match=r"points to float, the array holds float64"):
        f((2,), (32,), (x.astype(np.float64), out, np.int32(8)))
    with pytest.raises(KernelMisuse, match="takes 3 arguments"):
        f((2,), (32,), (x, out))
    with pytest.raises(KernelMisuse, match="block"):
        f((2,), (2048,), (x, out, np.int32(8)))


def test_device_arrays_refuse_host_arrays():
    a = device.asarray(np.ones(3, np.float32))
    assert isinstance(a * 2, DeviceArray) and isinstance(device.zeros(3), DeviceArray)
    for mix in (
        lambda: a + np.ones(3),
        lambda: np.maximum(np.full(3, 1.0), a),
        lambda: np.concatenate([a, np.ones(2)]),
    ):
        with pytest.raises(TypeError, match="host numpy.ndarray mixed with device arrays"):
            mix()
    assert device.asnumpy(a + np.float32(1)).tolist() == [2.0, 2.0, 2.0]


ASAN_SCRIPT = """
import numpy as np
from cuda_executor import RawModule
m = RawModule(open({path!r}).read(), ({include!r},), asan=True)
x, out = np.zeros(32, np.float32), np.zeros(32, np.float32)
m.get_function("oob")((1,), (32,), (x, out, np.int32({n})))
print("no error")
"""


@pytest.mark.parametrize("n", [0, 1])
def test_addresssanitizer_reports_out_of_bounds_reads(tmp_path, n):
    source = tmp_path / "oob.cu"
    source.write_text(REDUCE)
    env = asan_environment()
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(ASAN_SCRIPT.format(path=str(source), include=f"-I{KERNEL_DIR}", n=n))],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    if n == 0:
        assert run.returncode == 0 and "no error" in run.stdout, run.stderr[-3000:]
    else:
        assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr, run.stderr[-3000:]


KERNELS_UNDER_ASAN = """
import numpy as np
from cuda_executor import device, executor_kernels
ops = executor_kernels(asan=True)
r = np.random.default_rng(0)
logits = r.standard_normal((4, 8)).astype(np.float32)
logits[2] = np.nan  # NaN router logits once chose expert -1: a read before the weights
weights, experts = ops.route(device.asarray(logits), 2, True)
bits = device.asarray(r.integers(0, 1 << 14, (8, 16, 32), dtype=np.uint16))
ops.expert_gemv(device.asarray(np.ones((8, 32), np.float32)), experts.reshape(-1), bits)
ops.gemv_bf16(device.asarray(r.standard_normal((11, 32), dtype=np.float32)), bits[0])
for store in (np.float32, np.uint16, np.float16):  # a strided slice of each KV cache dtype
    cache = device.asarray(r.standard_normal((2, 1, 2, 9, 40)).astype(store))
    ops.decode_attention(device.asarray(r.standard_normal((1, 4, 40), dtype=np.float32)), cache[0][:, :, :5],
                         cache[1][:, :, :5], device.asarray(np.ones((1, 5), bool)))
print("no error")
"""


@pytest.mark.slow
def test_the_backends_kernels_stay_in_bounds_under_addresssanitizer():
    env = asan_environment()
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}"
    run = subprocess.run([sys.executable, "-c", KERNELS_UNDER_ASAN], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0 and "no error" in run.stdout, run.stderr[-3000:]
