"""The KV pool: every running sequence's keys and values in one preallocated cache, one row (slot) per sequence.

    cache rows:  [ seq a | seq b | seq c | seq d (prefilling) |  free  |  free  ]      max_batch rows
                   0       1       2       3 = decoding             ▲
                   └──── decoding: one RaggedKVCache over rows [0, decoding) ────┘

Each row holds up to `slot_len` positions. The rows in use are kept at the front, decoding sequences first, then the
sequences being prefilled (if any), so one batched decode step is a *view* of the first rows (no gathering, no
copies). When a sequence leaves (finished, cancelled, its client gone), the last decoding row moves into its place
and the prefilling rows move down behind it: a few sequences' keys and values copied, once per departure.

Why slots and not paged blocks (vLLM's PagedAttention): with blocks, a sequence takes memory only for the positions
it has, and no request is refused for its length; but attention must then gather each sequence's blocks every step
(a custom kernel, or a copy of every running sequence's keys per layer per step in NumPy). A slot is contiguous, so
the existing attention kernels read it in place. The price: `slot_len` is fixed when the server starts (the budget
divided among `max_batch` rows), so a request may use at most `slot_len` positions, prompt and reply together.

Memory is bounded from the start: `max_batch · slot_len · kv_bytes_per_token` bytes, and only what the sequences
write is resident. The pool asks the OS for zeroed pages (an anonymous mapping), taken 4 KiB at a time as positions
are written, and advises it against transparent huge pages: NumPy advises its own large arrays *for* them, and then
a row's first token took a whole 2 MiB page, i.e. several rows' regions; a server with the default budget (a quarter
of the free memory) held it all after its first requests (Qwen3-0.6B: 5.3 GiB of huge pages for 16 sequences of a
few hundred positions). A request that finds every row taken waits in the queue: the server never allocates past
its budget.
"""

from __future__ import annotations

import numpy as np

from tinyqwen import kv_cache
from tinyqwen.kv_cache import KVCache, RaggedKVCache, cache_rows, kv_bytes_per_token

# the KV pool's storage dtypes. float32 is the default because it is exact: a request's logits equal the library's
# default run (`generate` with its float32 cache) up to the batched products' rounding; bfloat16 halves the bytes
# per position (twice the positions in a --kv-budget, half the bytes a decode step's attention reads) for the
# rounding of every key and value to 8 bits of mantissa, as llama.cpp's server (f16) and vLLM's fp8 caches trade.
# Not float16: the library's float16 cache raises mid-step when a key leaves its range (a whole batch would fail
# at once), and the numba backend's whole-step and batched-step kernels decline it (layer by layer: far slower).
# A bf16 pool magnifies the batched products' float32 rounding: a key one float32 ulp off can round to the next
# bf16. Measured (Qwen3-0.6B-shaped random bf16, numba, 4 rows decoded 4 steps against each alone on a KVCache of
# the same dtype): max |logit diff| 3.2e-4 in bf16 against 1.6e-6 in float32 (logits up to 3.3), no arg-max
# changed; on a near tie (bench_serve's checked reply, a margin of 0.005) greedy ids can part from `generate`'s.
# Speed (the same model, one batched step of 16 rows, same process, alternated, best / median of 7, load 2-3):
# 93 / 97 ms against 100 / 100 at 160-167 positions, 432 / 446 against 515 / 543 at 1,000-1,007 (attention
# reads half the bytes; the weights, the rest of a step, are the same). Through HTTP (bench_serve, 16 clients,
# decode burst, 5 runs each alternated, load 2.5-4.4) the gain is inside the noise: ITL p50 median 307 ms against
# 316, 48.1 tok/s against 48.2; the server's peak RSS ~300 MiB lower (1,694-1,920 MiB against 1,997-2,362)
KV_DTYPES = ("float32", "bfloat16")


def default_max_batch(model) -> int:
    """16 sequences: a decode step of 16 rows still reads each weight once (and on a 2-core CPU it is about where
    the step turns from memory-bound to compute-bound); more rows only wait longer for each token."""
    return 16


def default_kv_budget(model, max_batch: int, kv_dtype: str = "float32") -> int:
    """Bytes of KV cache: enough for every row to hold the whole context (in `kv_dtype`), but at most a quarter of
    the memory the machine has free now (read from /proc/meminfo; 4 GiB where that cannot be read)."""
    c = model.config
    full = max_batch * c.max_position_embeddings * kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads,
                                                                      c.head_dim, kv_dtype)  # fmt: skip
    free = 16 << 30
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return int(min(full, free // 4))


def lazy_zeros(shape: tuple, dtype) -> np.ndarray:
    """The pool's memory: kv_cache.lazy_zeros (taken 4 KiB at a time as it is written, no huge pages; see the module
    docstring), in a shared mapping so that /proc reports the pool's resident pages apart (RssShmem)."""
    return kv_cache.lazy_zeros(shape, dtype, shared=True)


def pool_shape(config, kv_budget: int, max_batch: int, dtype: str = "float32") -> tuple[int, int]:
    """(rows, slot_len) for a budget of `kv_budget` bytes: `max_batch` rows (fewer when the budget cannot give each
    at least 256 positions), each as long as the context or what the budget allows, whichever is less.

    >>> from tinyqwen.config import published_configs
    >>> pool_shape(published_configs()["Qwen3-0.6B"], 8 << 30, 16)  # 8 GiB of float32 KV: 16 rows of 2,340
    (16, 2340)
    >>> pool_shape(published_configs()["Qwen3-0.6B"], 8 << 30, 16, "bfloat16")  # the same bytes in bf16: twice
    (16, 4681)
    """
    per_token = kv_bytes_per_token(
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype
    )
    context = config.max_position_embeddings
    rows = max(1, min(max_batch, kv_budget // (per_token * min(context, 256))))
    return rows, int(min(context, kv_budget // (per_token * rows)))


class _PoolRow(KVCache):
    """One row of the pool as a plain KVCache whose `advance` also moves the pool's length of that row (a
    RaggedKVCache advances the pool's `lengths` in place; this keeps a one-row view in step with them)."""

    pool_lengths: np.ndarray
    row: int

    def advance(self, n: int) -> None:
        self.length += n
        self.pool_lengths[self.row] = self.length


class KVPool:
    """`rows` slots of `slot_len` positions in one KVCache stored as `dtype` ("float32", or "bfloat16": uint16 bit
    patterns, see tinyqwen/kv_cache.py); `owner[r]` is the sequence in row r (or None)."""

    def __init__(self, model, rows: int, slot_len: int, dtype: str = "float32"):
        backend = getattr(model, "backend", None)
        self.host = getattr(backend, "zeros", np.zeros) is np.zeros
        self._views: dict[int, _PoolRow] = {}  # row -> its row_cache view, made once
        if self.host:  # host memory: mapped lazily (see the docstring)
            c = model.config
            shape = (c.num_hidden_layers, rows, c.num_key_value_heads, slot_len, c.head_dim)
            self.cache: KVCache = KVCache.allocate(*shape, dtype, zeros=lazy_zeros)
        else:  # the backend's own memory (a GPU's)
            self.cache = model.new_cache(rows, slot_len, dtype)
        self.lengths = np.zeros(rows, dtype=np.int64)  # positions filled in each row
        self.owner: list = [None] * rows
        self.decoding = 0  # rows [0, decoding) hold sequences past their prefill

    @property
    def rows(self) -> int:
        return len(self.owner)

    @property
    def slot_len(self) -> int:
        return self.cache.max_len

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def take(self, seq) -> int:
        """The row for a sequence about to be prefilled: the first free one (after the decoding and prefilling
        rows)."""
        row = self.decoding
        while self.owner[row] is not None:
            row += 1
        self.owner[row], self.lengths[row], seq.row = seq, 0, row
        return row

    def row_cache(self, row: int) -> KVCache:
        """One row as a plain KVCache (a view: what the model writes lands in the pool) at that row's length; the
        model's `advance` moves the row's length in `lengths` too. The same view object every call for a row (its
        arrays too): a backend that keeps per-cache state (the numba whole decode step's typed Lists of the cache's
        arrays, built once per cache object) finds it again instead of rebuilding it every step."""
        view = self._views.get(row)
        if view is None:
            c = self.cache  # (host rows as plain ndarrays: see kv_cache.cache_rows)
            keys, values = ([cache_rows(a, row, row + 1) for a in store] for store in (c.keys, c.values))
            view = _PoolRow(keys, values, 0, c.dtype)
            view.pool_lengths, view.row = self.lengths, row
            self._views[row] = view
        view.length = int(self.lengths[row])
        view.sequences = [self.owner[row]]  # who is in it (tinyqwen.testing.ScriptedModel reads this)
        return view

    def prefilled(self, seq, length: int) -> None:
        """The sequence in row `decoding` has finished its prefill: it joins the decoding rows."""
        assert seq.row == self.decoding
        self.lengths[seq.row] = length
        self.decoding += 1

    def batch(self) -> KVCache | RaggedKVCache:
        """The decoding rows as one ragged cache; the model advances `lengths` in place.

        One decoding row: that row as a plain KVCache (`row_cache`), so that a lone stream takes the path a lone
        `generate` takes. The numba backend runs a one-row step on a plain cache as ONE kernel (decode_step.py)
        but a ragged cache, even of one row, layer by layer and kernel by kernel (~300 calls from Python, a thread
        wake-up for each parallel one): one client's step took 212 ms on the ragged row against 83 ms on the plain
        view (Qwen3-0.6B-shaped, 2 threads, same process, a machine at load 5-8); the logits are the same (the same
        one-row kernels, and a lone row's mask sees every key either way)."""
        if self.decoding == 1 and self.host:
            return self.row_cache(0)
        return self.window(0, self.decoding)

    def window(self, first: int, n: int) -> RaggedKVCache:
        """Rows first .. first + n - 1 as one ragged cache (a decode step, or several prompts prefilled at once)."""
        batch = RaggedKVCache(self.cache, self.lengths[first : first + n], first)
        batch.sequences = self.owner[first : first + n]  # who is in each row (ScriptedModel reads this)
        return batch

    def release(self, seq) -> None:
        """Free a sequence's row at once, keeping the rows in use packed at the front (see the module docstring)."""
        row = seq.row
        if row is None:
            return
        seq.row = None
        if row < self.decoding:
            last = self.decoding - 1
            if row != last:
                self._move(last, row)
            self.decoding, row = last, last
        # else: a prefilling sequence (cancelled before its first token)
        self.owner[row], self.lengths[row] = None, 0
        row += 1
        while row < self.rows and self.owner[row] is not None:  # the prefilling rows behind move down one
            self._move(row, row - 1)
            row += 1

    def _move(self, src: int, dst: int) -> None:
        n = int(self.lengths[src])
        for store in (self.cache.keys, self.cache.values):
            for a in store:
                a[dst, :, :n] = a[src, :, :n]
        self.lengths[dst], self.owner[dst] = n, self.owner[src]
        self.owner[dst].row = dst
        self.owner[src], self.lengths[src] = None, 0
