"""Decode's roofline on this machine: the bytes a token reads, the memory's read bandwidth, and the floor they set.

A batch-1 decode step reads every weight once (each GEMV row is used for one dot product), so its time is at least
bytes per token / read bandwidth. This prints, for each GGUF (or safetensors) model given:

- bytes per token: every matrix the step reads (q/k/v/o, gate/up/down of each layer; the lm_head, which a tied model
  reads from the token embedding — 151,936 x 1,024 in Qwen3-0.6B, a quarter of the bf16 bytes), in their stored
  format (bf16 2 bytes per weight, Q8_0 34 bytes per 32, Q4_K 144 per 256, Q6_K 210 per 256); the norms and the KV
  cache are small beside them at short contexts and left out;
- the floor, bytes / bandwidth, in ms per token and tok/s;

and, first, the achievable read bandwidth: one pass of a plain streaming sum over a 1 GB array (far beyond the
caches) in Numba, with 1 and 2 threads (each thread its own contiguous half), best of several passes. An engine's
ms per token over the floor tells where its time goes: near 1, the memory; well above, the overheads (launches,
attention, norms, a slow kernel).

    python benchmarks/bench_bandwidth.py [MODEL.gguf ...] [--gb 1] [--threads 1 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@njit(cache=False)
def _sum_part(a, lo, hi):  # the uint64 words lo..hi summed (integer adds: LLVM vectorises them, 4 per vpaddq)
    # over a slice, indexed from 0: `a[i]` for i in range(lo, hi) may be negative as far as LLVM knows (Numba's
    # wraparound), and that loop stayed scalar: 3.3 GB/s against 21 (AMD EPYC Zen 5, 311 MB, one thread)
    part = a[lo:hi]
    s = np.uint64(0)
    for i in range(part.shape[0]):
        s += part[i]
    return s


@njit(parallel=True, cache=False)
def _stream(a, parts):  # one pass over a [n] uint64, split into `parts` contiguous pieces over the threads
    n = a.shape[0]
    size = (n + parts - 1) // parts
    out = np.zeros(parts, np.uint64)
    for p in prange(parts):
        out[p] = _sum_part(a, p * size, min(n, (p + 1) * size))
    return out.sum()


def bandwidth(gb: float, threads: list[int], repeat: int) -> tuple[dict[int, float], float]:
    # -> ({threads: GB/s by wall time}, GB/s of one thread by its own CPU time). On a machine that other processes
    # share, a thread waits for a core as often as for memory: the wall figures then understate the memory; the
    # last one (the sum on the calling thread, timed by time.thread_time: only while it ran) is nearer to it
    a = np.ones(int(gb * 1e9) // 8, np.uint64)  # written once: its pages exist before the timing
    wall = dict.fromkeys(threads, float("inf"))
    cpu = float("inf")
    for t in threads:
        numba.set_num_threads(t)
        _stream(a, t)  # compile, warm
    _sum_part(a, 0, a.shape[0])
    for _ in range(repeat):  # interleaved: a noisy neighbour hits every variant alike
        for t in threads:
            numba.set_num_threads(t)
            t0 = time.perf_counter()
            _stream(a, t)
            wall[t] = min(wall[t], time.perf_counter() - t0)
        c0 = time.thread_time()
        _sum_part(a, 0, a.shape[0])
        cpu = min(cpu, time.thread_time() - c0)
    return {t: a.nbytes / wall[t] / 1e9 for t in threads}, a.nbytes / cpu / 1e9


def bytes_per_token(path: str) -> tuple[float, float]:  # -> (layers' matrices, lm_head) bytes read per token
    from tinyqwen.gguf import GGUFFile

    with GGUFFile(path) as g:
        names = g.tensors
        layers = sum(
            t.nbytes for n, t in names.items() if n.startswith("blk.") and n.split(".")[2] in MATRICES
        )
        head = (names.get("output.weight") or names["token_embd.weight"]).nbytes  # tied: the embedding
    return float(layers), float(head)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*")
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    bw, one = bandwidth(a.gb, a.threads, a.repeat)
    for t, v in bw.items():
        print(f"streaming read, {t} thread(s): {v:5.1f} GB/s by wall time ({a.gb:g} GB, best of {a.repeat})")
    print(f"streaming read, the calling thread, by its CPU time: {one:5.1f} GB/s")
    for path in a.models:
        layers, head = bytes_per_token(path)
        total = layers + head
        print(f"{path.rsplit('/', 1)[-1]}: {total / 1e6:.0f} MB per token ({layers / 1e6:.0f} layers' matrices, "
              f"{head / 1e6:.0f} lm_head = {head / total:.0%})")  # fmt: skip
        for t, w in bw.items():
            ms = total / (w * 1e9) * 1e3
            print(f"  floor at {t} thread(s), wall bandwidth: {ms:5.1f} ms per token = {1e3 / ms:5.1f} tok/s")


if __name__ == "__main__":
    main()
