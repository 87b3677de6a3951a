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


def test_keep_bf16_passed_directly_still_lands_in_the_options():
    # the cupy backend's DeviceBackend(..., keep_bf16=True) of before the options existed
    numpy = get_backend("numpy")
    fields = {f: getattr(numpy, f) for f in ("linear", "rms_norm", "apply_rope", "attention", "swiglu")}
    kernels = Backend(
        name="old",
        **fields,
        moe_block=numpy.moe_block,
        prepare=numpy.prepare,
        to_numpy=np.asarray,
        keep_bf16=True,
    )
    assert kernels.options.keep_bf16 and kernels.keep_bf16
