"""Backends: the few hot kernels of the model, swappable without touching the model code.

The model (`tinyqwen/model.py`) never calls NumPy for heavy math directly; it calls the kernels of a `Backend`:

    linear(x, w)                          # [..., d_in], [d_out, d_in] -> [..., d_out]
    rms_norm(x, weight, eps)              # [..., d], [d] -> [..., d]
    apply_rope(x, cos, sin)               # [B, H, T, d], [B, T, d], [B, T, d] -> [B, H, T, d]
    attention(q, k, v, mask)              # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] -> [B, Hq, T, d]
    blockwise_attention(q, k, v, mask)    # the same for long prompts, mask a CausalMask (default: the reference's)
    swiglu(x, w_gate, w_up, w_down)       # [..., d] -> [..., d]
    moe_block(x, w_router, w_gate, w_up, w_down, top_k, norm_topk_prob)  # [N, d] -> [N, d], [N, E]

plus `prepare(w)` (turn a checkpoint tensor into the backend's own array type, e.g. on the GPU) and `to_numpy`, and
optionally `linears(x, ws)`, several products of one input in one pass (the model's q, k, v projections; the
model calls `linear_many`, which falls back to one `linear` per weight), and `zeros(shape, dtype)` (where the KV
cache lives: host memory for numpy/numba, device memory for cupy).

`keep_bf16` says which checkpoint tensors `prepare` receives. False (the numpy backend): every tensor arrives as
float32, BF16 widened exactly. True (the numba backend): a BF16 tensor arrives as its uint16 bit patterns, a
read-only view of the memory-mapped file, and the backend's kernels read bf16 directly (half the bytes per token).
F32 tensors always arrive as read-only views of the file. `bf16_in_memory` (numba): those bf16 tensors are read into
process memory instead of viewed in the file's mapping — one copy either way, but streamed from memory the OS backs
with 2 MiB pages, the lm_head GEMV of Qwen3-0.6B took ~11 ms instead of ~15 (fewer address translations;
Sapphire Rapids, 2 cores). A backend that copies the weights elsewhere anyway (cupy: to the GPU) keeps the view.

The "numpy" backend *is* the readable reference in `tinyqwen/` — it points at those functions, no copy. The Numba
(CPU) and CuPy (GPU) backends of later chapters replace individual kernels and are checked against it. A backend
whose arrays live on a device (cupy) receives host NumPy arrays only where the model builds them per forward (the
ids, cos/sin, the mask) and returns device arrays everywhere else; `to_numpy` brings the logits back.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

from tinyqwen.backends.contract import CHOOSE, FINISHED, Backend  # noqa: F401 (the contract, re-exported)
from tinyqwen.errors import BackendError


def _numpy_backend(matmul_precision: str = "highest") -> Backend:
    if matmul_precision != "highest":
        raise BackendError(
            f"matmul_precision={matmul_precision!r} needs the numba backend; the numpy backend is the float32 "
            "reference (matmul_precision='highest')"
        )
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
    from tinyqwen.backends import numba_backend

    return numba_backend.backend(matmul_precision)


def _cupy_backend(matmul_precision: str = "highest") -> Backend:
    if matmul_precision != "highest":
        raise BackendError(
            f"matmul_precision={matmul_precision!r} needs the numba backend; the cupy backend multiplies in float32 "
            "(matmul_precision='highest')"
        )
    from tinyqwen.backends import cupy  # imports CuPy only when asked; says in one line what is missing

    return cupy.backend()


AVAILABLE = {"numpy": _numpy_backend, "numba": _numba_backend, "cupy": _cupy_backend}
PLANNED: tuple[str, ...] = ()  # later chapters


def get_backend(name: str, matmul_precision: str = "highest") -> Backend:
    """The backend called `name`; a clear BackendError for a name that does not exist (yet) or cannot run here.

    `matmul_precision` (PyTorch's name): "highest" multiplies in float32; "medium" (numba only) rounds the inputs
    of products with bf16 weights to bf16 and accumulates in float32 — faster prefill on CPUs with bf16 units.
    """
    if name in AVAILABLE:
        return AVAILABLE[name](matmul_precision)
    if name in PLANNED:
        raise BackendError(
            f"backend {name!r} is not implemented yet (available: {', '.join(AVAILABLE)}); use --backend numpy"
        )
    raise BackendError(f"unknown backend {name!r} (available: {', '.join(AVAILABLE)})")
