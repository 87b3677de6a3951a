"""The KV cache: remember every layer's keys and values so each new token costs one position, not T.

Without a cache, generating token t re-runs attention over all t previous tokens in every layer. With it, the
prompt is processed once ("prefill") and each new token only computes its own q, k, v, appends k and v, and attends
over the stored ones ("decode").

The cache is preallocated — no reallocation as it grows — and GQA-shaped: it stores the `num_key_value_heads`
heads, not one copy per query head (Qwen3-0.6B: 8 kv heads instead of 16, half the memory). Per layer:

    keys[layer], values[layer]: [batch, kv_heads, max_len, head_dim]    (float32, bfloat16 or float16)

Memory is 2 · layers · batch · kv_heads · max_len · head_dim · bytes per value: Qwen3-0.6B at 4,096 positions takes
2 · 28 · 8 · 4096 · 128 · 4 B = 0.94 GB per sequence in float32 — so we size the cache for the job, never for the
model's 40,960-position maximum. Rows of a batch share one `length`; shorter (left-padded) rows mask their padding.

A server decodes unrelated sequences together, each at its own length: `RaggedKVCache` is a window on the first
rows of a KVCache with one length per row (`lengths`, [B]). The model then gives every row its own positions and
lets it see only its own keys (see `Qwen3.forward`); each row computes what it would compute alone.

Storage dtype: "float32" (the default: exact), "bfloat16" or "float16" halve it. NumPy has no bfloat16,
so a bf16 cache holds uint16 bit patterns, rounded to nearest-even when written (`float32_to_bf16`, the rounding
torch uses) and widened exactly when read (`tinyqwen.attention.widen`). bfloat16 keeps float32's range with
8 bits of precision; float16 keeps 11 bits but overflows above 65,504 (such a value is refused, not stored as inf).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from tinyqwen.bf16 import float32_to_bf16
from tinyqwen.errors import GenerationError

# prompts longer than this are prefilled this many tokens at a time (generation's default): the activations of one
# chunk (e.g. [2048, ffn] float32 MLP temporaries) instead of the whole prompt's
PREFILL_CHUNK = 2048

# storage dtype name -> (NumPy dtype of the stored arrays, bytes per value)
KV_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
KV_DTYPE_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
}


def kv_dtype_name(dtype: str) -> str:
    """The canonical name of a KV cache dtype ('bf16' -> 'bfloat16'); a GenerationError for an unknown one.

    >>> kv_dtype_name("bf16"), kv_dtype_name("float32")
    ('bfloat16', 'float32')
    """
    name = KV_DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in KV_DTYPES:
        raise GenerationError(
            f"unknown KV cache dtype {dtype!r}: choose float32, bfloat16 or float16 (or fp32, bf16, fp16)"
        )
    return name


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: str = "float32") -> int:
    """Bytes the cache holds per position of one sequence: K and V, every layer, every kv head.

    >>> kv_bytes_per_token(28, 8, 128, "bfloat16")  # Qwen3-0.6B: 112 KiB per token in bf16
    114688
    """
    return 2 * num_layers * kv_heads * head_dim * np.dtype(KV_DTYPES[kv_dtype_name(dtype)]).itemsize


def lazy_zeros(shape: tuple, dtype, shared: bool = False) -> np.ndarray:
    """np.zeros' contract (zeroed, writable, C-contiguous) from an anonymous mapping of its own, advised against
    huge pages: memory is taken 4 KiB at a time as positions are written, and handed back whole when the array goes.

    np.zeros gets its memory from malloc, and whether that is a fresh mapping depends on what the process freed
    before: glibc raises its mapping threshold after each large free (up to 32 MiB), so after a GGUF file's metadata
    has been parsed, a cache's per-layer arrays come from the heap, are zeroed there by hand (every page resident at
    once) and, once freed, stay with the process. Measured on the Q4_K_M Qwen3-0.6B file, a 200-position bf16
    cache (22 MiB): resident 7 MiB at allocation with np.zeros (0 here), and a second cache after the first was
    freed took 13 MiB more (0 here: the first one's mapping was returned). With huge pages (NumPy advises them for
    large arrays) one write would take 2 MiB. Where the OS has no such advice: plain np.zeros.

    >>> a = lazy_zeros((2, 3), np.float32)
    >>> a[1, 2] = 5.0
    >>> a
    array([[0., 0., 0.],
           [0., 0., 5.]], dtype=float32)
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    # (anonymous: no file behind it). `shared`: the serve KV pool's mapping, so that /proc counts its written
    # pages apart from the heap's (RssShmem: what bench_serve's soak reports as the pool)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.ndarray(
        shape, dtype, buffer=buffer
    )  # (the array, and every view of it, keeps the mapping alive)


@dataclass
class KVCache:
    keys: list[np.ndarray]  # per layer [B, Hkv, max_len, d]
    values: list[np.ndarray]  # per layer [B, Hkv, max_len, d]
    length: int = 0  # positions filled so far (the same for every row)
    dtype: str = "float32"  # storage: "float32", "bfloat16" (uint16 bit patterns) or "float16"

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: str = "float32",
        zeros=np.zeros,
    ) -> KVCache:
        # `zeros`: the backend's allocator (np.zeros; cupy.zeros puts the cache in GPU memory)
        if batch_size <= 0 or max_len <= 0:
            raise GenerationError(
                f"KV cache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}"
            )
        dtype = kv_dtype_name(dtype)
        shape = (batch_size, kv_heads, max_len, head_dim)
        store = KV_DTYPES[dtype]
        if (
            zeros is np.zeros
        ):  # host memory: the whole cache in one mapping of its own, taken as it is written
            slab = lazy_zeros((2, num_layers, *shape), store)
            return cls(keys=list(slab[0]), values=list(slab[1]), dtype=dtype)
        return cls(
            keys=[zeros(shape, store) for _ in range(num_layers)],
            values=[zeros(shape, store) for _ in range(num_layers)],
            dtype=dtype,
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # [B, Hkv, T, d] x2 float32 -> all keys and values so far [B, Hkv, length + T, d] x2 in the storage dtype
        # (views, no copies: attention widens them). Writes after `length` but does not advance it: the model
        # advances once, after the last layer.
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise GenerationError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, self.length : end] = self.encode(k, "keys", layer)
        self.values[layer][:, :, self.length : end] = self.encode(v, "values", layer)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """The model calls this once after its last layer: `n` more positions are filled."""
        self.length += n

    def encode(self, x: np.ndarray, what: str = "values", layer: int = 0) -> np.ndarray:
        """float32 -> the storage dtype: bf16 rounds to nearest-even (torch's rounding), float16 likewise."""
        if self.dtype == "bfloat16":
            return float32_to_bf16(x)
        if self.dtype == "float16":
            with np.errstate(over="ignore"):
                narrow = x.astype(np.float16)
            if np.isinf(narrow).any() and not np.isinf(x).any():
                raise GenerationError(
                    f"layer {layer} {what} exceed float16's range (largest {float(np.abs(x).max()):.4g} > 65504): "
                    "use a bfloat16 or float32 KV cache"
                )
            return narrow
        return x


class _Pool(np.ndarray):
    """The type of a RaggedKVCache's storage: only so that the first rows, taken as a plain array, are their own
    base (NumPy stops collapsing a view's `.base` at a change of type), and a kernel that wants the whole
    contiguous cache behind a view (the numba decode attention) finds exactly those rows, with no copy."""


def cache_rows(a, lo: int, hi: int):
    """Rows lo .. hi - 1 of a cache array, a view in the backend's own array type: a RaggedKVCache's host storage
    (`_Pool`) as a plain ndarray, a device array (cupy) as itself (np.asarray would copy it to the host, or refuse).
    """
    return a[lo:hi].view(np.ndarray) if isinstance(a, _Pool) else a[lo:hi]


@dataclass
class RaggedKVCache:
    """`B` rows of a KVCache (from row `first`, default 0), each at its own length: a batch of unrelated sequences.

    keys[layer][first + b, :, :lengths[b]] hold row b's positions. `update` writes each row's new keys at its own length,
    and returns every row's keys up to the longest row's end (a row's later positions are stale: the model's mask
    hides them). A server keeps its running sequences in the first rows of one big cache (see
    tinyqwen/serve/kv_pool.py) and decodes them all with one `forward`.

    >>> base = KVCache.allocate(1, 4, 1, 8, 2)
    >>> rows = RaggedKVCache(base, np.array([3, 5]))
    >>> k, _ = rows.update(0, np.ones((2, 1, 1, 2), np.float32), np.ones((2, 1, 1, 2), np.float32))
    >>> k.shape, base.keys[0][:2, 0, :, 0].tolist()
    ((2, 1, 6, 2), [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    """

    base: KVCache
    lengths: np.ndarray  # [B] int64: positions filled in each of rows first .. first + B - 1
    first: int = 0

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or not 0 < len(self.lengths) <= self.base.batch_size - self.first:
            raise GenerationError(
                f"RaggedKVCache needs one length per row for 1 to {self.base.batch_size - self.first} rows "
                f"(from row {self.first}), got shape {list(self.lengths.shape)}"
            )
        for store in (self.base.keys, self.base.values):
            for i, a in enumerate(store):
                if isinstance(a, np.ndarray) and type(a) is np.ndarray and a.flags.c_contiguous:
                    store[i] = a.view(_Pool)  # the same memory (see _Pool)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return self.base.max_len

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def length(self) -> int:
        """The longest row's length (what a shared-length cache calls `length`)."""
        return int(self.lengths.max())

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # [B, Hkv, T, d] x2 float32 -> [B, Hkv, max(lengths) + T, d] x2 in the storage dtype (views of the rows)
        B, _, T, _ = k.shape
        end = int(self.lengths.max()) + T
        if end > self.max_len:
            raise GenerationError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        lo, hi = self.first, self.first + B
        rows = np.arange(lo, hi)[:, None]  # [B, 1]
        at = self.lengths[:, None] + np.arange(T)  # [B, T]: where each row's new positions go
        out = []
        for store, x, what in ((self.base.keys, k, "keys"), (self.base.values, v, "values")):
            a = store[layer]
            a[rows, :, at] = self.base.encode(x, what, layer).transpose(0, 2, 1, 3)  # [B, T, Hkv, d]
            out.append(cache_rows(a, lo, hi)[:, :, :end])
        return out[0], out[1]

    def advance(self, n: int) -> None:
        self.lengths += n

    def key_mask(self, T: int) -> np.ndarray:
        """[B, T, max(lengths) + T] bool: new position t of row b sees that row's keys up to lengths[b] + t."""
        keys = np.arange(int(self.lengths.max()) + T)
        return keys[None, None, :] <= (self.lengths[:, None] + np.arange(T))[:, :, None]


# --------------------------------------------------------------------------------------------- memory estimate

# float32 activations alive at the peak of a prefill chunk of C tokens (numpy reference, measured with tracemalloc
# on Qwen3-0.6B's shapes: 182.6 MiB for C = 2048 whatever the past, 141.6 MiB for C = 1024; the MLP alone 72 MiB
# at C = 2048). The peak is in attention: the residual x and its norm h ([C, hidden] each), q, its scaled copy and
# the output ([C, q_size] each), k and v, and a tile of scores with its mask-select copy and the matmul's output
# (3 tiles of [heads, QUERY_BLOCK, KEY_BLOCK]). The two measurements give C · (2·hidden + 3·q_size + 2·kv_size) +
# 3 tiles to within 4%. The MLP phase (gate, up and the SiLU temporaries, 3 × [C, ffn]) is the peak only for wide
# MLPs.
RUNTIME_BYTES = (
    40 << 20
)  # the Python interpreter, NumPy, OpenBLAS and tinyqwen (RSS after loading - weights: 34 MiB)


def memory_estimate(
    config,
    context: int,
    kv_dtype: str = "float32",
    batch: int = 1,
    chunk: int = PREFILL_CHUNK,
    weight_bytes: int | None = None,
) -> dict[str, int]:
    """Bytes needed to prefill `context` tokens (in chunks of `chunk`) into a KV cache of that size.

    weights      every parameter in float32 (the numpy backend widens bf16), unless `weight_bytes` is given
    kv_cache     2 · layers · batch · kv_heads · context · head_dim · bytes per value
    activations  the peak temporaries of one prefill chunk (see the note above RUNTIME_BYTES), float32
    runtime      the interpreter and libraries (RUNTIME_BYTES)

    >>> from tinyqwen.config import published_configs
    >>> c = published_configs()["Qwen3-0.6B"]
    >>> m = memory_estimate(c, 32768, "bfloat16")
    >>> round(m["kv_cache"] / 2**30, 2), round(m["weights"] / 2**30, 2)  # GiB
    (3.5, 2.22)
    """
    from tinyqwen.attention import KEY_BLOCK, QUERY_BLOCK
    from tinyqwen.config import count_parameters

    c = config
    C = min(context, chunk)
    ffn = c.moe_intermediate_size * c.num_experts_per_tok if c.is_moe else c.intermediate_size
    tile = c.num_attention_heads * min(C, QUERY_BLOCK) * min(context, KEY_BLOCK)  # scores of one tile
    attention_phase = C * (2 * c.hidden_size + 3 * c.q_size + 2 * c.kv_size) + 3 * tile
    mlp_phase = C * (2 * c.hidden_size + 3 * ffn)
    activations = 4 * batch * (max(attention_phase, mlp_phase) + c.vocab_size)  # + the last position's logits
    return {
        "weights": count_parameters(c) * 4 if weight_bytes is None else weight_bytes,
        "kv_cache": batch
        * context
        * kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, kv_dtype),
        "activations": activations,
        "runtime": RUNTIME_BYTES,
    }
