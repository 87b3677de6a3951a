"""Benchmarks: prefill and decode speed, always beside a peer measured in the same run.

Host timings swing 30-50% between runs on a shared machine, so a lone tokens-per-second figure says little; the
ratio to a peer timed moments apart on the same machine says much more. The peer is Hugging Face transformers
(float32, CPU), run in a child process — tinyqwen never imports torch — with the same prompt, the same number of
new tokens, greedy decoding and a KV cache on both sides.

    timings = [time_tinyqwen(model, prompt, 32), time_transformers(model.path, prompt, 32)]
    print(format_report(timings))
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyqwen.verify import run_transformers


@dataclass(frozen=True)
class Timing:
    engine: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_s


def time_tinyqwen(model, prompt: np.ndarray, new_tokens: int) -> Timing:  # prompt [T] ids
    """Greedy: prefill the prompt in one forward pass, then `new_tokens` single-token steps through the cache."""
    cache = model.new_cache(1, prompt.size + new_tokens + 1)
    start = time.perf_counter()
    token = model.forward(prompt[None], cache=cache, last_only=True).logits[:, -1].argmax(-1)[:, None]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model.forward(token, cache=cache, last_only=True).logits[:, -1].argmax(-1)[:, None]
    decode = time.perf_counter() - start
    return Timing(f"tinyqwen ({model.backend.name}, fp32)", prompt.size, new_tokens, prefill, decode)


# The peer, as text: it only ever runs in a child process (imports go through importlib for the same reason).
_PEER_SCRIPT = """
import importlib, sys, time
import numpy as np
torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")
path, ids_file, out_file, new_tokens, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
prompt = np.load(ids_file)["prompt"]
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

def run(ids, n):
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(n):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, time.perf_counter() - start

ids = torch.from_numpy(prompt[None]).long()
run(ids[:, :8], 2)  # warm-up, as on our side
prefill, decode = run(ids, int(new_tokens))
np.savez(out_file, prefill=prefill, decode=decode, version=np.array(transformers.__version__))
"""


def time_transformers(path: Path, prompt: np.ndarray, new_tokens: int, threads: int | None = None) -> Timing:
    """The same measurement with transformers in a child process; TinyQwenError if it is not installed."""
    threads = threads or os.cpu_count() or 1
    t = run_transformers(_PEER_SCRIPT, path, {"prompt": prompt}, new_tokens, threads, needed_for="the peer")
    engine = f"transformers {t['version']} (fp32)"
    return Timing(engine, prompt.size, new_tokens, float(t["prefill"]), float(t["decode"]))


def format_report(timings: list[Timing]) -> str:
    """A table of tokens per second, and each engine's speed relative to the first (tinyqwen)."""
    lines = [f"{'engine':36s} {'prefill tok/s':>14s} {'decode tok/s':>13s}"]
    lines += [f"{t.engine:36s} {t.prefill_tok_s:14.1f} {t.decode_tok_s:13.2f}" for t in timings]
    ours = timings[0]
    for peer in timings[1:]:
        lines.append(
            f"ratio tinyqwen / {peer.engine.split(' (')[0]}: prefill {ours.prefill_tok_s / peer.prefill_tok_s:.2f}x, "
            f"decode {ours.decode_tok_s / peer.decode_tok_s:.2f}x (same run, same prompt; >1 means tinyqwen is faster)"
        )
    return "\n".join(lines)
