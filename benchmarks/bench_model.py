"""Prefill and decode speed of tinyqwen against Hugging Face transformers (the peer), measured in the same run.

    python benchmarks/full_size_check.py /tmp/qwen3-0.6b-random --keep     # a random Qwen3-0.6B, exact config
    python benchmarks/bench_model.py --model /tmp/qwen3-0.6b-random [--prompt-tokens 128] [--new-tokens 32]

Both engines run float32 on the CPU with the same thread count, greedy, a KV cache, the same random prompt; each
is timed `--repeat` times, alternating, and the best run is kept. Host timings swing 30-50% between runs, so read
the *ratios*, not the absolute numbers. The peer needs `pip install "tinyqwen[crosscheck]"`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import tinyqwen
from tinyqwen.bench import Timing, format_report, time_tinyqwen, time_transformers


def best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.prefill_s + t.decode_s)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    model = tinyqwen.load_model(args.model, backend=args.backend)
    prompt = np.random.default_rng(0).integers(0, min(model.config.vocab_size, 151643), args.prompt_tokens)
    time_tinyqwen(model, prompt[:8], 2)  # warm-up: first touch of memory-mapped weights, BLAS start-up
    ours, peer = [], []
    for _ in range(args.repeat):
        ours.append(time_tinyqwen(model, prompt, args.new_tokens))
        peer.append(time_transformers(model.path, prompt, args.new_tokens, args.threads))
    print(f"{os.cpu_count()} cores, {args.threads} threads, best of {args.repeat}")
    print(format_report([best(ours), best(peer)]))


if __name__ == "__main__":
    main()
