"""Prefill and decode speed of tinyqwen against Hugging Face transformers (the peer), measured in the same run.

    python benchmarks/full_size_check.py /tmp/qwen3-0.6b-random --keep     # a random Qwen3-0.6B, exact config
    python benchmarks/bench_model.py --model /tmp/qwen3-0.6b-random [--prompt-tokens 128] [--new-tokens 32]

Both engines run float32 on the CPU with the same thread count, greedy, a KV cache, the same random prompt. Host
timings swing 30-50% between runs, so read the *ratios* printed at the end, not the absolute numbers. The peer
needs `pip install torch==2.13.0 transformers`; without it only tinyqwen is timed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import tinyqwen


def time_tinyqwen(model, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    cache = model.new_cache(1, prompt.size + new_tokens + 1)
    start = time.perf_counter()
    token = model.forward(prompt[None], cache=cache, last_only=True).logits[:, -1].argmax(-1)[:, None]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model.forward(token, cache=cache, last_only=True).logits[:, -1].argmax(-1)[:, None]
    return prefill, time.perf_counter() - start


def time_transformers(
    path: str, prompt: np.ndarray, new_tokens: int, threads: int
) -> tuple[float, float, str]:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompt[None]).long()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - start
    return prefill, decode, transformers.__version__


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    model = tinyqwen.load_model(args.model, backend=args.backend)
    prompt = np.random.default_rng(0).integers(0, min(model.config.vocab_size, 151643), args.prompt_tokens)
    time_tinyqwen(model, prompt[:8], 2)  # warm-up: first-touch of memory-mapped weights, BLAS start-up
    ours = time_tinyqwen(model, prompt, args.new_tokens)
    rows = [(f"tinyqwen ({args.backend}, fp32)", *ours)]
    try:
        p, d, version = time_transformers(args.model, prompt, args.new_tokens, args.threads)
        rows.append((f"transformers {version} (fp32)", p, d))
    except ImportError:
        print(
            "transformers/torch not installed: timing tinyqwen only (pip install torch==2.13.0 transformers)"
        )

    print(f"{'engine':34s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, prefill, decode in rows:
        print(f"{name:34s} {args.prompt_tokens / prefill:14.1f} {args.new_tokens / decode:13.2f}")
    if len(rows) == 2:
        (_, p0, d0), (_, p1, d1) = rows
        print(f"ratio tinyqwen / transformers: prefill {p1 / p0:.2f}x, decode {d1 / d0:.2f}x")


if __name__ == "__main__":
    main()
