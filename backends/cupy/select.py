"""filter_sample_rows (backends/cuda/filter.cu) in NumPy: float64 values as order-preserving uint64 keys, the
radix select that finds top-k's and top-p's cut one byte at a time, and one row of the filter + draw.
"""

from __future__ import annotations

import numpy as np

FILTER_THREADS = 1024  # TQ_FILTER_THREADS in filter.cu
MASS_ONE = 2.0**60  # TQ_MASS_ONE in filter.cu: a probability of 1 in fixed point
SLACK = 1e-9  # tinyqwen.sampling's rounding slack for top-p and min-p
_SIGN = np.uint64(1 << 63)
ALL_TIES = 0x7FFFFFFF  # TQ_ALL_TIES: no cut inside the tokens equal to the cut's value


def order_keys(x: np.ndarray) -> np.ndarray:
    """float64 values -> uint64 keys that sort like them (order_key in filter.cu); -0.0 and +0.0 share one key.

    >>> order_keys(np.array([-2.0, -0.0, 0.0, 1.5])).argsort().tolist()  # same order as the values
    [0, 1, 2, 3]
    >>> bool(order_keys(np.array([-0.0]))[0] == order_keys(np.array([0.0]))[0])
    True
    """  # [...] float64 -> [...] uint64
    bits = (np.asarray(x, np.float64) + 0.0).view(np.uint64)
    return np.where(bits >> np.uint64(63) == 1, ~bits, bits | _SIGN)


def key_value(key: int) -> float:
    """The float64 value whose key (order_keys) is `key`."""
    bits = key & ((1 << 63) - 1) if key >> 63 else ~key & ((1 << 64) - 1)
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def radix_select_kth(keys: np.ndarray, k: int, trace: list[int] | None = None) -> int:
    """The key of the k-th largest value (ties counted), one byte at a time from the most significant.

    Each pass histograms the next byte of the keys still matching the bytes fixed so far, then walks the 256 bins
    from the largest down until it has seen k keys: the k-th largest lies in that bin.

    >>> keys = order_keys(np.array([3.0, 1.0, 3.0, 2.0]))
    >>> key_value(radix_select_kth(keys, 2)), key_value(radix_select_kth(keys, 3))
    (3.0, 2.0)
    >>> trace = []; _ = radix_select_kth(keys, 3, trace); trace  # candidates histogrammed in each pass
    [4, 3, 1, 1, 1, 1, 1, 1]
    """  # [n] uint64, 1 <= k <= n -> key
    prefix, fixed, needed = 0, 0, k
    for shift in range(56, -1, -8):
        live = keys[(keys & np.uint64(fixed)) == np.uint64(prefix)]
        if trace is not None:
            trace.append(int(live.size))
        bins = np.bincount(((live >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), minlength=256)
        d = 255
        while bins[d] < needed:
            needed -= int(bins[d])
            d -= 1
        prefix |= d << shift
        fixed |= 255 << shift
    return prefix


def radix_select_mass(keys: np.ndarray, mass: np.ndarray, reach: int) -> tuple[int, int, int, int]:
    """Top-p's cut: the key of the last token (by value desc) whose mass *before* it is < `reach`.

    Like radix_select_kth, but the bins carry the candidates' (fixed-point) probability mass, and the walk keeps
    the last bin whose first token still has less than `reach` before it. Returns (the cut's key, the mass above
    it, how many tokens equal it, their mass). Integer masses: exact, whatever the order of the sums.

    >>> keys, mass = order_keys(np.array([0.5, 0.3, 0.2])), np.array([50, 30, 20], np.uint64)
    >>> cut, above, ties, tie_mass = radix_select_mass(keys, mass, 80)  # 50 + 30 reaches 80: 0.3 is the last
    >>> key_value(cut), above, ties, tie_mass
    (0.3, 50, 1, 30)
    """  # [n] uint64 keys, [n] uint64 masses, reach > 0 -> (key, mass above, count, mass of the ties)
    prefix, fixed, above = 0, 0, 0
    for shift in range(56, -1, -8):
        live = (keys & np.uint64(fixed)) == np.uint64(prefix)
        digit = ((keys[live] >> np.uint64(shift)) & np.uint64(255)).astype(np.int64)
        bins = np.bincount(digit, minlength=256)
        bin_mass = np.zeros(256, np.uint64)
        np.add.at(bin_mass, digit, mass[live])
        before, chosen = above, -1
        for d in range(255, -1, -1):
            if before >= reach:
                break
            if bins[d]:
                chosen, above_chosen = d, before
                before += int(bin_mass[d])
        prefix |= chosen << shift
        fixed |= 255 << shift
        above, count, count_mass = above_chosen, int(bins[chosen]), int(bin_mass[chosen])
    return prefix, above, count, count_mass


def filter_sample_row(x: np.ndarray, top_k: int, top_p: float, min_p: float, greedy: bool, u: float) -> int:
    """One row of filter_sample_rows: the same steps, in NumPy (tinyqwen.sampling.sample's rules, found by radix
    select instead of a sort). x: the penalised logits / T in float64; u: the host generator's uniform number.

    >>> x = np.log(np.array([0.1, 0.5, 0.15, 0.25]))
    >>> [filter_sample_row(x, 0, 0.7, 0.0, False, u) for u in (0.0, 0.6, 0.99)]  # top-p 0.7 keeps 0.5 and 0.25
    [1, 1, 3]
    """  # [V] float64 -> id
    V = x.size
    m = x.max()
    if greedy:
        return int(np.flatnonzero(x == m)[0])
    e = np.exp(x - m)
    keys = order_keys(x)
    key_k = radix_select_kth(keys, top_k) if 0 < top_k < V else 0  # top-k: every value >= the k-th stays
    in_k = keys >= np.uint64(key_k)
    key_p, keep_ties, e_cut = key_k, ALL_TIES, 0.0
    if top_p < 1.0:  # top-p over the top-k survivors, in fixed point
        total = e[in_k].sum()
        mass = np.where(in_k, np.rint(e / total * MASS_ONE), 0.0).astype(np.uint64)
        reach = top_p - SLACK
        if reach <= 0:
            key_p, keep_ties = int(order_keys(np.array([m]))[0]), 1
        else:
            P = int(np.ceil(reach * MASS_ONE))
            key_p, above, ties, tie_mass = radix_select_mass(keys[in_k], mass[in_k], P)
            q = tie_mass // ties
            keep_ties = (
                ties if q == 0 else min(ties, -(-(P - above) // q))
            )  # the i-th tie stays while above + i·q < P
        e_cut = np.exp(key_value(key_p) - m)
    tie = keys == np.uint64(key_p)
    rank = np.cumsum(tie) - tie  # a tie's rank by id
    keep = (keys > np.uint64(key_p)) | (tie & (rank < keep_ties))
    if min_p > 0.0:  # min-p over the top-p survivors
        if keep_ties != ALL_TIES:
            S = e[keys > np.uint64(key_p)].sum() + keep_ties * e_cut
        else:
            S = e[keys >= np.uint64(key_p)].sum()
        keep &= e / S >= min_p * (1.0 / S) * (1.0 - SLACK)
    # the inverse CDF in id order, summed the kernel's way: one contiguous chunk of ids per thread
    chunk = -(-V // FILTER_THREADS)
    w = np.zeros(FILTER_THREADS * chunk)
    w[:V] = np.where(keep, e, 0.0)
    chunk_total = np.cumsum(w.reshape(FILTER_THREADS, chunk), axis=1)[
        :, -1
    ]  # sequential sums, as the threads
    before = np.cumsum(chunk_total)  # thread 0's running sum over the chunks
    target = u * before[-1]
    for c in np.flatnonzero(before > target)[:1]:
        ids = np.flatnonzero(keep[c * chunk : (c + 1) * chunk]) + c * chunk
        running = np.cumsum(np.concatenate([[before[c - 1] if c else 0.0], e[ids]]))[1:]
        crossed = np.flatnonzero(running > target)
        return int(ids[crossed[0]] if crossed.size else ids[-1])
    return int(np.flatnonzero(keep)[-1])  # u·total rounded up to the total: the last kept id
