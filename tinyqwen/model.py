"""The whole Qwen3 network, and loading an official Hugging Face checkpoint into it.

    ids ─ embed ─┬─ for each layer: ───────────────────────────────────────────┬─ RMSNorm ─ lm_head ─ logits
                 │  x = x + o_proj(attention(RoPE(QKNorm(q)), RoPE(QKNorm(k)), v))   (pre-norm: RMSNorm first)
                 │  x = x + mlp(RMSNorm(x))       mlp = SwiGLU, or a mixture of SwiGLU experts (Qwen3-MoE)
                 └──────────────────────────────────────────────────────────────┘

The model is plain data (the weights, in small dataclasses named like the checkpoint's tensors) plus one
`forward` function. Every heavy operation goes through `self.backend` (see `backends/`), so a Numba or CuPy
backend can replace the kernels without this file changing; with the default "numpy" backend they are the
reference functions of the earlier chapters.

Checkpoint tensor names (the official Hub layout, e.g. Qwen/Qwen3-0.6B and Qwen/Qwen3-30B-A3B):

    model.embed_tokens.weight                                  [vocab, hidden]
    model.layers.{i}.input_layernorm.weight                    [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight           q: [heads·head_dim, hidden], k/v: [kv_heads·head_dim,
                                                               hidden], o: [hidden, heads·head_dim]
    model.layers.{i}.self_attn.{q,k}_norm.weight               [head_dim]
    model.layers.{i}.post_attention_layernorm.weight           [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight            dense layers
    model.layers.{i}.mlp.gate.weight                           MoE router [experts, hidden]
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight  MoE experts
    model.norm.weight                                          [hidden]
    lm_head.weight                                             [vocab, hidden] — absent when tie_word_embeddings
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyqwen.attention import BLOCKWISE_MIN_SCORES, CausalMask, causal_mask, positions_from_mask
from tinyqwen.backends import Backend, get_backend
from tinyqwen.bf16 import bf16_to_float32
from tinyqwen.config import (
    Qwen3Config,
    count_parameters,  # noqa: F401 (tinyqwen.model.count_parameters is chapter 6's name)
    expected_tensors,
    load_config,
    load_generation_config,
)
from tinyqwen.errors import CheckpointError, GenerationError
from tinyqwen.heap import release_freed_memory
from tinyqwen.kv_cache import KVCache, RaggedKVCache
from tinyqwen.quantization import QuantizedTensor
from tinyqwen.rope import rope_parameters

# --------------------------------------------------------------------------------------------- weights


@dataclass
class AttentionWeights:
    q_proj: np.ndarray  # [Hq·d, hidden]
    k_proj: np.ndarray  # [Hkv·d, hidden]
    v_proj: np.ndarray  # [Hkv·d, hidden]
    o_proj: np.ndarray  # [hidden, Hq·d]
    q_norm: np.ndarray  # [d]
    k_norm: np.ndarray  # [d]


@dataclass
class MLPWeights:
    gate_proj: np.ndarray  # [ffn, hidden]
    up_proj: np.ndarray  # [ffn, hidden]
    down_proj: np.ndarray  # [hidden, ffn]


@dataclass
class MoEWeights:
    router: np.ndarray  # [E, hidden]        ("mlp.gate.weight" in the checkpoint)
    gate_proj: np.ndarray  # [E, ffn, hidden] (one checkpoint tensor per expert, stacked here)
    up_proj: np.ndarray  # [E, ffn, hidden]
    down_proj: np.ndarray  # [E, hidden, ffn]


@dataclass
class LayerWeights:
    input_norm: np.ndarray  # [hidden]
    attn: AttentionWeights
    post_attention_norm: np.ndarray  # [hidden]
    mlp: MLPWeights | MoEWeights


@dataclass
class Weights:
    embed: np.ndarray  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray  # [hidden]
    lm_head: np.ndarray  # [vocab, hidden]; the same array as `embed` when tied


def load_weights(
    checkpoint,
    config: Qwen3Config,
    prepare=lambda w: w,
    progress: bool | None = None,
    keep_bf16: bool = False,
    in_memory: bool = False,
) -> Weights:
    """Read and shape-check every tensor of `expected_tensors(config)` from an open `Checkpoint`.

    Tensors arrive as float32 (BF16 and F16 are widened exactly); `prepare` hands each to the backend. With
    `keep_bf16` (a backend whose kernels read bf16, e.g. "numba"), BF16 tensors arrive instead as their uint16 bit
    patterns, read-only views of the memory-mapped file: nothing is widened or copied, so loading a bf16
    checkpoint needs no more memory than its bf16 weights (MoE experts are stacked: one bf16 copy of them).
    `in_memory` reads those bf16 tensors into process memory instead of viewing the file (`Checkpoint.read`;
    experts straight into their slot of the stacked array): still one copy, and faster to stream for a backend
    that reads every weight per token.
    """
    where = getattr(checkpoint, "path", "checkpoint")
    expected = expected_tensors(config)
    present = set(checkpoint.keys())
    missing = [k for k in expected if k not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing from the checkpoint{more}")
    unexpected = sorted(
        present - set(expected) - {"lm_head.weight"}
    )  # tied checkpoints may still carry a copy
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{where}: unexpected tensor {unexpected[0]!r}{more} — not part of a "
            f"{config.model_type} model with this config.json"
        )

    def check_shape(name: str) -> None:
        shape = tuple(checkpoint.shape(name))
        if shape != expected[name]:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(shape)}, expected {list(expected[name])} "
                f"from config.json"
            )

    def get(name: str) -> np.ndarray:
        check_shape(name)
        if keep_bf16 and checkpoint.dtype(name) == "BF16":
            # uint16 bit patterns: the backend's `prepare` knows what they mean
            return checkpoint.read(name) if in_memory else checkpoint.raw(name)
        value = checkpoint.get(name)
        if isinstance(value, QuantizedTensor):  # a GGUF block type: stays in its blocks for the backend
            return value
        if value.dtype.kind != "f":
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {value.dtype}, expected a float")
        # F32 tensors stay read-only views of the memory-mapped file (no copy, pages load on first use);
        # BF16/F16 arrive already widened to fresh float32 arrays
        return np.asarray(value, dtype=np.float32)

    def stack(names: list[str]) -> np.ndarray:
        # experts of one layer in one array; bf16 bit patterns are only stacked with their own kind
        whole = getattr(checkpoint, "stacked", lambda names: None)(names)  # a GGUF file stores them stacked
        if whole is not None and (isinstance(whole, QuantizedTensor) or not keep_bf16):
            for n in names:
                check_shape(n)
            return whole
        if in_memory and keep_bf16 and all(checkpoint.dtype(n) == "BF16" for n in names):
            # each expert read straight into its slot: one copy, never the file's pages beside it
            out = np.empty((len(names), *expected[names[0]]), np.uint16)
            for e, n in enumerate(names):
                check_shape(n)
                checkpoint.read(n, out[e])
            return out
        parts = [get(n) for n in names]
        if len({a.dtype for a in parts}) > 1:
            parts = [bf16_to_float32(a) if a.dtype == np.uint16 else np.asarray(a, np.float32) for a in parts]
        return np.stack(parts)

    layers_iter = range(config.num_hidden_layers)
    if progress is None:
        progress = len(getattr(checkpoint, "files", ())) > 1
    if progress:
        from tqdm import tqdm

        layers_iter = tqdm(layers_iter, desc="loading layers", unit="layer")

    embed = prepare(get("model.embed_tokens.weight"))
    layers = []
    for i in layers_iter:
        p = f"model.layers.{i}."
        attn = AttentionWeights(
            *(prepare(get(p + f"self_attn.{n}.weight")) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
            q_norm=prepare(get(p + "self_attn.q_norm.weight")),
            k_norm=prepare(get(p + "self_attn.k_norm.weight")),
        )
        if config.is_moe_layer(i):
            experts = range(config.num_experts)
            mlp = MoEWeights(
                router=prepare(get(p + "mlp.gate.weight")),
                **{
                    n: prepare(stack([p + f"mlp.experts.{e}.{n}.weight" for e in experts]))
                    for n in ("gate_proj", "up_proj", "down_proj")
                },
            )
        else:
            mlp = MLPWeights(
                *(prepare(get(p + f"mlp.{n}.weight")) for n in ("gate_proj", "up_proj", "down_proj"))
            )
        layers.append(
            LayerWeights(
                input_norm=prepare(get(p + "input_layernorm.weight")),
                attn=attn,
                post_attention_norm=prepare(get(p + "post_attention_layernorm.weight")),
                mlp=mlp,
            )
        )
    norm = prepare(get("model.norm.weight"))
    # tied: the output projection *is* the embedding matrix (saves vocab·hidden parameters: 155M for 0.6B)
    lm_head = embed if config.tie_word_embeddings else prepare(get("lm_head.weight"))
    return Weights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


# --------------------------------------------------------------------------------------------- forward


@dataclass
class ForwardOutput:
    logits: np.ndarray  # [B, T, vocab] float32 ([B, 1, vocab] with last_only)
    router_logits: list[np.ndarray] = field(default_factory=list)  # per MoE layer [B·T, E]
    hidden_states: list[np.ndarray] = field(
        default_factory=list
    )  # embeddings, then each layer's output [B, T, H]


@dataclass
class Qwen3:
    config: Qwen3Config
    weights: Weights
    backend: Backend
    generation_config: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.inv_freq, self.attention_factor = rope_parameters(self.config)

    def __call__(self, ids, return_router_logits: bool = False):
        """Logits for a sequence `[T]` → `[T, vocab]`, or a batch `[B, T]` → `[B, T, vocab]` (float32).

        With `return_router_logits=True`: `(logits, router_logits)`, one `[tokens, num_experts]` array per MoE
        layer in layer order (an empty list for dense models).
        """
        ids = as_id_array(ids)
        single = ids.ndim == 1
        out = self.forward(ids[None] if single else ids, return_router_logits=return_router_logits)
        logits = out.logits[0] if single else out.logits
        return (logits, out.router_logits) if return_router_logits else logits

    def new_cache(self, batch_size: int, max_len: int, dtype: str = "float32") -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` positions, stored as `dtype`
        ("float32", "bfloat16" or "float16"; see tinyqwen/kv_cache.py)."""
        c = self.config
        return KVCache.allocate(
            c.num_hidden_layers,
            batch_size,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            dtype,
            zeros=self.backend.zeros,
        )

    def forward(
        self,
        ids: np.ndarray,  # [B, T] token ids
        *,
        cache: KVCache | None = None,
        attention_mask: np.ndarray | None = None,  # [B, past + T]: 1 real token, 0 padding
        positions: np.ndarray | None = None,  # [B, T]
        last_only: bool = False,
        logits_at: np.ndarray | None = None,  # [B] ints: only row b's logits at column logits_at[b]
        return_router_logits: bool = False,
        return_hidden_states: bool = False,
        on_device: bool = False,  # logits stay the backend's array (cupy: sample on the GPU, see chapter 11)
    ) -> ForwardOutput:
        """Logits for a batch of ids: embed -> every layer -> the final RMSNorm -> lm_head (the diagram above).

        With a `cache`, `ids` are the positions after the cached ones, and the cache grows by T. With a
        `RaggedKVCache` every row is its own sequence at its own length (a server's batch of unrelated requests):
        row b's new ids take positions lengths[b], lengths[b] + 1, ... and see only that row's keys, so each row's
        logits are what the row alone would get (up to float32 rounding of the batched products). `last_only` keeps
        the last column's logits, `logits_at` column logits_at[b] of row b (a server's prompts of different lengths
        prefilled together, the shorter ones padded at the end: each row's logits after its own last prompt id);
        either way [B, 1, vocab], the lm_head run on those B positions only."""
        c, w, k = self.config, self.weights, self.backend
        ids, mask, positions = self._inputs(ids, cache, attention_mask, positions)
        B, T = ids.shape
        cos, sin = k.rope_cos_sin(positions, self.inv_freq, self.attention_factor)  # [B, T, d] x2

        x = k.embed(w.embed, ids)  # [B, T, H]
        # a backend may run a whole decode step as one kernel (numba): every layer, the final norm, the lm_head
        if k.decode_step is not None and not (
            return_hidden_states or return_router_logits or logits_at is not None
        ):
            logits = k.decode_step(x, w, cos, sin, mask, cache, c)  # [B, 1, vocab], or None: not here
            if logits is not None:
                cache.advance(T)
                return ForwardOutput(logits=logits if on_device else k.to_numpy(logits))
        hidden = [x] if return_hidden_states else []
        router_logits: list[np.ndarray] = []
        for i, layer in enumerate(w.layers):
            # a backend may run a decode step's whole layer as one kernel (numba); None: here it does not
            fused = None if k.decode_layer is None else k.decode_layer(x, layer, cos, sin, mask, cache, i, c)
            if fused is not None:
                x = fused
            else:
                x = x + self._attention(layer, x, cos, sin, mask, cache, i)
                h = k.rms_norm(x, layer.post_attention_norm, c.rms_norm_eps)
                if isinstance(layer.mlp, MoEWeights):
                    m = layer.mlp
                    y, logits_i = k.moe_block(
                        h.reshape(B * T, -1), m.router, m.gate_proj, m.up_proj, m.down_proj,
                        c.num_experts_per_tok, c.norm_topk_prob,
                    )  # fmt: skip
                    x = x + y.reshape(B, T, -1)
                    router_logits.append(logits_i)
                else:
                    x = x + k.swiglu(h, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            if return_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.advance(T)

        if logits_at is not None:
            x = x[np.arange(B), np.asarray(logits_at)][:, None]  # [B, 1, H]
        elif last_only:
            x = x[:, -1:]
        logits = k.linear(k.rms_norm(x, w.norm, c.rms_norm_eps), w.lm_head)
        if T > 1:  # a prefill's per-layer temporaries, freed but kept by the C allocator: back to the system
            release_freed_memory()
        return ForwardOutput(
            logits=logits if on_device else k.to_numpy(logits),
            router_logits=[k.to_numpy(r) for r in router_logits] if return_router_logits else [],
            hidden_states=[k.to_numpy(h) for h in hidden],
        )

    def _attention(self, layer: LayerWeights, x, cos, sin, mask, cache: KVCache | None, i: int):
        # [B, T, H] -> [B, T, H]
        c, a, k = self.config, layer.attn, self.backend
        B, T, _ = x.shape
        h = k.rms_norm(x, layer.input_norm, c.rms_norm_eps)
        # the three projections of the same h: one fused pass where the backend has one (linear_many)
        q, kk, v = (p.reshape(B, T, -1, c.head_dim) for p in k.linear_many(h, (a.q_proj, a.k_proj, a.v_proj)))
        # QK-Norm: RMSNorm over head_dim only, per head, before the rotation
        if c.qk_norm:  # always, except in an ablation trained without it (chapter 14)
            q = k.rms_norm(q, a.q_norm, c.rms_norm_eps)
            kk = k.rms_norm(kk, a.k_norm, c.rms_norm_eps)
        q = k.apply_rope(q.transpose(0, 2, 1, 3), cos, sin)  # [B, Hq, T, d]
        kk = k.apply_rope(kk.transpose(0, 2, 1, 3), cos, sin)  # [B, Hkv, T, d]
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            kk, v = cache.update(i, kk, v)  # now every position so far: [B, Hkv, past + T, d]
        if isinstance(mask, CausalMask):
            out = k.blockwise_attention(q, kk, v, mask)  # [B, Hq, T, d], memory: one tile of scores
        else:
            out = k.attention(q, kk, v, mask)  # [B, Hq, T, d]
        return k.linear(out.transpose(0, 2, 1, 3).reshape(B, T, -1), a.o_proj)

    def _check_ids(self, ids) -> np.ndarray:
        ids = as_id_array(ids)
        if ids.ndim != 2:
            raise GenerationError(f"token ids must have shape [T] or [batch, T], got shape {list(ids.shape)}")
        if ids.size and ids.dtype.kind not in "iu":
            raise GenerationError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.shape[1] == 0:
            raise GenerationError("token ids are empty: nothing to run the model on")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise GenerationError(
                f"token id {int(ids[bad][0])} is outside the model's vocabulary [0, {self.config.vocab_size})"
            )
        return ids.astype(np.int64, copy=False)

    def _inputs(self, ids, cache: KVCache | None, attention_mask, positions):
        """forward's inputs checked, and what the layers need made from them: ids [B, T] int64, the attention mask
        ([B, T, past + T] bool, or a CausalMask for long inputs) and the positions [B, T]."""
        ids = self._check_ids(ids)
        B, T = ids.shape
        if isinstance(cache, RaggedKVCache):
            return ids, *self._ragged_inputs(cache, attention_mask, positions, B, T)
        past = 0
        if cache is not None:
            if cache.batch_size != B:
                raise GenerationError(
                    f"KV cache was allocated for batch {cache.batch_size}, ids have batch {B}"
                )
            past = cache.length
            if past + T > cache.max_len:
                raise GenerationError(
                    f"KV cache is full: {past} + {T} positions needed, {cache.max_len} allocated"
                )
        key_mask = self._key_mask(attention_mask, B, past + T)
        mask = attention_mask_for(key_mask, past, T, self.backend.causal_mask)
        return ids, mask, self._positions(positions, key_mask, past, T)

    def _ragged_inputs(self, cache: RaggedKVCache, attention_mask, positions, B: int, T: int):
        """The mask [B, T, max(lengths) + T] and positions [B, T] of a batch whose rows have their own lengths."""
        if cache.batch_size != B:
            raise GenerationError(f"the ragged KV cache has {cache.batch_size} rows, ids have batch {B}")
        if attention_mask is not None:
            raise GenerationError("a RaggedKVCache masks each row by its own length: pass no attention_mask")
        if cache.length + T > cache.max_len:
            raise GenerationError(
                f"KV cache is full: {cache.length} + {T} positions needed, {cache.max_len} allocated"
            )
        if positions is None:
            positions = cache.lengths[:, None] + np.arange(T)  # [B, T]: each row continues where it stopped
        key_mask = np.ones((B, 1), dtype=bool)  # only for _positions' shape checks
        return cache.key_mask(T), self._positions(positions, key_mask, 0, T)

    @staticmethod
    def _key_mask(
        attention_mask, B: int, total: int
    ) -> np.ndarray:  # -> [B, total] bool: which keys are real
        if attention_mask is None:
            return np.ones((B, total), dtype=bool)
        key_mask = np.asarray(attention_mask).astype(bool)
        if key_mask.shape != (B, total):
            raise GenerationError(
                f"attention_mask must have shape [batch, past + new] = {[B, total]}, got {list(key_mask.shape)}"
            )
        return key_mask

    def _positions(self, positions, key_mask: np.ndarray, past: int, T: int) -> np.ndarray:  # -> [B, T] ints
        B = key_mask.shape[0]
        if positions is None:
            # left padding: a row's first real token is position 0, whatever its column
            positions = positions_from_mask(key_mask)[:, past:]
        positions = np.asarray(positions)
        if positions.shape not in ((T,), (B, T)) or positions.dtype.kind not in "iu":
            raise GenerationError(
                f"positions must be integers of shape [T] or [batch, T] = {[B, T]}, got {positions.dtype} "
                f"{list(positions.shape)}"
            )
        positions = np.broadcast_to(positions, (B, T))
        if positions.size and positions.max() >= self.config.max_position_embeddings:
            raise GenerationError(
                f"position {int(positions.max())} is beyond the model's context of "
                f"{self.config.max_position_embeddings} tokens (max_position_embeddings)"
            )
        return positions


def attention_mask_for(key_mask: np.ndarray, past: int, T: int, causal=causal_mask):
    # [B, past + T] bool -> what attention takes
    """Which keys each new position may see: causal (nothing after itself) and real (not padding).

    `causal(n_q, n_k)` makes the causal part (the backend's `causal_mask`: the reference's, or a learner's).

    [B, T, past + T] bool; for long inputs (T · (past + T) scores or more, see BLOCKWISE_MIN_SCORES) a CausalMask
    instead, which blockwise attention expands one tile at a time (never [T, past + T] at once).

    >>> attention_mask_for(np.array([[False, True, True]]), past=1, T=2).astype(int).tolist()
    [[[0, 1, 0], [0, 1, 1]]]
    """
    total = past + T
    if T * total >= BLOCKWISE_MIN_SCORES:  # long: attention tile by tile, the mask too (never [T, total])
        return CausalMask(key_mask, past)
    return np.asarray(causal(T, total), dtype=bool)[None] & key_mask[:, None, :]  # [B, T, total]


def as_id_array(ids) -> np.ndarray:
    """`np.asarray(ids)`, with a clear error for nested lists of unequal lengths (NumPy cannot make them an array).

    A batch must be rectangular: pad the shorter rows and pass an attention_mask, or let `generate_batch` do it.
    """
    try:
        return np.asarray(ids)
    except ValueError:
        lengths = sorted({len(row) if hasattr(row, "__len__") else 1 for row in ids})  # a bare id: length 1
        rows = f" (rows of lengths {lengths})" if len(lengths) > 1 else ""
        raise GenerationError(
            f"token ids must be a rectangle, [T] or [batch, T], not nested lists of different lengths{rows}: "
            "pad the rows to one length (with an attention_mask), or use tinyqwen.generate_batch"
        ) from None


def load_model(
    path: str | Path, backend: str = "numpy", progress: bool | None = None, matmul_precision: str = "highest"
) -> Qwen3:
    """Load a checkpoint directory in the Hugging Face layout (config.json + *.safetensors [+ index]), or a
    llama.cpp `.gguf` file (config and tokenizer from its metadata; Q8_0/Q4_K/Q6_K weights stay in their blocks as
    `QuantizedTensor`s, which the backend multiplies with: the numpy reference widens one matrix at a time).

    `path` may start with `~`, or be a Hugging Face id such as "Qwen/Qwen3-0.6B": then it is looked up in the
    Hugging Face cache (or downloaded, with the optional huggingface_hub) exactly as `tinyqwen chat --model` does.
    `progress` shows a tqdm bar per layer (default: only for multi-shard checkpoints). `matmul_precision`
    "medium" (numba backend only) rounds the inputs of products with bf16 weights to bf16, as PyTorch's
    `torch.set_float32_matmul_precision("medium")` does: a faster prefill and batched decode on bf16-capable CPUs
    (AVX512-BF16); logits move by ~1e-2 of their size on the tiny test fixtures.
    """
    from tinyqwen.checkpoint import Checkpoint
    from tinyqwen.gguf_checkpoint import GGUFCheckpoint, generation_config_from_gguf, is_gguf
    from tinyqwen.hub import is_hub_id, resolve_model

    original = str(path)
    path = Path(path).expanduser()
    if is_gguf(path) and path.is_file():
        kernels = get_backend(backend, matmul_precision)
        with GGUFCheckpoint(path) as checkpoint:
            weights = load_weights(
                checkpoint,
                checkpoint.config,
                kernels.prepare,
                progress,
                kernels.options.keep_bf16,
                kernels.options.bf16_in_memory,
            )
            generation_config = generation_config_from_gguf(checkpoint.file)
        return Qwen3(checkpoint.config, weights, kernels, generation_config, path)
    if not path.exists() and is_hub_id(original):  # a local folder of that name wins, as in transformers
        path = resolve_model(original)
    if not path.is_dir():
        what = "is a file, not a checkpoint directory" if path.exists() else "not found"
        raise CheckpointError(f"checkpoint directory {what}: {path}")
    config = load_config(path)
    kernels = get_backend(backend, matmul_precision)
    with Checkpoint(path) as checkpoint:
        weights = load_weights(
            checkpoint,
            config,
            kernels.prepare,
            progress,
            kernels.options.keep_bf16,
            kernels.options.bf16_in_memory,
        )
    return Qwen3(
        config=config,
        weights=weights,
        backend=kernels,
        generation_config=load_generation_config(path),
        path=path,
    )
