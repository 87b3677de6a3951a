"""The Backend contract: every kernel a backend may supply, as one frozen dataclass (see `tinyqwen.backends`).

Shapes use B batch, T new positions, S cached + new positions, H hidden size, Hq / Hkv query / kv heads, d head_dim,
V vocabulary, E experts, N tokens. Every kernel takes and returns the backend's own arrays (device arrays for a
GPU backend), except where a line says "host".

    required
    linear(x, w)                       [..., d_in], [d_out, d_in] -> [..., d_out]
    rms_norm(x, weight, eps)           [..., d], [d] -> [..., d]
    apply_rope(x, cos, sin)            [B, H, T, d], host [B, T, d] x2 -> [B, H, T, d]
    attention(q, k, v, mask)           [B, Hq, T, d], [B, Hkv, S, d] x2, host [B, T, S] bool -> [B, Hq, T, d]
    swiglu(x, w_gate, w_up, w_down)    [..., H] -> [..., H]
    moe_block(x, w_router, w_gate, w_up, w_down, top_k, norm_topk_prob)
                                       [N, H], [E, H], [E, f, H] x2, [E, H, f] -> [N, H], router logits [N, E]
    prepare(w)                         a checkpoint tensor (host) -> the backend's weight
    to_numpy(a)                        the backend's array -> host float32

    optional (the default in brackets)
    embed(table, ids)                  [V, H], host [B, T] ids -> [B, T, H] float32   [table[ids]]
    linears(x, ws)                     [..., d_in], n x [d_out_i, d_in] -> n x [..., d_out_i], one pass
                                       [None: `linear_many` calls `linear` once per weight]
    blockwise_attention(q, k, v, mask) attention for long prompts, mask a CausalMask   [the NumPy reference's]
    zeros(shape, dtype)                where the KV cache lives                           [np.zeros: host memory]
    argmax(logits)                     [B, V] -> [B] ids (`greedy` brings them to the host)
                                       [None: `greedy` brings the logits over and takes NumPy's arg-max]
    device_sampler(params, prompts, vocab)   a sampler that chooses where the logits are, or None   [None]
    decode_layer(x, layer, cos, sin, mask, cache, i, config)
                                       one whole decoder layer of a decode step in one kernel: [B, 1, H] ->
                                       [B, 1, H], k and v written into `cache` at its length; or None where
                                       the backend's fused path does not apply   [None: kernel by kernel]
    decode_step(x, weights, cos, sin, mask, cache, config)
                                       a whole decode step (every layer, the final norm, the lm_head) in one
                                       kernel: [B, 1, H] embedded -> [B, 1, V] logits, every layer's k and v
                                       written into `cache` at its length; or None   [None: layer by layer]

    host functions the model builds each forward's inputs with (the reference's by default; the graded exercises
    put the learner's here, so that their mask and angles run inside the model)
    causal_mask(n_q, n_k)              -> host [n_q, n_k] bool: the queries are the last n_q of n_k positions
    rope_cos_sin(positions, inv_freq, attention_factor)
                                       host [B, T], [d/2], float -> host [B, T, d] x2

`options` (`LoadOptions`) says how the backend wants the checkpoint read and how it multiplies.

This module is the bottom of the backends' layer: the model, generation and every backend import it; it imports
nothing of theirs, so a backend can never pull the model (or the model a backend) into an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tinyqwen.errors import BackendError
from tinyqwen.quantization import QuantizedTensor

# what a device sampler is told per row: finished, or choose (any other value: take this forced id)
FINISHED, CHOOSE = -2, -1

# PyTorch's names: "highest" multiplies in float32; "medium" rounds the inputs of products with bf16 weights to bf16
# and accumulates in float32 (faster prefill on CPUs with bf16 units)
PRECISIONS = ("highest", "medium")


@dataclass(frozen=True)
class LoadOptions:
    """How a backend wants the checkpoint's tensors (`tinyqwen.model.load_weights`), and how it multiplies.

    `keep_bf16` False: every tensor reaches `prepare` as float32 (BF16 widened exactly). True (numba, cupy): a BF16
    tensor arrives as its uint16 bit patterns, a read-only view of the memory-mapped file, and the backend's kernels
    read bf16 directly (half the bytes per token). F32 tensors always arrive as read-only views of the file.
    `bf16_in_memory` (with keep_bf16; numba): those bf16 tensors are read into process memory instead of viewed in
    the file's mapping — one copy either way, but streamed from memory the OS backs with 2 MiB pages, the lm_head
    GEMV of Qwen3-0.6B took ~11 ms instead of ~15 (fewer address translations; Sapphire Rapids, 2 cores).
    `matmul_precision`: one of PRECISIONS, checked here — the one place.

    >>> LoadOptions(matmul_precision="low")
    Traceback (most recent call last):
    ...
    tinyqwen.errors.BackendError: matmul_precision must be one of highest, medium, got 'low'
    """

    keep_bf16: bool = False
    bf16_in_memory: bool = False
    matmul_precision: str = "highest"

    def __post_init__(self) -> None:
        if self.matmul_precision not in PRECISIONS:
            raise BackendError(
                f"matmul_precision must be one of {', '.join(PRECISIONS)}, got {self.matmul_precision!r}"
            )
        if self.bf16_in_memory and not self.keep_bf16:
            raise BackendError(
                "bf16_in_memory reads bf16 tensors as they are stored: it needs keep_bf16=True"
            )


def _reference_embed(table, ids: np.ndarray):  # [V, H], [B, T] -> [B, T, H]: the rows of `ids`, copied
    if isinstance(table, QuantizedTensor):  # a GGUF embedding in blocks: widen only the rows asked for
        return table[ids].dequantize()
    return table[ids]


def _reference_causal_mask(n_q: int, n_k: int) -> np.ndarray:  # -> [n_q, n_k] bool
    from tinyqwen.attention import causal_mask

    return causal_mask(n_q, n_k)


def _reference_rope_cos_sin(
    positions, inv_freq, attention_factor: float = 1.0
):  # [B, T], [d/2] -> [B, T, d] x2
    from tinyqwen.rope import rope_cos_sin

    return rope_cos_sin(positions, inv_freq, attention_factor)


def _reference_blockwise_attention(q, k, v, mask):
    from tinyqwen.attention import blockwise_attention

    return blockwise_attention(q, k, v, mask)


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable
    rms_norm: Callable
    apply_rope: Callable
    attention: Callable
    swiglu: Callable
    moe_block: Callable
    prepare: Callable[[np.ndarray], object]
    to_numpy: Callable[[object], np.ndarray]
    options: LoadOptions = field(default_factory=LoadOptions)
    # the embedding lookup: a backend whose weights are not plain arrays (bf16 bits, device memory) widens here
    embed: Callable = _reference_embed
    # zeros(shape, dtype) -> the backend's array: the KV cache is allocated with it (device memory for cupy)
    zeros: Callable = np.zeros
    # optional fused kernel for several products of one input (q, k and v): one pass instead of three
    linears: Callable | None = None
    # long prompts: tile-by-tile attention; a backend without its own uses the NumPy reference's
    blockwise_attention: Callable = _reference_blockwise_attention
    # argmax(logits) [B, V] -> [B] ids, the backend's array: greedy decoding on the device, so that B ids cross to
    # the host instead of B rows of V logits (`greedy` falls back to NumPy's argmax on the host)
    argmax: Callable | None = None
    # decode_layer(x, layer, cos, sin, mask, cache, i, config) -> [B, 1, H] or None: a decode step's layer i as
    # one kernel, instead of ~11 calls from Python (None, or a None result: the model runs it kernel by kernel)
    decode_layer: Callable | None = None
    # decode_step(x, weights, cos, sin, mask, cache, config) -> [B, 1, V] logits or None: a whole decode step as
    # one kernel (every layer, the final norm, the lm_head), one trip from Python per token
    decode_step: Callable | None = None
    # host functions for each forward's inputs: the causal mask and the rotary angles (see the docstring)
    causal_mask: Callable = _reference_causal_mask
    rope_cos_sin: Callable = _reference_rope_cos_sin

    def linear_many(self, x, ws: tuple) -> tuple:  # [..., d_in], n x [d_out_i, d_in] -> n x [..., d_out_i]
        """`tuple(self.linear(x, w) for w in ws)`, through the backend's fused `linears` kernel when it has one."""
        if self.linears is not None:
            return self.linears(x, ws)
        return tuple(self.linear(x, w) for w in ws)

    def greedy(self, logits) -> np.ndarray:  # [B, V] the backend's array -> [B] host ids
        """The arg-max of each row, on the host: through the backend's `argmax` kernel when it has one."""
        if self.argmax is not None:
            return self.to_numpy(self.argmax(logits))
        return self.to_numpy(logits).argmax(-1)

    def device_sampler(self, params, prompts: list[list[int]], vocab: int):
        """A sampler that chooses the next ids where the logits are (`choose(logits, u, forced)` -> [B] host ids),
        or None: generation then brings the logits to the host and samples there (numpy, numba).

        A method, not a field: a backend subclass (cupy's `DeviceBackend`) overrides it."""
        return None
