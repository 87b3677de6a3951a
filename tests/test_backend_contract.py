"""The Backend contract (backends/contract.py): its defaults, and the one place load options are checked."""

from __future__ import annotations

import numpy as np
import pytest

from tinyqwen.backends import Backend, LoadOptions, get_backend
from tinyqwen.errors import BackendError


def test_defaults_are_the_reference_and_the_host():
    numpy = get_backend("numpy")
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(numpy.embed(table, np.array([[2, 0]])), [[[4.0, 5.0], [0.0, 1.0]]])
    assert numpy.greedy(np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]], np.float32)).tolist() == [1, 0]
    assert numpy.device_sampler(None, [[1]], 3) is None  # generation samples on the host
    assert numpy.options == LoadOptions()  # float32 tensors, float32 products


def test_a_backend_argmax_kernel_is_used_by_greedy():
    seen = []
    numpy = get_backend("numpy")
    fields = {f: getattr(numpy, f) for f in ("linear", "rms_norm", "apply_rope", "attention", "swiglu")}
    kernels = Backend(
        name="probe", **fields, moe_block=numpy.moe_block, prepare=numpy.prepare, to_numpy=np.asarray,
        argmax=lambda logits: seen.append(logits.shape) or logits.argmax(-1),
    )  # fmt: skip
    assert kernels.greedy(np.eye(2, 4, 1, dtype=np.float32)).tolist() == [1, 2] and seen == [(2, 4)]


def test_load_options_are_checked_in_one_place():
    with pytest.raises(BackendError, match="matmul_precision must be one of highest, medium, got 'low'"):
        LoadOptions(matmul_precision="low")
    with pytest.raises(BackendError, match="needs keep_bf16"):
        LoadOptions(bf16_in_memory=True)
    with pytest.raises(BackendError, match="the cupy backend multiplies in float32"):
        get_backend("cupy", matmul_precision="medium")  # refused before CuPy is even looked for


def test_the_cupy_backend_declares_its_kernels_through_the_contract():
    # the stand-in assembles the same DeviceBackend as the GPU: its options, embed and argmax are the contract's
    # fields (nothing reaches into `.ops` from outside), checked without CuPy
    from tinyqwen.backends.cupy import NumpyTwins, make_backend

    device = make_backend(NumpyTwins(), name="cupy-standin")
    assert device.options == LoadOptions(keep_bf16=True)
    table = device.prepare(np.arange(12, dtype=np.float32).reshape(4, 3))
    np.testing.assert_array_equal(device.embed(table, np.array([[3, 0]])), [[[9, 10, 11], [0, 1, 2]]])
    logits = np.array([[0.0, 2.0, 1.0], [5.0, -1.0, 4.0]], np.float32)
    assert device.greedy(logits).tolist() == [1, 0]
