"""A whole decode step — every layer, the final RMSNorm and the lm_head — in ONE parallel region (bf16 or quantized).

decode_layer.py made each layer one call and one parallel region; a step of Qwen3-0.6B still made 30 trips from
Python (28 layers, the norm, the lm_head), each a fork and a join: the threads fall asleep in the ~50-100 us of
Python between two calls (settings.py's short spin) and are woken again, and each call unboxes its arrays. Here
the step is one call: each thread runs layer after layer through decode_layer.py's nine phases (phases.py: chunks
claimed through atomic counters, a phase started once the one before has finished all its chunks), then two more
phases, the final norm and the lm_head's rows:

    layer 0: norm ─ q/k/v ─ RoPE ─ attention ─ o ─ norm ─ gate/up ─ down ─ residual ┐
    layer 1: ...                                                                     │ (27 times)
    final norm ─ lm_head rows (151936 rows in claimed chunks, ~26 % of the step's bytes) ─> logits

One fork and one join per token instead of 30, and no thread ever sleeps between two layers. Each layer has its
own counters (fresh for every step), so a thread late in layer l never touches layer l + 1's; a layer's first
phase waits for the previous layer's residual, written in place into the hidden state (no phase reads the layer's
input after its post-attention residual, so the residual may overwrite it).

The same serial kernels on the same rows as the layer-by-layer path (decode_layer.py's `_bf16_phases`, linear.py's
lm_head GEMV through gemv_one_row.py), so the logits are bit-identical to it and to the kernel-by-kernel path (the
tests check this). `decode_step` returns None where it does not apply — anything but one new position of one
row with a plain KV cache (or of the batched step's rows), weights not all bf16 of one kind, an MoE layer,
`WHOLE_STEP` or decode_layer.ONE_REGION off — and the model then runs the step layer by layer. In "medium"
precision a lone row takes the float32 step (see `decode_step`); the batched step's rows round as it says.

A server's batched step (a RaggedKVCache of 2 .. GEMV_MAX_ROWS rows from row 0, bf16 weights, the 4 x 6 tiles;
"medium": their vdpbf16ps form on bf16 inputs) takes the same shape of region on M rows (`_batch_step_region`, see
the notes above it); its logits are bit-identical to the kernel-by-kernel step's.

Quantized weights ("int8" GEMVs; GGUF's q8_0, q4_k, q6_k, mixed as in Q4_K_M) take the same shape of step:
decode_layer.py's 11 quantized phases per layer (`_quant_phases`), the final norm with its output quantized once
for the lm_head, and the lm_head's rows (`_step_quant_region`); its results are bit-identical to one call per layer
and to kernel by kernel too (tests/test_numba_quant.py). `QUANT_STEP` off: a quantized step runs layer by layer.

Measured (benchmarks/bench_decode_step.py's kind of A/B: Qwen3-0.6B-shaped random bf16, 128-token prompt, 2
threads, AMD EPYC with 2 cores shared by other processes, load average 4-10, same process, interleaved, best
median of 6 rounds of 32 steps): 135 ms per step against 177 one call per layer (wall), 87 against 120 ms of CPU
time; the same tokens. The gain on a quiet machine is smaller (the threads then rarely sleep between layers).

One concept: a decode step as one parallel region, in its three forms (one row of bf16 weights, one row of
quantized ones, a server's batch of bf16 rows each at its own length); they share the plan of the weights, the
typed Lists of the cache remembered per cache object and the phase counters, and each mirrors the one before.
"""

from __future__ import annotations

import weakref

import numpy as np
from numba import njit, prange
from numba.typed import List

from tinyqwen.backends.numba import decode_layer as _dl
from tinyqwen.backends.numba.attention import _attend_group
from tinyqwen.backends.numba.decode_layer import (
    _act_buffers,
    _add,
    _attention_scratch,
    _bf16_phases,
    _bf16_plan,
    _bf16_scratch,
    _position_args,
    _qk_rope_store,
    _quant_phases,
    _quant_plan,
    _quant_scratch,
    _quantize_into,
)
from tinyqwen.backends.numba.decode_tiles import (
    _gate_up6_rows_bf16,
    _gate_up6_rows_dpbf16,
    _gemm6_rows_bf16,
    _gemm6_rows_dpbf16,
)
from tinyqwen.backends.numba.gemv_one_row import _claim_size, _gemv1_rows_bf16, _split_pairs
from tinyqwen.backends.numba.intrinsics import _to_bf16
from tinyqwen.backends.numba.linear import _starts
from tinyqwen.backends.numba.norm_rope import _rms_norm
from tinyqwen.backends.numba.phases import LINE, claim, finish, wait_finished
from tinyqwen.backends.numba.quant import _gemv_rows_int, _needs
from tinyqwen.backends.numba.weights import BF16Weight, QuantWeight

WHOLE_STEP = (
    True  # False: one call per layer (decode_layer.py), then the norm and the lm_head as their own calls
)
LAYER_PHASES = (
    9  # decode_layer.py's bf16 phases; the step's counters: 9 per layer, then the norm and the lm_head
)
QUANT_STEP = True  # False: a quantized model's step layer by layer (decode_layer.py's one call per layer)
QUANT_PHASES = 11  # decode_layer.py's quantized phases


@njit(cache=True)
def _step_phases(ctr, chunks, sizes, x, in_norms, wqs, wks, wvs, q_norms, k_norms, wos, post_norms, wgs, wus, wds, cos,
                 sin, kcs, vcs, mask, pos, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k, v, qr, qn, kn, kr,
                 att, o, x1, g, o2, he, ho, ae, ao, ge, go, norm, lm_head, lm_starts, lm_size, logits, hn, hne,
                 hno):  # fmt: skip
    # one thread's run through the whole step: L layers of 9 phases (each with its own 9 counters, a slice of
    # ctr), then the final norm (phase 9·L) and the lm_head's rows (phase 9·L + 1). x [1, H]: the hidden state,
    # each layer's output written over its input
    L = len(wqs)
    per = 2 * LAYER_PHASES * LINE
    for layer in range(L):
        c = ctr[layer * per : (layer + 1) * per]
        if layer > 0:  # the previous layer's residual (its last phase, one chunk) is this layer's input
            wait_finished(ctr[(layer - 1) * per : layer * per], LAYER_PHASES - 1, 1)
        _bf16_phases(c, chunks, sizes, x, in_norms[layer], (wqs[layer], wks[layer], wvs[layer]), q_norms[layer], k_norms[layer],
                     wos[layer], post_norms[layer], wgs[layer], wus[layer], wds[layer], cos, sin, kcs[layer],
                     vcs[layer], mask, pos, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k, v, qr, qn, kn,
                     kr, att, o, x1, g, o2, x, he, ho, ae, ao, ge, go)  # fmt: skip
    tail = ctr[L * per :]
    wait_finished(ctr[(L - 1) * per : L * per], LAYER_PHASES - 1, 1)
    if claim(tail, 0) == 0:  # the final norm, and its output split into even and odd values (gemv_one_row.py)
        _rms_norm(x, norm, eps, hn)
        _split_pairs(hn, hne, hno)
        finish(tail, 0)
    wait_finished(tail, 0, 1)
    total = lm_starts[-1]
    while True:  # the lm_head's rows, claimed in chunks as gemv_one_row._gemv1_claimed
        lo = claim(tail, 1) * lm_size
        if lo >= total:
            break
        _gemv1_rows_bf16(hne, hno, (lm_head,), (logits,), lm_starts, lo, min(total, lo + lm_size))
        finish(tail, 1)


@njit(parallel=True, cache=True, nogil=True)
def _step_bf16_region(x_in, in_norms, wqs, wks, wvs, q_norms, k_norms, wos, post_norms, wgs, wus, wds, cos, sin, kcs, vcs,
                      mask, pos, eps, qk_norm, heads, head_dim, starts_qkv, starts_o, starts_d, chunks, sizes, norm,
                      lm_head, lm_starts, workers):  # fmt: skip
    # x_in [1, H] f32 (the embedded token) -> logits [1, V]: the whole step (see the module docstring). The
    # per-layer weights and caches come as typed Lists, one entry per layer: a tuple of 28 layers' arrays took
    # Numba's parallel-loop lowering more than ten minutes to compile (each array one argument of the loop's
    # function), and unboxing it cost every call; a typed List is one pointer
    M, H = x_in.shape
    L = len(wqs)
    x = x_in.copy()
    h, q, k, v, qr, qn, kn, kr, att, o, x1, g, o2, he, ho, ae, ao, ge, go = _bf16_scratch(
        x,
        wqs[0].shape[0],
        wks[0].shape[0],
        wvs[0].shape[0],
        wgs[0].shape[0],
        heads,
        head_dim,
        kcs[0].shape[1],
    )
    hn = np.empty_like(x)
    hne, hno = np.empty(H // 2, np.float32), np.empty(H // 2, np.float32)
    logits = np.empty((M, lm_head.shape[0]), np.float32)
    lm_size = _claim_size(lm_head.shape[0], 2 * H, workers)
    ctr = np.zeros(2 * (LAYER_PHASES * L + 2) * LINE, np.int64)
    for _ in prange(workers):
        _step_phases(ctr, chunks, sizes, x, in_norms, wqs, wks, wvs, q_norms, k_norms, wos, post_norms, wgs, wus, wds, cos,
                     sin, kcs, vcs, mask, pos, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k, v, qr, qn, kn,
                     kr, att, o, x1, g, o2, he, ho, ae, ao, ge, go, norm, lm_head, lm_starts, lm_size, logits, hn,
                     hne, hno)  # fmt: skip
    return logits


# ---- the same for quantized weights ("int8"): decode_layer.py's 11 quantized phases per layer, then the final
# norm (and the activation quantized for the lm_head) and the lm_head's rows. A layer's formats, the activation
# forms they need and its chunk plan come as a row of kinds [L, 7], need [L, 8], chunks and sizes [L, 11]: Q4_K_M
# mixes q4_k and q6_k across layers (attn_v, ffn_down), and a q6_k row is longer than a q4_k one. The activation
# buffers are sized for every form any layer needs; each layer quantizes into the forms it needs, as its own call.


@njit(cache=True)
def _quant_step_phases(ctr, chunks, sizes, x, in_norms, wqs, wks, wvs, wqs8, wks8, wvs8, q_norms, k_norms, wos,
                       wos8, post_norms, wgs, wus, wgs8, wus8, wds, wds8, kinds, need, cos, sin, kcs, vcs, mask, pos,
                       eps, qk_norm, starts_qkv, starts_o, starts_gu, starts_d, h, q, k, v, qr, qn, kn, kr, att, o,
                       x1, g, u, o2, acts, acts_a, acts_h, acts_f, norm, lm_kind, lm_head, lm_head8, lm_starts,
                       lm_size, lm_need, logits, hn, acts_n):  # fmt: skip
    # one thread's run through the whole quantized step (as _step_phases): L layers of 11 phases, then the final
    # norm quantized (phase 11·L) and the lm_head's rows (phase 11·L + 1); x [1, H] written over by each layer
    L = len(wqs)
    per = 2 * QUANT_PHASES * LINE
    for layer in range(L):
        c = ctr[layer * per : (layer + 1) * per]
        if layer > 0:  # the previous layer's residual (its last phase, one chunk) is this layer's input
            wait_finished(ctr[(layer - 1) * per : layer * per], QUANT_PHASES - 1, 1)
        _quant_phases(c, chunks[layer], sizes[layer], x, in_norms[layer], (wqs[layer], wks[layer], wvs[layer]),
                      (wqs8[layer], wks8[layer], wvs8[layer]), q_norms[layer], k_norms[layer], (wos[layer],),
                      (wos8[layer],), post_norms[layer], (wgs[layer], wus[layer]), (wgs8[layer], wus8[layer]),
                      (wds[layer],), (wds8[layer],), kinds[layer], need[layer], cos, sin, kcs[layer], vcs[layer],
                      mask, pos, eps, qk_norm, starts_qkv, starts_o, starts_gu, starts_d, h, q, k, v, qr, qn, kn,
                      kr, att, o, x1, g, u, o2, x, acts, acts_a, acts_h, acts_f)  # fmt: skip
    tail = ctr[L * per :]
    wait_finished(ctr[(L - 1) * per : L * per], QUANT_PHASES - 1, 1)
    if claim(tail, 0) == 0:  # the final norm, quantized as the lm_head's GEMV quantizes its input
        _rms_norm(x, norm, eps, hn)
        _quantize_into(hn, acts_n, lm_need[0], lm_need[1])
        finish(tail, 0)
    wait_finished(tail, 0, 1)
    total = lm_starts[-1]
    while True:
        lo = claim(tail, 1) * lm_size
        if lo >= total:
            break
        _gemv_rows_int(
            lm_kind, (lm_head,), (lm_head8,), (logits,), lm_starts, acts_n, lo, min(total, lo + lm_size)
        )
        finish(tail, 1)


@njit(parallel=True, cache=True, nogil=True)
def _step_quant_region(x_in, in_norms, wqs, wks, wvs, wqs8, wks8, wvs8, q_norms, k_norms, wos, wos8, post_norms,
                       wgs, wus, wgs8, wus8, wds, wds8, kinds, need, need_any, cos, sin, kcs, vcs, mask, pos, eps,
                       qk_norm, heads, head_dim, starts_qkv, starts_o, starts_gu, starts_d, chunks, sizes, norm,
                       lm_kind, lm_head, lm_head8, lm_starts, lm_need, workers):  # fmt: skip
    # x_in [1, H] f32 (the embedded token) -> logits [1, V]: the whole quantized step (the per-layer arrays as
    # typed Lists, as _step_bf16_region)
    M, H = x_in.shape
    L = len(wqs)
    x = x_in.copy()
    # the scratch as arrays and flat tuples of arrays: Numba's parallel lowering unpacks a tuple handed to the
    # `prange` loop one level deep, and a tuple of tuples failed there ("scalar type Tuple(...) given for non
    # scalar argument")
    h, q, k, v, qr, qn, kn, kr, att, o, x1, g, u, o2, acts, acts_a, acts_h, acts_f = _quant_scratch(
        x, wqs[0].shape[0], wks[0].shape[0], wvs[0].shape[0], wgs[0].shape[0], heads, head_dim, kcs[0].shape[1],
        need_any,
    )  # fmt: skip
    hn = np.empty_like(x)
    acts_n = _act_buffers(M, H, lm_need[0], lm_need[1])
    logits = np.empty((M, lm_head.shape[0]), np.float32)
    lm_size = _claim_size(lm_head.shape[0], lm_head.shape[1], workers)
    ctr = np.zeros(2 * (QUANT_PHASES * L + 2) * LINE, np.int64)
    for _ in prange(workers):
        _quant_step_phases(ctr, chunks, sizes, x, in_norms, wqs, wks, wvs, wqs8, wks8, wvs8, q_norms, k_norms, wos,
                           wos8, post_norms, wgs, wus, wgs8, wus8, wds, wds8, kinds, need, cos, sin, kcs, vcs, mask,
                           pos, eps, qk_norm, starts_qkv, starts_o, starts_gu, starts_d, h, q, k, v, qr, qn, kn, kr,
                           att, o, x1, g, u, o2, acts, acts_a, acts_h, acts_f, norm, lm_kind, lm_head, lm_head8,
                           lm_starts, lm_size, lm_need, logits, hn, acts_n)  # fmt: skip
    return logits


def _one_kind(arrays) -> bool:  # one Numba type for all: a typed List holds one
    return len({(a.dtype, a.ndim, a.flags.c_contiguous, a.flags.writeable) for a in arrays}) == 1


@njit(cache=True)
def _list_start(a):  # a typed List holding `a`
    out = List()
    out.append(a)
    return out


@njit(cache=True)
def _list_append(out, a):
    out.append(a)


def _list(arrays) -> List:  # a typed List of arrays of one Numba type
    # built by two saved kernels, not by List's own methods from Python: those are compiled in every process
    # (Numba does not save them), and that compile starts LLVM's optimizer (~30 MiB resident, ~2 s) in a process
    # whose every other kernel loads from the cache (kernel_cache.install_lean_start)
    arrays = iter(arrays)
    out = _list_start(next(arrays))
    for a in arrays:
        _list_append(out, a)
    return out


class _Plan:
    """A model's per-layer Lists for `_step_bf16_region`, built once per weights (they never change)."""

    def __init__(self, weights):
        f32 = np.float32
        layers = weights.layers
        self.ok = all(hasattr(ly.mlp, "up_proj") and not hasattr(ly.mlp, "router") for ly in layers)
        mats = [(ly.attn.q_proj, ly.attn.k_proj, ly.attn.v_proj, ly.attn.o_proj, ly.mlp.gate_proj,
                 ly.mlp.up_proj, ly.mlp.down_proj) for ly in layers] if self.ok else []  # fmt: skip
        self.ok = self.ok and isinstance(weights.lm_head, BF16Weight)
        self.ok = self.ok and all(isinstance(w, BF16Weight) for ws in mats for w in ws)
        if not self.ok:
            return
        bits = [tuple(w.bits for w in ws) for ws in mats]
        norms = [
            tuple(
                np.asarray(a, f32)
                for a in (ly.input_norm, ly.post_attention_norm, ly.attn.q_norm, ly.attn.k_norm)
            )
            for ly in layers
        ]
        self.norm = np.asarray(weights.norm, f32)
        self.lm_head = weights.lm_head.bits
        shapes = {tuple(a.shape for a in b) for b in bits}
        self.ok = (
            len(shapes) == 1  # every layer the same shapes: one plan of chunks for all
            and _one_kind([a for b in bits for a in b])
            and _one_kind([a for n in norms for a in n])
            and all(a.shape[1] % 2 == 0 for a in (*bits[0][:4], bits[0][6], self.lm_head))
            and self.lm_head.flags.c_contiguous
            and self.lm_head.shape[1] == bits[0][0].shape[1]
        )
        if not self.ok:
            return
        self.layers = len(bits)
        self.wqs, self.wks, self.wvs, self.wos, self.wgs, self.wus, self.wds = (
            _list(b[i] for b in bits) for i in range(7)
        )
        self.in_norms, self.post_norms, self.q_norms, self.k_norms = (
            _list(n[i] for n in norms) for i in range(4)
        )
        # the per-layer Lists in the order both bf16 regions (one row, a batch of rows) take them
        self.region_layers = (self.in_norms, self.wqs, self.wks, self.wvs, self.q_norms, self.k_norms, self.wos,
                              self.post_norms, self.wgs, self.wus, self.wds)  # fmt: skip
        wq, wk, wv, wo, wg, wu, wd = bits[0]
        self.shapes = bits[0]
        self.starts = (
            _starts((wq.shape[0], wk.shape[0], wv.shape[0])),
            _starts((wo.shape[0],)),
            _starts((wd.shape[0],)),
        )
        self.lm_starts = _starts((self.lm_head.shape[0],))


class _QuantPlan:
    """A quantized model's per-layer Lists for `_step_quant_region` ("int8"), built once per weights."""

    def __init__(self, weights):
        f32 = np.float32
        layers = weights.layers
        self.chunk_plans = {}  # (kv heads, CHUNK_BYTES) -> (chunks, sizes) [L, 11] x2
        self.ok = all(hasattr(ly.mlp, "up_proj") and not hasattr(ly.mlp, "router") for ly in layers)
        mats = [(ly.attn.q_proj, ly.attn.k_proj, ly.attn.v_proj, ly.attn.o_proj, ly.mlp.gate_proj,
                 ly.mlp.up_proj, ly.mlp.down_proj) for ly in layers] if self.ok else []  # fmt: skip
        lm = weights.lm_head
        self.ok = self.ok and isinstance(lm, QuantWeight) and lm.ndim == 2
        self.ok = self.ok and all(isinstance(w, QuantWeight) and w.ndim == 2 for ws in mats for w in ws)
        if not self.ok:
            return
        norms = [
            tuple(
                np.asarray(a, f32)
                for a in (ly.input_norm, ly.post_attention_norm, ly.attn.q_norm, ly.attn.k_norm)
            )
            for ly in layers
        ]
        shapes = {tuple(w.shape for w in ws) for ws in mats}
        datas = [w.data for ws in mats for w in ws] + [lm.data]
        self.ok = (
            len(shapes) == 1  # every layer the same shapes (its formats may differ)
            and _one_kind(datas)
            and _one_kind([w.data8 for ws in mats for w in ws] + [lm.data8])
            and _one_kind([a for n in norms for a in n])
            and lm.shape[1] == mats[0][0].shape[1]
        )
        if not self.ok:
            return
        self.layers = len(mats)
        self.data = tuple(_list(ws[i].data for ws in mats) for i in range(7))  # q, k, v, o, gate, up, down
        self.data8 = tuple(_list(ws[i].data8 for ws in mats) for i in range(7))
        self.in_norms, self.post_norms, self.q_norms, self.k_norms = (
            _list(n[i] for n in norms) for i in range(4)
        )
        self.kinds = np.array([[w.kind for w in ws] for ws in mats], np.int64)
        self.need = np.array(
            [
                [
                    *_needs({wq.kind, wk.kind, wv.kind}),
                    *_needs({wo.kind}),
                    *_needs({wg.kind, wu.kind}),
                    *_needs({wd.kind}),
                ]
                for wq, wk, wv, wo, wg, wu, wd in mats
            ]
        )
        self.need_any = self.need.any(axis=0)
        self.mats = mats
        wq, wk, wv, wo, wg, wu, wd = mats[0]
        self.starts = (
            _starts((wq.shape[0], wk.shape[0], wv.shape[0])),
            _starts((wo.shape[0],)),
            _starts((wg.shape[0], wu.shape[0])),
            _starts((wd.shape[0],)),
        )
        self.norm = np.asarray(weights.norm, f32)
        self.lm_kind = np.array([lm.kind], np.int64)
        self.lm_head, self.lm_head8 = lm.data, lm.data8
        self.lm_starts = _starts((lm.shape[0],))
        self.lm_need = np.array(_needs({lm.kind}))

    def chunk_plan(self, Hkv: int) -> tuple[np.ndarray, np.ndarray]:  # -> chunks, sizes [L, 11]: each layer's
        key = (Hkv, _dl.CHUNK_BYTES)
        if key not in self.chunk_plans:
            plans = [_quant_plan(1, ws, Hkv) for ws in self.mats]
            self.chunk_plans[key] = np.stack([c for c, _ in plans]), np.stack([s for _, s in plans])
        return self.chunk_plans[key]


# built once per model's weights and once per KV cache, keyed by id and dropped when that object goes (a weak
# reference: the Lists hold the arrays, which must not outlive their model or cache)
_plans: dict[int, tuple] = {}
_quant_plans: dict[int, tuple] = {}
_caches: dict[int, tuple] = {}


def _parts(weights) -> list:  # every object the plan was built from, in order
    parts = [weights.lm_head, weights.norm]
    for ly in weights.layers:
        a, f = ly.attn, ly.mlp
        parts += [ly.input_norm, ly.post_attention_norm, a.q_norm, a.k_norm, a.q_proj, a.k_proj, a.v_proj]
        parts += [a.o_proj, f, getattr(f, "gate_proj", None), getattr(f, "up_proj", None)]
        parts.append(getattr(f, "down_proj", None))
    return parts


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _remembered(table: dict, obj, build, parts):
    # the value built from `obj`, rebuilt when any of its parts was replaced since (a weight swapped in place)
    key = id(obj)
    got = table.get(key)
    if got is None or got[0]() is not obj or not _same(got[1], parts):
        got = table[key] = (weakref.ref(obj, lambda _, key=key: table.pop(key, None)), parts, build(obj))
    return got[2]


def _plan(weights, parts: list | None = None) -> _Plan:
    return _remembered(_plans, weights, _Plan, _parts(weights) if parts is None else parts)


def _quant_plan_of(weights, parts: list | None = None) -> _QuantPlan:
    return _remembered(_quant_plans, weights, _QuantPlan, _parts(weights) if parts is None else parts)


def _cache_lists(cache) -> tuple:  # (keys, values) of a KVCache as typed Lists
    parts = [*cache.keys, *cache.values]
    return _remembered(_caches, cache, lambda c: (_list(c.keys), _list(c.values)), parts)


def decode_step(
    x, weights, cos, sin, mask, cache, config, bf16_inputs: bool = False, quant_gemv: str = "int8"
):
    """[B, 1, H] embedded token -> [B, 1, V] logits of the whole step, every layer's k and v written into `cache`
    at its length (the model advances it); None where this path does not apply (see the module docstring)."""
    B, T, H = x.shape
    if not (WHOLE_STEP and _dl.ONE_REGION) or T != 1 or cache is None:
        return None
    if hasattr(cache, "lengths"):  # a server's batch of rows, each at its own length
        return _batch_step(x, weights, cos, sin, mask, cache, config, bf16_inputs)
    # "medium" (bf16_inputs) on a lone row: this step's float32 products, unrounded. One row reads each weight once,
    # so the step is memory-bound and bf16 products would buy nothing, and PyTorch's "medium" (whose name this
    # is) permits bf16 only where it pays; rounding x instead sent the row kernel by kernel: 47 ms a token against
    # 34 on this step (a quiet serving run, Qwen3-0.6B-shaped bf16, one client)
    if B != 1 or not hasattr(cache, "keys"):
        return None  # a KVCache (one length for all rows) only, as decode_layer
    if not isinstance(mask, np.ndarray):
        return None
    keys = cache.keys
    if not keys[0].flags.c_contiguous or keys[0].dtype == np.float16 or not _one_kind(keys + cache.values):
        return None
    parts = _parts(weights)  # (~400 objects for 28 layers: gathered once per step)
    plan = _plan(weights, parts)
    if not plan.ok:
        if quant_gemv == "int8" and QUANT_STEP:
            return _quant_step(x, weights, cos, sin, mask, cache, config, parts)
        return None
    if len(keys) != plan.layers:
        return None
    kcs, vcs = _cache_lists(cache)
    f32 = np.float32
    wq, wk, wv, wo, wg, wu, wd = plan.shapes
    chunks, sizes = _bf16_plan(B, H, wq, wk, wv, wo, wg, wd, keys[0].shape[1])
    logits = _step_bf16_region(
        np.ascontiguousarray(x.reshape(B, H), f32),
        *plan.region_layers,
        *_position_args(cos, sin, kcs, vcs, mask, cache.length, config),
        *plan.starts,
        chunks,
        sizes,
        plan.norm,
        plan.lm_head,
        plan.lm_starts,
        _dl._workers(),
    )
    return logits.reshape(B, 1, -1)


def _quant_step(
    x, weights, cos, sin, mask, cache, config, parts
):  # decode_step for quantized weights, "int8"
    B, _, H = x.shape
    keys = cache.keys
    plan = _quant_plan_of(weights, parts)
    if not plan.ok or len(keys) != plan.layers:
        return None
    chunks, sizes = plan.chunk_plan(keys[0].shape[1])
    kcs, vcs = _cache_lists(cache)
    f32 = np.float32
    wq, wk, wv, wo, wg, wu, wd = plan.data
    wq8, wk8, wv8, wo8, wg8, wu8, wd8 = plan.data8
    logits = _step_quant_region(
        np.ascontiguousarray(x.reshape(B, H), f32),
        plan.in_norms,
        wq,
        wk,
        wv,
        wq8,
        wk8,
        wv8,
        plan.q_norms,
        plan.k_norms,
        wo,
        wo8,
        plan.post_norms,
        wg,
        wu,
        wg8,
        wu8,
        wd,
        wd8,
        plan.kinds,
        plan.need,
        plan.need_any,
        *_position_args(cos, sin, kcs, vcs, mask, cache.length, config),
        *plan.starts,
        chunks,
        sizes,
        plan.norm,
        plan.lm_kind,
        plan.lm_head,
        plan.lm_head8,
        plan.lm_starts,
        plan.lm_need,
        _dl._workers(),
    )
    return logits.reshape(B, 1, -1)


# ---- a server's batched step: 2 .. GEMV_MAX_ROWS rows of a RaggedKVCache (each its own length), one region
#
# A 16-row step of Qwen3-0.6B ran layer by layer and kernel by kernel: ~11 calls from Python per layer, five of
# them parallel launches (q/k/v, o, the MLP's two halves; attention on one thread under 32 MiB of keys and values),
# each a fork and a join whose prange splits its rows evenly over the threads, so that a thread another process
# holds up holds the whole launch up. Here the step is one region as the one-row step above: each thread runs the
# layers' 9 phases (the same as _bf16_phases, on M rows: the products on decode_tiles.py's 4 x 6 tile rows, the
# ragged cache write at each row's own length, attention one (row, kv head) pair per chunk over both threads), then
# the final norm and the lm_head's rows, every chunk claimed through the counters (phases.py). The same serial
# kernels as the kernel-by-kernel path on the same rows (the tiles' sums do not depend on which chunk holds a
# row), so the logits are bit-identical to it (tests/test_batching.py checks this).
# Measured (Qwen3-0.6B-shaped random bf16, 16 rows at 160-167 positions of a written pool, 2 shared cores at load
# 2.3-3.9, same process, interleaved, best of 5-7): 177 ms per step (177 ms CPU) against 238 (237) kernel by
# kernel, 1.34x; with a Python thread holding the GIL ~2 ms of every 3 (a server's event loop) 284 against 391 ms.
# Through HTTP (benchmarks/bench_serve.py, 16 clients, decode workload, 4 runs each alternated, load 3.2-4.0):
# ITL p50 100 / 187 / 317 / 360 ms against 332 / 342 / 352 / 368, 112 / 70 / 51 / 42 tok/s against
# 44 / 42 / 41 / 40; the server's model threads 29-31 s of CPU against 31-35 for the same tokens.
BATCH_STEP = True  # False: a batched step layer by layer, kernel by kernel
BATCH_CHUNK_BYTES = 96 << 10  # weight bytes per product chunk: 48 rows of 1024 bf16, ~40 us of 16-row tiles
LM_CHUNK_ROWS = 192  # lm_head rows per chunk (a multiple of 6): 792 chunks of Qwen3's 151,936


@njit(cache=True)
def _ragged_rope_store(q, k, v, q_norm, k_norm, eps, qk_norm, cos, sin, kc, vc, lengths, q_out, qn, kn, kr):
    # decode_layer._qk_rope_store with row m's new position at its own length: q [M, Hq·d], k/v [M, Hkv·d] ->
    # q_out [M, Hq, d]; k (normed, rotated) and v written into rows 0 .. M - 1 of the whole caches at lengths[m]
    for m in range(q.shape[0]):  # one row at a time: the same kernel, row m's slices, its own position
        s = slice(m, m + 1)
        _qk_rope_store(q[s], k[s], v[s], q_norm, k_norm, eps, qk_norm, cos[s], sin[s], kc[s], vc[s], lengths[m],
                       q_out[s], qn, kn, kr)  # fmt: skip


# "medium" (bf16_inputs) takes the same region where linear.py's kernel-by-kernel step would take the vdpbf16ps
# tiles (decode_tiles.DPBF16_TILES, linear.BATCH_DPBF16, every inner size fitting them): `rb`, three uint16
# buffers, then holds each product's input rounded to bf16 (nearest, ties to even, as intrinsics.round_bf16) and
# the products read them, and the weights, as uint32 pairs. The same roundings as that path: the input norm's
# output before q/k/v, attention's output before o_proj, the post-attention norm's before gate/up, h = SiLU(g)·u
# (rounded by the gate/up tiles themselves) before down, the final norm's before the lm_head; a serial phase rounds
# whole rows, an attention chunk the (row, kv head) slice it wrote. So the logits are bit-identical to that path's
# (tests/test_batching.py; a truncation in place of any one of the roundings there fails it). `rb` None
# ("highest"): Numba prunes the `rb is None` branches by the argument's type before typing them, so the float32
# step's code holds no vdpbf16ps (its LLVM IR: 0 calls, the medium one's 72) and an AVX-512 host without
# AVX512-BF16 compiles it as before.
# Measured (benchmarks/bench_batch_decode.py --medium: Qwen3-0.6B-shaped random bf16, 16 rows at 128 positions of
# a written pool, 2 shared cores at load 3.7-4.4, same process, interleaved, best of 6, three runs): "medium" in
# one region 194 / 187 ms per step (wall) and 131 ms (CPU) against 284 / 275 and 186 kernel by kernel (1.46 /
# 1.47 / 1.42x), and against "highest"'s region 267 / 260 and 174 (1.38 / 1.39 / 1.33x); the same logits as
# kernel by kernel on that model too.


@njit(cache=True)
def _round_into(x, bits, m0, m1, lo, hi):  # bits[m0:m1, lo:hi] = x's values there as bf16 bit patterns
    for m in range(m0, m1):
        for j in range(lo, hi):
            bits[m, j] = _to_bf16(x[m, j])


@njit(cache=True)
def _batch_phases(ctr, chunks, sizes, x, in_norm, wqkv, q_norm, k_norm, wo, post_norm, wg, wu, wd, cos, sin, kc, vc,
                  mask, lengths, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k, v, qr, qn, kn, kr, att, o,
                  x1, g, o2, rb):  # fmt: skip
    # one thread's run through one layer's 9 phases on M rows (chunks [9], sizes [9]: rows per chunk, multiples
    # of the tiles' 6 weight rows, 3 gate/up pairs); x [M, H] is the layer's input and, after phase 8, its output.
    # rb: None, or "medium"'s bf16 inputs (hb [M, H], ab [M, Hq·d], gb [M, F]) u16 (see the note above)
    M = x.shape[0]
    Hkv = kc.shape[1]
    S = mask.shape[1]
    att2 = att.reshape((M, att.shape[1] * att.shape[2]))
    width = att2.shape[1] // Hkv  # one kv head's group of query heads in a row of att2
    u32 = np.uint32
    for p in range(9):
        if p > 0:
            wait_finished(ctr, p - 1, chunks[p - 1])
        while True:
            c = claim(ctr, p)
            if c >= chunks[p]:
                break
            lo = c * sizes[p]
            if p == 0:
                _rms_norm(x, in_norm, eps, h)
                if rb is not None:
                    _round_into(h, rb[0], 0, M, 0, h.shape[1])
            elif p == 1:
                hi = min(starts_qkv[-1], lo + sizes[p])
                if rb is None:
                    _gemm6_rows_bf16(h, wqkv, (q, k, v), starts_qkv, lo, hi)
                else:
                    w32 = (wqkv[0].view(u32), wqkv[1].view(u32), wqkv[2].view(u32))
                    _gemm6_rows_dpbf16(rb[0].view(u32), w32, (q, k, v), starts_qkv, lo, hi)
            elif p == 2:
                _ragged_rope_store(
                    q, k, v, q_norm, k_norm, eps, qk_norm, cos, sin, kc, vc, lengths, qr, qn, kn, kr
                )
            elif p == 3:
                _attend_group(qr, kc, vc, mask, att, c // Hkv, c % Hkv, S)
                if rb is not None:
                    row, head = c // Hkv, c % Hkv
                    _round_into(att2, rb[1], row, row + 1, head * width, (head + 1) * width)
            elif p == 4:
                hi = min(starts_o[-1], lo + sizes[p])
                if rb is None:
                    _gemm6_rows_bf16(att2, (wo,), (o,), starts_o, lo, hi)
                else:
                    _gemm6_rows_dpbf16(rb[1].view(u32), (wo.view(u32),), (o,), starts_o, lo, hi)
            elif p == 5:
                _add(x, o, x1)
                _rms_norm(x1, post_norm, eps, h)
                if rb is not None:
                    _round_into(h, rb[0], 0, M, 0, h.shape[1])
            elif p == 6:
                hi = min(wg.shape[0], lo + sizes[p])
                if rb is None:
                    _gate_up6_rows_bf16(h, wg, wu, g, lo, hi)
                else:  # h = SiLU(g)·u rounded to bf16 into gb
                    _gate_up6_rows_dpbf16(rb[0].view(u32), wg.view(u32), wu.view(u32), rb[2], lo, hi)
            elif p == 7:
                hi = min(starts_d[-1], lo + sizes[p])
                if rb is None:
                    _gemm6_rows_bf16(g, (wd,), (o2,), starts_d, lo, hi)
                else:
                    _gemm6_rows_dpbf16(rb[2].view(u32), (wd.view(u32),), (o2,), starts_d, lo, hi)
            else:
                _add(x1, o2, x)
            finish(ctr, p)


@njit(cache=True)
def _batch_step_phases(ctr, chunks, sizes, x, in_norms, wqs, wks, wvs, q_norms, k_norms, wos, post_norms, wgs, wus,
                       wds, cos, sin, kcs, vcs, mask, lengths, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k,
                       v, qr, qn, kn, kr, att, o, x1, g, o2, norm, lm_head, lm_starts, lm_size, logits, hn,
                       rb):  # fmt: skip
    # _step_phases for M rows: L layers of _batch_phases, the final norm (phase 9·L), the lm_head's rows
    L = len(wqs)
    per = 2 * LAYER_PHASES * LINE
    for layer in range(L):
        c = ctr[layer * per : (layer + 1) * per]
        if layer > 0:
            wait_finished(ctr[(layer - 1) * per : layer * per], LAYER_PHASES - 1, 1)
        _batch_phases(c, chunks, sizes, x, in_norms[layer], (wqs[layer], wks[layer], wvs[layer]), q_norms[layer],
                      k_norms[layer], wos[layer], post_norms[layer], wgs[layer], wus[layer], wds[layer], cos, sin,
                      kcs[layer], vcs[layer], mask, lengths, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k,
                      v, qr, qn, kn, kr, att, o, x1, g, o2, rb)  # fmt: skip
    tail = ctr[L * per :]
    wait_finished(ctr[(L - 1) * per : L * per], LAYER_PHASES - 1, 1)
    if claim(tail, 0) == 0:
        _rms_norm(x, norm, eps, hn)
        if rb is not None:  # "medium": the lm_head's input rounded too, as linear.py's medium lm_head
            _round_into(hn, rb[0], 0, hn.shape[0], 0, hn.shape[1])
        finish(tail, 0)
    wait_finished(tail, 0, 1)
    total = lm_starts[-1]
    while True:
        lo = claim(tail, 1) * lm_size
        if lo >= total:
            break
        hi = min(total, lo + lm_size)
        if rb is None:
            _gemm6_rows_bf16(hn, (lm_head,), (logits,), lm_starts, lo, hi)
        else:
            u32 = np.uint32
            _gemm6_rows_dpbf16(rb[0].view(u32), (lm_head.view(u32),), (logits,), lm_starts, lo, hi)
        finish(tail, 1)


@njit(parallel=True, cache=True, nogil=True)
def _batch_step_region(x_in, in_norms, wqs, wks, wvs, q_norms, k_norms, wos, post_norms, wgs, wus, wds, cos, sin,
                       kcs, vcs, mask, lengths, eps, qk_norm, heads, head_dim, starts_qkv, starts_o, starts_d, chunks,
                       sizes, norm, lm_head, lm_starts, lm_size, workers, rb):  # fmt: skip
    # x_in [M, H] f32 (the embedded tokens) -> logits [M, V]; kcs, vcs: every layer's whole cache [R ≥ M, Hkv,
    # max_len, d] (rows 0 .. M - 1 are the step's); mask [M, S]; lengths [M]: where each row's new position goes;
    # rb: None ("highest"), or "medium"'s bf16 inputs (hb [M, H], ab [M, Hq·d], gb [M, F]) u16, scratch
    M, H = x_in.shape
    x = x_in.copy()
    h, q, k, v, qr, qn, kn, kr, att, o, x1 = _attention_scratch(
        x, wqs[0].shape[0], wks[0].shape[0], wvs[0].shape[0], heads, head_dim, kcs[0].shape[1]
    )
    g = np.empty((M, wgs[0].shape[0]), np.float32)
    o2 = np.empty((M, H), np.float32)
    hn = np.empty_like(x)
    logits = np.empty((M, lm_head.shape[0]), np.float32)
    ctr = np.zeros(2 * (LAYER_PHASES * len(wqs) + 2) * LINE, np.int64)
    for _ in prange(workers):
        _batch_step_phases(ctr, chunks, sizes, x, in_norms, wqs, wks, wvs, q_norms, k_norms, wos, post_norms, wgs,
                           wus, wds, cos, sin, kcs, vcs, mask, lengths, eps, qk_norm, starts_qkv, starts_o, starts_d,
                           h, q, k, v, qr, qn, kn, kr, att, o, x1, g, o2, norm, lm_head, lm_starts, lm_size, logits,
                           hn, rb)  # fmt: skip
    return logits


def _tile_rows(rows: int, row_bytes: int, multiple: int) -> tuple[int, int]:  # -> (chunks, rows per chunk)
    size = max(1, min(rows, BATCH_CHUNK_BYTES // max(1, row_bytes)))
    size += -size % multiple
    return -(-rows // size), size


def _batch_plan(
    M: int, wq, wk, wv, wo, wg, wd, Hkv: int
) -> tuple[np.ndarray, np.ndarray]:  # chunks, sizes [9]
    plan = [
        (1, 1),  # input norm
        _tile_rows(wq.shape[0] + wk.shape[0] + wv.shape[0], wq.shape[1] * 2, 6),
        (1, 1),  # QK-Norm, RoPE, the cache writes
        (M * Hkv, 1),  # attention: one (row, kv head) pair per chunk
        _tile_rows(wo.shape[0], wo.shape[1] * 2, 6),
        (1, 1),  # residual, post-attention norm
        # three gate/up pairs per tile, six rows a chunk: "medium"'s h holds bf16 pairs, each uint32 then written
        # by one chunk (as decode_tiles.swiglu_dpbf16 splits it)
        _tile_rows(wg.shape[0], wg.shape[1] * 4, 6),
        _tile_rows(wd.shape[0], wd.shape[1] * 2, 6),
        (1, 1),  # residual
    ]
    return np.array([c for c, _ in plan], np.int64), np.array([s for _, s in plan], np.int64)


def _ragged_cache_lists(base) -> tuple:  # (keys, values) of a ragged cache's whole KVCache as typed Lists
    # the pool's arrays are `_Pool` views (kv_cache.py): handed over as plain ndarrays of the same memory
    parts = [*base.keys, *base.values]
    return _remembered(
        _caches,
        base,
        lambda c: tuple(_list(a.view(np.ndarray) for a in store) for store in (c.keys, c.values)),
        parts,
    )


def _batch_step(x, weights, cos, sin, mask, cache, config, bf16_inputs: bool = False):
    # decode_step for a RaggedKVCache of 2 .. GEMV_MAX_ROWS rows from row 0 (a server's decoding rows), bf16
    # weights on the 4 x 6 tiles as linear.py would run them (not its panels; "medium": its vdpbf16ps tiles);
    # None where that does not hold
    from tinyqwen.backends.numba import decode_tiles, linear

    B, _, H = x.shape
    base = getattr(cache, "base", None)
    if (
        not BATCH_STEP
        or not 2 <= B <= linear.GEMV_MAX_ROWS
        or not (linear.BATCH_TILES and decode_tiles.WIDE_TILES)
        or linear.BATCH_PANELS
        or getattr(cache, "first", None) != 0
        or base is None
        or not hasattr(base, "keys")
    ):
        return None
    keys = base.keys
    if not isinstance(keys[0], np.ndarray) or not keys[0].flags.c_contiguous or keys[0].dtype == np.float16:
        return None
    if not _one_kind([a.view(np.ndarray) for a in keys + base.values]) or not isinstance(mask, np.ndarray):
        return None
    plan = _plan(weights)
    if not plan.ok or len(keys) != plan.layers:
        return None
    wq, wk, wv, wo, wg, wu, wd = plan.shapes
    rb = None
    if bf16_inputs:  # "medium": where linear.py's step takes the vdpbf16ps tiles for every product
        if not (
            linear.BATCH_DPBF16
            and decode_tiles.dpbf16_fits(H, wo.shape[1], wd.shape[1])
            and all(a.flags.c_contiguous for a in plan.shapes)  # (every layer's as layer 0's: _one_kind)
        ):
            return None
        u16 = np.uint16
        rb = (np.empty((B, H), u16), np.empty((B, wo.shape[1]), u16), np.empty((B, wg.shape[0]), u16))
    kcs, vcs = _ragged_cache_lists(base)
    chunks, sizes = _batch_plan(B, wq, wk, wv, wo, wg, wd, keys[0].shape[1])
    f32 = np.float32
    logits = _batch_step_region(
        np.ascontiguousarray(x.reshape(B, H), f32),
        *plan.region_layers,
        np.ascontiguousarray(cos[:, 0]),
        np.ascontiguousarray(sin[:, 0]),
        kcs,
        vcs,
        np.ascontiguousarray(mask[:, 0]),
        np.ascontiguousarray(cache.lengths, np.int64),
        f32(config.rms_norm_eps),
        config.qk_norm,
        config.num_attention_heads,
        config.head_dim,
        *plan.starts,
        chunks,
        sizes,
        plan.norm,
        plan.lm_head,
        plan.lm_starts,
        LM_CHUNK_ROWS,
        _dl._workers(),
        rb,
    )
    return logits.reshape(B, 1, -1)
