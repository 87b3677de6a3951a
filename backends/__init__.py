"""Backends: the few hot kernels of the model, swappable without touching the model code.

The model (`tinyqwen/model.py`) never calls NumPy for heavy math directly; it calls the kernels of a `Backend`
(`backends/contract.py` lists every one with its shapes): the embedding lookup, linear (and `linear_many`, several
products of one input in one pass), rms_norm, apply_rope, attention (and blockwise_attention for long prompts),
swiglu, moe_block; plus `prepare(w)` (a checkpoint tensor -> the backend's own weight, e.g. on the GPU), `to_numpy`,
`zeros(shape, dtype)` (where the KV cache lives: host memory for numpy/numba, device memory for cupy), and what
generation asks of it: `greedy(logits)` and `device_sampler(...)` (a sampler that runs where the logits are).

`backend.options` (a `LoadOptions`) says how the checkpoint is read for it — float32, or bf16 kept as uint16 bit
patterns (`keep_bf16`, `bf16_in_memory`) — and its `matmul_precision`.

The "numpy" backend *is* the readable reference in `tinyqwen/` — it points at those functions, no copy. The Numba
(CPU) and CuPy (GPU) backends of later chapters replace individual kernels and are checked against it. A backend
whose arrays live on a device (cupy) receives host NumPy arrays only where the model builds them per forward (the
ids, cos/sin, the mask) and returns device arrays everywhere else; `to_numpy` brings the logits back.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

from tinyqwen.backends.contract import (  # noqa: F401 (the contract, re-exported)
    CHOOSE,
    FINISHED,
    PRECISIONS,
    Backend,
    LoadOptions,
)
from tinyqwen.errors import BackendError


def _numpy_backend(matmul_precision: str = "highest") -> Backend:
    from tinyqwen import attention, mlp, moe, norm, rope

    return Backend(
        name="numpy",
        linear=mlp.linear,
        rms_norm=norm.rms_norm,
        apply_rope=rope.apply_rope,
        attention=attention.attention,
        blockwise_attention=attention.blockwise_attention,
        swiglu=mlp.swiglu,
        moe_block=moe.moe_block,
        prepare=lambda w: w,
        to_numpy=np.asarray,
        zeros=np.zeros,
    )


def _installed(module: str) -> bool:  # without importing it (None in sys.modules: an import that must fail)
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _numba_backend(matmul_precision: str = "highest") -> Backend:
    # checked, not imported: the backend module must be the one to import Numba, after setting the thread and
    # CPU options Numba reads at its import
    if not _installed("numba"):
        raise BackendError(
            "backend 'numba' needs the numba package, which is not installed: pip install 'tinyqwen[fast]' "
            "(or pip install numba), or use --backend numpy"
        )
    from tinyqwen.backends.numba import backend

    return backend(matmul_precision)


def _cupy_backend(matmul_precision: str = "highest") -> Backend:
    from tinyqwen.backends import cupy  # imports CuPy only when asked; says in one line what is missing

    return cupy.backend()


AVAILABLE = {"numpy": _numpy_backend, "numba": _numba_backend, "cupy": _cupy_backend}
# the matmul precisions each backend has kernels for, and why the others are refused
FLOAT32_ONLY = {
    "numpy": "the numpy backend is the float32 reference",
    "cupy": "the cupy backend multiplies in float32",
}


def check_matmul_precision(name: str, matmul_precision: str) -> None:
    """A BackendError unless backend `name` has kernels for `matmul_precision` (the one place this is checked).

    >>> check_matmul_precision("numpy", "medium")
    Traceback (most recent call last):
    ...
    tinyqwen.errors.BackendError: matmul_precision='medium' needs the numba backend; the numpy backend is the \
float32 reference (matmul_precision='highest')
    """
    LoadOptions(matmul_precision=matmul_precision)  # a known precision at all
    if matmul_precision != "highest" and name in FLOAT32_ONLY:
        raise BackendError(
            f"matmul_precision={matmul_precision!r} needs the numba backend; {FLOAT32_ONLY[name]} "
            "(matmul_precision='highest')"
        )


def get_backend(name: str, matmul_precision: str = "highest") -> Backend:
    """The backend called `name`; a clear BackendError for a name that does not exist or cannot run here.

    `matmul_precision` (PyTorch's name): "highest" multiplies in float32; "medium" (numba only) rounds the inputs
    of products with bf16 weights to bf16 and accumulates in float32 — faster prefill on CPUs with bf16 units.
    """
    if name not in AVAILABLE:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(AVAILABLE)})")
    check_matmul_precision(name, matmul_precision)
    return AVAILABLE[name](matmul_precision)
