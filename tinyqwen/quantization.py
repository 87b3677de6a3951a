"""Block quantization as llama.cpp defines it: Q8_0, Q4_K and Q6_K, byte for byte.

A quantized weight matrix is not an array of numbers but an array of *blocks*. Each block holds a few scales in
float16 and many small integers; a weight is `scale * integer` (minus a `min` for Q4_K). llama.cpp's GGUF files
store each row of a matrix as its blocks, one after another, so a row of 1024 weights in Q8_0 is 32 blocks of 34
bytes (1088 bytes instead of 2048 in bf16).

    Q8_0  32 weights in 34 bytes (8.5 bits per weight)
          [ d: float16 ][ q[0..31]: int8 ]                      w[i] = d * q[i]

    Q4_K  256 weights in 144 bytes (4.5 bits per weight): a "super-block" of 8 sub-blocks of 32
          [ d: float16 ][ dmin: float16 ][ scales: 12 bytes ][ qs: 128 bytes ]
          the 12 bytes pack 8 six-bit scales sc[j] and 8 six-bit mins m[j]; each qs byte holds two 4-bit q's
          w = (d * sc[j]) * q - (dmin * m[j])                    for weight i of sub-block j, q in 0..15

    Q6_K  256 weights in 210 bytes (6.5625 bits per weight): 16 sub-blocks of 16
          [ ql: 128 bytes ][ qh: 64 bytes ][ scales: 16 int8 ][ d: float16 ]
          a 6-bit q = 4 low bits from ql | 2 high bits from qh, minus 32
          w = (d * scales[j]) * q                                for weight i of sub-block j, q in -32..31

Where the bits sit (the "interleaving") follows llama.cpp's `ggml-quants.c`, because the GGUF files people have were
written by it: in Q4_K, the 64 weights 64*k .. 64*k+63 share the 32 bytes qs[32k .. 32k+31], the first 32 weights in
the low nibbles and the next 32 in the high ones. In Q6_K's half-blocks of 128, weight l, l+32, l+64, l+96 share
qh[l] (2 bits each) and ql[l], ql[l+32] hold the low nibbles (l and l+64 in ql[l]; l+32 and l+96 in ql[l+32]).

Q4_K's 12 scale bytes, for sub-block j (6 bits each for sc and m):

    j < 4:   sc = b[j] & 63                       m = b[j+4] & 63
    j >= 4:  sc = (b[j+4] & 15) | (b[j-4] >> 6) << 4      m = (b[j+4] >> 4) | (b[j] >> 6) << 4

Dequantization here is bit-for-bit what llama.cpp (and its Python package `gguf`) computes: float32 products in the
same order, `(d * sc) * q - dmin * m`. The quantizers follow llama.cpp's reference quantizers
(`quantize_row_q8_0_ref`, `quantize_row_q4_K_ref` with its `make_qkx2_quants` search for the best scale and min,
`quantize_row_q6_K_ref` with `make_qx_quants`), float32 operations in the same order, accumulations one term at a
time, vectorized over blocks instead of looping over them.

>>> x = np.linspace(-1, 1, 32, dtype=np.float32)
>>> blocks = quantize_q8_0(x)
>>> blocks.shape, blocks.dtype
((34,), dtype('uint8'))
>>> float(np.abs(dequantize_q8_0(blocks) - x).max()) < 1 / 127
True

A `QuantizedTensor` is a weight matrix that stays in its blocks: the model multiplies with it one layer at a time
(`dequantize()` widens only that matrix, the numpy reference), or a backend's kernels read the blocks directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK8_0 = 32  # weights per Q8_0 block
QK_K = 256  # weights per K-quant super-block

BLOCK_BYTES = {"q8_0": 34, "q4_k": 144, "q6_k": 210}
BLOCK_VALUES = {"q8_0": 32, "q4_k": 256, "q6_k": 256}

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# The tensor type
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight matrix kept in llama.cpp's blocks, never widened whole.

    `shape` is (out_features, in_features) = (rows, cols), the Hugging Face orientation of a Linear weight, so
    `y = x @ W.T` as for every float weight in tinyqwen. `data` is uint8 [rows, cols // BLOCK_VALUES * BLOCK_BYTES]:
    row r's blocks, in order (usually a view of the memory-mapped GGUF file, so nothing is read until used).

    A MoE expert stack is one QuantizedTensor too: shape (E, rows, cols), data uint8 [E, rows, bytes per row].

    >>> w = np.arange(64, dtype=np.float32).reshape(2, 32) / 64
    >>> q = QuantizedTensor.quantize(w, "q8_0")
    >>> q.shape, q.data.shape, q.nbytes
    ((2, 32), (2, 34), 68)
    >>> bool(np.abs(q.dequantize() - w).max() < 0.004)
    True
    """

    qtype: str  # "q8_0" | "q4_k" | "q6_k"
    shape: tuple[int, ...]  # (rows, cols), or (E, rows, cols) for an expert stack
    data: np.ndarray  # uint8 [..., rows, cols // BLOCK_VALUES[qtype] * BLOCK_BYTES[qtype]]

    def __post_init__(self):
        if self.qtype not in BLOCK_BYTES:
            raise ValueError(
                f"unknown quantization type {self.qtype!r} (supported: {', '.join(BLOCK_BYTES)})"
            )
        cols = self.shape[-1]
        if cols % BLOCK_VALUES[self.qtype]:
            raise ValueError(
                f"{self.qtype}: a row of {cols} weights is not a whole number of {BLOCK_VALUES[self.qtype]}-weight blocks"
            )
        expected = (*self.shape[:-1], row_bytes(self.qtype, cols))
        if tuple(self.data.shape) != expected or self.data.dtype != np.uint8:
            raise ValueError(
                f"{self.qtype} {self.shape}: data must be uint8 {expected}, got {self.data.dtype} {self.data.shape}"
            )

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)  # what dequantize() gives, and what the matrix stands for

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:  # -> [*shape] float32
        """The whole matrix in float32 (llama.cpp's exact values)."""
        return DEQUANTIZE[self.qtype](self.data)

    def __getitem__(self, index) -> QuantizedTensor:
        """Expert e of a stack (`stack[e]`), or a slice of rows: still in blocks."""
        data = self.data[index]
        return QuantizedTensor(self.qtype, (*data.shape[:-1], self.shape[-1]), data)

    @staticmethod
    def quantize(x: np.ndarray, qtype: str) -> QuantizedTensor:
        """Quantize a float matrix [..., rows, cols] (cols a multiple of the block size) into blocks."""
        x = np.asarray(x, dtype=np.float32)
        return QuantizedTensor(qtype, tuple(x.shape), QUANTIZE[qtype](x))

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.qtype}, shape={self.shape}, {self.nbytes} bytes)"


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of `cols` weights: 1024 weights in q8_0 are 32 blocks of 34 bytes = 1088."""
    return cols // BLOCK_VALUES[qtype] * BLOCK_BYTES[qtype]


def _blocks(raw: np.ndarray, qtype: str) -> np.ndarray:  # uint8 [..., n*B] -> uint8 [N, B]
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"{qtype} blocks must be uint8, got {raw.dtype}")
    size = BLOCK_BYTES[qtype]
    if raw.ndim == 0 or raw.shape[-1] % size:
        raise ValueError(f"{qtype}: the last axis ({raw.shape}) must be a whole number of {size}-byte blocks")
    return np.ascontiguousarray(raw).reshape(-1, size)


def _f16(
    raw: np.ndarray,
) -> np.ndarray:  # uint8 [N, 2] -> float32 [N]: a little-endian float16, widened exactly
    return np.ascontiguousarray(raw).view("<f2")[:, 0].astype(F32)


# ---------------------------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------------------------


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:  # uint8 [..., n*34] -> float32 [..., n*32]
    """Q8_0 blocks to float32: w = d * q, the float16 scale widened and multiplied in float32.

    >>> b = np.zeros(34, np.uint8); b[:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8); b[2:5] = [1, 2, 255]
    >>> dequantize_q8_0(b)[:4]
    array([ 0.5,  1. , -0.5,  0. ], dtype=float32)
    """
    b = _blocks(blocks, "q8_0")
    d = _f16(b[:, :2])
    q = b[:, 2:].view(np.int8).astype(F32)
    out = d[:, None] * q
    return out.reshape(*np.shape(blocks)[:-1], -1)


def q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # uint8 [N, 12] -> 2 x uint8 [N, 8]
    """Unpack Q4_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (llama.cpp's `get_scale_min_k4`)."""
    s = scales.astype(np.uint8)
    sc = np.empty((len(s), 8), np.uint8)
    m = np.empty((len(s), 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _pack_q4_k_scales(
    sc: np.ndarray, m: np.ndarray
) -> np.ndarray:  # 2 x uint8 [N, 8] (values < 64) -> [N, 12]
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:  # uint8 [..., n*144] -> float32 [..., n*256]
    """Q4_K super-blocks to float32: w = (d * sc[j]) * q - dmin * m[j], for sub-block j of 32 weights."""
    b = _blocks(blocks, "q4_k")
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = q4_k_scales(b[:, 4:16])
    scale = d[:, None] * sc.astype(F32)  # [N, 8]
    offset = dmin[:, None] * m.astype(F32)  # [N, 8]
    qs = b[:, 16:].reshape(
        -1, 4, 1, 32
    )  # 4 groups of 32 bytes, each holding sub-blocks 2k (low) and 2k+1 (high)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(F32)
    out = scale[:, :, None] * q - offset[:, :, None]
    return out.reshape(*np.shape(blocks)[:-1], -1)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:  # uint8 [..., n*210] -> float32 [..., n*256]
    """Q6_K super-blocks to float32: w = (d * scales[j]) * (q - 32), for sub-block j of 16 weights."""
    b = _blocks(blocks, "q6_k")
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # [N, half, ql[l] or ql[l+32], l]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)  # [N, half, 1, l]
    scales = b[:, 192:208].view(np.int8).astype(F32)  # [N, 16]
    d = _f16(b[:, 208:210])
    # Within a half of 128: the four 32-runs take low nibble of ql[l], of ql[l+32], high nibble of ql[l], of ql[l+32]
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [N, half, 4, 32]
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # [N, half, 4, 32]
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(F32).reshape(-1, 16, 16)
    out = (d[:, None] * scales)[:, :, None] * q
    return out.reshape(*np.shape(blocks)[:-1], -1)


DEQUANTIZE = {"q8_0": dequantize_q8_0, "q4_k": dequantize_q4_k, "q6_k": dequantize_q6_k}


# ---------------------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------------------


def _values(
    x: np.ndarray, per_block: int, name: str
) -> np.ndarray:  # float [..., n*per_block] -> f32 [N, per]
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % per_block:
        raise ValueError(f"{name}: the last axis ({x.shape}) must be a multiple of {per_block}")
    return np.ascontiguousarray(x).reshape(-1, per_block)


def _f16_bytes(v: np.ndarray) -> np.ndarray:  # float32 [N] -> uint8 [N, 2]: rounded to float16, nearest-even
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    # llama.cpp's nearest_int adds 1.5 * 2**23 and reads the low mantissa bits: round half to even, like rint
    return np.rint(v).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    # C's roundf: halves away from zero (unlike rint)
    return np.sign(v) * np.floor(np.abs(v) + F32(0.5))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:  # float32 [..., n*32] -> uint8 [..., n*34]
    """Absmax quantization of blocks of 32: d = max|x| / 127, q = round(x / d) (llama.cpp's `quantize_row_q8_0_ref`).

    >>> b = quantize_q8_0(np.full(32, 0.5, np.float32))
    >>> float(np.frombuffer(b[:2].tobytes(), np.float16)[0]), b[2:5].view(np.int8)
    (0.003936767578125, array([127, 127, 127], dtype=int8))
    """
    v = _values(x, QK8_0, "q8_0")
    amax = np.abs(v).max(axis=1)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    q = _roundf(v * inv[:, None]).astype(np.int8)
    out = np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)
    return out.reshape(*np.shape(x)[:-1], -1)


def _sum_rows(a: np.ndarray) -> np.ndarray:  # float32 [n, N] -> [N]: ((a[0] + a[1]) + a[2]) + ...
    # C's `for (i...) sum += term[i]`, one term at a time. NumPy reduces along a non-contiguous axis row by row in
    # this order (its pairwise summation applies only along the contiguous axis), so the float32 result is C's.
    return np.add.reduce(a, axis=0, dtype=F32)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's `make_qkx2_quants`, vectorized over sub-blocks: the scale and min of an affine `scale*L + min`
    fit minimizing the weighted squared error, searched over nstep+1 trial scales.

    x, w: float32 [n, N] — transposed, one row per position in the sub-block, so that the C loop over the n
    positions is a loop over contiguous rows (N sub-blocks at once). Returns (scale [N], the_min [N] = -min >= 0,
    L uint8 [n, N] in 0..nmax). Every sum is accumulated one term at a time, in the C loop's order.
    """
    n, N = x.shape
    fmax = F32(nmax)
    lo = x.min(axis=0)
    hi = x.max(axis=0)
    sum_w, sum_x = _sum_rows(w), _sum_rows(w * x)
    lo = np.minimum(lo, F32(0))
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo)  # flat sub-blocks are answered separately below
    shifted = x - lo  # x[i] - min, as the C loop computes it for every trial
    iscale = fmax / span
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale * shifted), 0, nmax).astype(F32)
    diff = scale * L + lo - x
    best = _sum_rows(w * (diff * diff))
    mn = lo.copy()
    for step in range(nstep + 1):
        trial = (F32(rmin) + F32(rdelta) * F32(step) + fmax) / span
        Laux = np.clip(_nearest_int(trial * shifted), 0, nmax).astype(F32)
        wl = w * Laux
        sum_l, sum_l2, sum_xl = _sum_rows(wl), _sum_rows(wl * Laux), _sum_rows(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, F32(0), this_min)
        diff = this_scale * Laux + this_min - x
        cur = _sum_rows(w * (diff * diff))
        better = ok & (cur < best)
        L[:, better] = Laux[:, better]
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale).astype(F32)
    mn = np.where(flat, lo, mn).astype(F32)
    L[:, flat] = 0
    return scale, -mn, L.astype(np.uint8)


CHUNK = 4096  # super-blocks quantized at once: the temporaries stay a few MB, whatever the matrix


def quantize_q4_k(x: np.ndarray) -> np.ndarray:  # float32 [..., n*256] -> uint8 [..., n*144]
    """llama.cpp's `quantize_row_q4_K_ref`: per sub-block of 32, the best affine 4-bit fit (`make_qkx2_quants`,
    weights av|x| + |x_i|), then the 8 scales and 8 mins themselves quantized to 6 bits against the super-block's
    float16 d and dmin, and the 4-bit values recomputed with those rounded scales.
    """
    v = _values(x, QK_K, "q4_k")
    out = (
        np.concatenate([_q4_k_blocks(v[i : i + CHUNK]) for i in range(0, len(v), CHUNK)])
        if len(v)
        else v[:, :0]
    )
    return out.astype(np.uint8).reshape(*np.shape(x)[:-1], -1)


def _q4_k_blocks(v: np.ndarray) -> np.ndarray:  # float32 [B, 256] -> uint8 [B, 144]
    B = len(v)
    sub = np.ascontiguousarray(v.reshape(B * 8, 32).T)  # [32, B*8]: position i of every sub-block in row i
    sum_x2 = _sum_rows(sub * sub)
    av_x = np.sqrt(sum_x2 / F32(32))
    weights = av_x + np.abs(sub)
    scales, mins, L = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.T.reshape(B, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    d = d16.astype(F32)[:, None] * ls.astype(F32)  # [B, 8]
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    live = d != 0  # a sub-block whose rounded scale is 0 keeps the search's values, as in C
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((v.reshape(B, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, 15)
    L = np.where(live[:, :, None], requant.astype(np.uint8), L)
    Lg = L.reshape(B, 4, 2, 32)  # groups of 64 weights: low nibbles hold the first 32, high nibbles the next
    qs = (Lg[:, :, 0] | (Lg[:, :, 1] << 4)).reshape(B, 128)
    return np.concatenate(
        [
            d16.view(np.uint8).reshape(B, 2),
            dmin16.view(np.uint8).reshape(B, 2),
            _pack_q4_k_scales(ls, lm),
            qs,
        ],
        axis=1,
    )


GROUP_MAX_EPS = F32(1e-15)


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int):
    """llama.cpp's `make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`, vectorized over sub-blocks: a symmetric
    scale for q in -nmax..nmax-1, the best of 19 trial scales by the x²-weighted least-squares criterion.

    x: float32 [n, N], transposed as in `_make_qkx2_quants`. Returns (scale [N], L uint8 [n, N] = q + nmax; all 0
    for an all-zero sub-block).
    """
    n, N = x.shape
    fmax = F32(nmax)
    ax = np.abs(x)
    at = ax.argmax(axis=0)  # the first largest |x|, as the C loop's strict '>'
    amax = ax[at, np.arange(N)]
    top = x[at, np.arange(N)]
    zero = amax < GROUP_MAX_EPS
    top = np.where(zero, F32(1), top)
    w = x * x
    wx = w * x  # the C loop's w*x[i], before the *l

    def trial(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        return l, _sum_rows(wx * l), _sum_rows(w * l * l)

    iscale = F32(-nmax) / top
    l, sumlx, suml2 = trial(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + F32(0.1) * F32(step)) / top
        l_try, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        l[:, better] = l_try[:, better]
        scale = np.where(better, new_scale, scale).astype(F32)
        best = np.where(better, scale * sumlx, best).astype(F32)
    L = (l + fmax).astype(np.uint8)
    L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def quantize_q6_k(x: np.ndarray) -> np.ndarray:  # float32 [..., n*256] -> uint8 [..., n*210]
    """llama.cpp's `quantize_row_q6_K_ref`: a symmetric 6-bit scale per sub-block of 16 (`make_qx_quants`), the 16
    scales quantized to int8 against the super-block's float16 d, then the 6-bit values recomputed with them.
    """
    v = _values(x, QK_K, "q6_k")
    out = (
        np.concatenate([_q6_k_blocks(v[i : i + CHUNK]) for i in range(0, len(v), CHUNK)])
        if len(v)
        else v[:, :0]
    )
    return out.astype(np.uint8).reshape(*np.shape(x)[:-1], -1)


def _q6_k_blocks(v: np.ndarray) -> np.ndarray:  # float32 [B, 256] -> uint8 [B, 210]
    B = len(v)
    scales, L = _make_qx_quants_rmse1(np.ascontiguousarray(v.reshape(B * 16, 16).T), 32)
    scales, L = scales.reshape(B, 16), L.T.reshape(B, 16, 16)
    abs_scales = np.abs(scales)
    at = abs_scales.argmax(axis=1)  # first largest |scale|, the C loop's strict '>'
    max_abs = abs_scales[np.arange(B), at]
    max_scale = scales[np.arange(B), at]
    empty = max_abs < GROUP_MAX_EPS
    max_scale = np.where(empty, F32(1), max_scale)
    iscale = F32(-128) / max_scale
    d16 = (F32(1) / iscale).astype(np.float16)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)  # [B, 16]
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    live = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(v.reshape(B, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where(live[:, :, None], requant.astype(np.uint8), L).reshape(B, 2, 4, 32)  # [B, half, run, l]
    ql = np.concatenate(
        [L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], 2
    )
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate(
        [ql.reshape(B, 128), qh.reshape(B, 64), sc.view(np.uint8), d16.view(np.uint8).reshape(B, 2)], axis=1
    )
    out[empty] = 0  # an all-zero super-block is written as zero bytes (d = +0.0)
    return out


QUANTIZE = {"q8_0": quantize_q8_0, "q4_k": quantize_q4_k, "q6_k": quantize_q6_k}
