"""Generation throughput: prefill and decode tokens per second, single prompt vs a batch, greedy vs sampled.

    python benchmarks/bench_generate.py --model path/to/checkpoint [--prompt-tokens 128] [--new-tokens 32]

Prints one line per setting. Random prompt ids, eos off, so every run decodes exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tinyqwen
from tinyqwen.generation import generate_batch
from tinyqwen.sampling import THINKING


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    model = tinyqwen.load_model(args.model, backend=args.backend)
    vocab = min(model.config.vocab_size, 151643)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, args.prompt_tokens).tolist() for _ in range(args.batch)]

    start = time.perf_counter()
    tinyqwen.generate(model, prompts[0], 1, eos_token_ids=())
    prefill = time.perf_counter() - start
    print(f"prefill  {args.prompt_tokens} tokens: {args.prompt_tokens / prefill:8.1f} tok/s")

    for label, batch, kwargs in [
        ("greedy   batch 1", 1, {}),
        (f"greedy   batch {args.batch}", args.batch, {}),
        ("thinking preset, batch 1", 1, {"params": THINKING, "temperature": THINKING.temperature, "seed": 0}),
    ]:
        start = time.perf_counter()
        generate_batch(model, prompts[:batch], args.new_tokens, eos_token_ids=(), **kwargs)
        total = time.perf_counter() - start - prefill * batch  # approximate: remove the prefill share
        print(f"{label:26s}: {batch * args.new_tokens / total:8.1f} new tok/s (decode)")


if __name__ == "__main__":
    main()
