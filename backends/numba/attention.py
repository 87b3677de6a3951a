"""Attention: decode reads each kv head once for its whole group of query heads, straight from a float32, bf16 or
float16 KV cache (widened in registers); prefill runs blocks of query rows, each over only the keys its mask allows,
by BLAS with a fused mask + softmax in between.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from tinyqwen import attention as np_attention
from tinyqwen.backends.numba.intrinsics import FAST, PREFETCH_ROWS, _bf16, _exp, _prefetch_row

MASKED = np_attention.MASKED


ATTENTION_BLOCK = 128  # query rows per prefill block: its scores are [block, keys] floats, never [T, S]


# short contexts on one thread (a parallel launch costs more than the work), long ones over the kv heads. A
# server's batched step reads 16 rows of a few hundred positions (Qwen3-0.6B: 8 MiB of float32 keys and values per
# layer at 128 positions, ~0.6 ms on one thread): the threads sleep between two kernels of a layer-by-layer step,
# and on a machine whose cores are shared (other processes, the server's event loop and clients) a woken thread
# may wait a time slice for its core. Measured (16 rows, 64-128 positions each, 2 threads, AMD EPYC at load 5-8,
# same process, interleaved): one kernel 0.55 ms on one thread against 0.88 ms (median 3.8 ms) over the threads;
# a whole 16-row step's 28 attentions 23-28 ms against 55-75 ms. Splitting the pairs through an atomic counter
# between the caller and a helper thread (so that a late thread finds the work done) measured 54-65 ms: no better.
# So the threads only where the work is several times a wake-up even there (long contexts). Rechecked with the
# pool's keys and values written (an unwritten lazy pool reads the shared zero page: half the cost): 16 rows at
# 160-168 positions (21 MB per layer), whole steps at load 2.3, interleaved: 241 ms best with these 28 kernels
# serial against 256 over the threads. A server's batched step of bf16 weights no longer comes here: it runs
# attention inside its one region (decode_step.py), one (row, kv head) pair per claimed chunk on both threads.
PARALLEL_ATTENTION_BYTES = 32 << 20  # of keys and values read per step


@intrinsic
def _f16(typingctx, u):
    """int16 float16 bit pattern -> float32, in a register (x86's F16C `vcvtph2ps`): exact, like bf16's widening."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


# storage and its inner loops carry no branch: float32 as it is, bf16 as uint16 bit patterns, float16 as its int16
# view (Numba has no float16 arrays). A run-time `kind` argument tested per element instead stopped the loops from
# vectorising: a bf16 cache then read at 7 GB/s, slower than a float32 cache of twice the bytes (measured here).


def _kv(x):  # one stored key/value element -> float32 (compiled by the overload below)
    raise NotImplementedError


@numba.extending.overload(_kv)
def _kv_overload(x):
    # a float32 cache compiles to the plain load; a 16-bit one widens in registers, never the whole cache
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:
        return lambda x: _bf16(x)
    if x == types.int16:
        return lambda x: _f16(x)
    return None


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _attend_group(q, k, v, mask, out, b, h, S):  # one kv head h of row b and its group of query heads
    # k, v: the whole KV cache [B, Hkv, max_len, d], C-contiguous (so the loops over d vectorise: a sliced view
    # has strides Numba cannot assume, and ran 4x slower); only its first S positions are read
    Hq, d = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = np.float32(d**-0.5)
    # a server's batch of unrelated sequences (a RaggedKVCache) pads each row's keys to the longest row's: the
    # masked tail's exp is exactly 0, so the row stops at its last visible key (its own length), as it would alone
    last = S
    while last > 0 and not mask[b, last - 1]:
        last -= 1
    S = last if last > 0 else S  # (every key masked: the uniform average over all S, as the reference)
    scores = np.empty((group, S), np.float32)
    for s in range(S):  # each key row is read once and used by every query head of the group
        if s + PREFETCH_ROWS < S:
            _prefetch_row(k[b, h, s + PREFETCH_ROWS])
        for g in range(group):
            acc = np.float32(0.0)
            for j in range(d):
                acc += q[b, h * group + g, j] * _kv(k[b, h, s, j])
            scores[g, s] = acc * scale if mask[b, s] else MASKED
    for g in range(group):
        top = scores[g, 0]
        for s in range(1, S):
            top = max(top, scores[g, s])
        total = np.float32(0.0)
        for s in range(S):
            scores[g, s] = _exp(scores[g, s] - top)
            total += scores[g, s]
        for s in range(S):
            scores[g, s] /= total
    acc = np.zeros((group, d), np.float32)
    for s in range(S):  # each value row, likewise, once per group
        if s + PREFETCH_ROWS < S:
            _prefetch_row(v[b, h, s + PREFETCH_ROWS])
        for g in range(group):
            p = scores[g, s]
            for j in range(d):
                acc[g, j] += p * _kv(v[b, h, s, j])
    for g in range(group):
        for j in range(d):
            out[b, h * group + g, j] = acc[g, j]


@njit(cache=True, nogil=True)
def _decode_attention_serial(
    q, k, v, mask, out
):  # [B, Hq, d], [B, Hkv, S, d] x2 (float32, uint16 bf16 or int16 f16 bits), [B, S] bool -> out [B, Hq, d]
    B, Hkv = k.shape[0], k.shape[1]
    for bh in range(B * Hkv):
        _attend_group(q, k, v, mask, out, bh // Hkv, bh % Hkv, mask.shape[1])


@njit(parallel=True, cache=True, nogil=True)
def _decode_attention_parallel(q, k, v, mask, out):  # the same, (row, kv head) pairs spread over threads
    B, Hkv = k.shape[0], k.shape[1]
    for bh in prange(B * Hkv):
        _attend_group(q, k, v, mask, out, bh // Hkv, bh % Hkv, mask.shape[1])


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def _masked_softmax(scores, mask, scale):  # [R, S] f32 (in place), [R % rows, S] bool, scalar
    # the reference's softmax(where(mask, scores·scale, MASKED)) in two branch-free passes per row (they
    # vectorise), without its temporaries: a masked entry's exp(MASKED - max) is 0 in both. A row with every key
    # masked (padding) has max = MASKED, so each entry becomes exp(0) = 1: the uniform average, as there.
    R, S = scores.shape
    for r in range(R):
        top = MASKED
        m = r % mask.shape[0]  # the rows of a group's query heads are stacked: they share the mask
        for s in range(S):
            value = scores[r, s] * scale if mask[m, s] else MASKED
            scores[r, s] = value
            top = max(top, value)
        total = np.float32(0.0)
        for s in range(S):
            e = _exp(scores[r, s] - top)
            scores[r, s] = e
            total += e
        for s in range(S):
            scores[r, s] /= total


def _attention_block(q, k, v, rows, out, b, h, t0):  # one (row, kv head, query block) of the prefill
    # scores [group·block, keys] for the group's query heads stacked (k and v read once for all of them) by BLAS,
    # over only the keys some row of the block may see (causal: about half the products), the fused softmax,
    # then BLAS again with v
    group, n, d = q.shape[1] // k.shape[1], rows.shape[0], q.shape[3]
    end = rows.shape[1]
    heads = slice(h * group, (h + 1) * group)
    keys, values = np_attention.widen(k[b, h, :end]), np_attention.widen(v[b, h, :end])  # this block only
    scores = q[b, heads, t0 : t0 + n].reshape(group * n, d) @ keys.T  # [group·block, end]
    _masked_softmax(scores, rows, np.float32(d**-0.5))
    out[b, heads, t0 : t0 + n] = (scores @ values).reshape(group, n, d)


@cache
def _attention_threads():  # (a pool of Python threads, the BLAS thread controller) or None without threadpoolctl
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadPoolExecutor(numba.get_num_threads(), thread_name_prefix="tinyqwen-attention"), (
        ThreadpoolController()
    )


def _prefill_attention(q, k, v, mask):  # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] bool -> [B, Hq, T, d]
    # Blocks of ATTENTION_BLOCK query rows: memory stays one block of scores, whatever the prompt length.
    # The blocks' small products run on one BLAS thread each, the blocks spread over Python threads (BLAS and the
    # softmax kernel release the GIL). Multi-threaded BLAS on such small products was no faster, and its idle
    # workers spin for ~0.1 s after each call, stealing the cores from the oneDNN / Numba kernels that follow:
    # the MLP after attention took 2.4x longer than alone (measured, 2 cores).
    B, Hq, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = np.empty((B, Hq, T, d), np.float32)
    jobs = []
    for b in range(B):
        for t0 in range(0, T, ATTENTION_BLOCK):
            rows = mask[b, t0 : t0 + ATTENTION_BLOCK]
            seen = np.flatnonzero(rows.any(axis=0))
            # keys up to the last one any row may see; a row that sees none averages all S, as in the reference
            end = int(seen[-1]) + 1 if len(seen) and rows.any(axis=1).all() else S
            rows = np.ascontiguousarray(rows[:, :end])
            jobs += [(rows, b, h, t0) for h in range(Hkv)]
    threads = _attention_threads()
    if threads is None:
        for rows, b, h, t0 in jobs:
            _attention_block(q, k, v, rows, out, b, h, t0)
        return out
    pool, blas = threads
    with blas.limit(limits=1, user_api="blas"):
        # list(): wait for every block, and re-raise the first error of any
        list(pool.map(lambda job: _attention_block(q, k, v, job[0], out, *job[1:]), jobs))
    return out


def _whole_cache(
    a: np.ndarray,
) -> np.ndarray:  # [B, H, S, d] -> [B, H, S' ≥ S, d] C-contiguous, a = its [:, :, :S]
    # The model passes the cache's first S positions, a view of the whole preallocated cache: hand the kernel that
    # whole (contiguous) array instead, without a copy. Anything else is copied once.
    base = a.base
    if (
        isinstance(base, np.ndarray)
        and base.flags.c_contiguous
        and base.dtype == a.dtype
        and base.ndim == 4
        and base.shape[:2] == a.shape[:2]
        and base.shape[3] == a.shape[3]
        and base.strides == a.strides
        and base.ctypes.data == a.ctypes.data
    ):
        return base
    return np.ascontiguousarray(a)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d], [B, Hkv, S, d] (float32, or a bf16 / float16 KV cache), [B, T, S] bool
    # -> [B, Hq, T, d]
    B, Hq, T, d = q.shape
    if T != 1:
        return _prefill_attention(q, k, v, mask)
    # a narrow cache is read as it is stored: each element widened in registers (bf16 as uint16 bit patterns;
    # float16 passed as its int16 view, since Numba has no float16 arrays: see _kv)
    nbytes = k.nbytes
    k, v = _whole_cache(k), _whole_cache(v)
    if k.dtype == np.float16:
        k, v = k.view(np.int16), v.view(np.int16)
    out = np.empty((B, Hq, d), np.float32)
    kernel = _decode_attention_parallel if 2 * nbytes > PARALLEL_ATTENTION_BYTES else _decode_attention_serial
    kernel(np.ascontiguousarray(q[:, :, 0], np.float32), k, v, np.ascontiguousarray(mask[:, 0]), out)
    return out.reshape(B, Hq, 1, d)
