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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyqwen.errors import TinyQwenError
from tinyqwen.verify import transformers_available


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
path, ids_file, new_tokens, threads, out_file = sys.argv[1:6]
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
    if not transformers_available():
        raise TinyQwenError('the transformers peer needs: pip install "tinyqwen[crosscheck]"')
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="tinyqwen-bench-") as tmp:
        ids_file, out_file = Path(tmp) / "ids.npz", Path(tmp) / "timing.npz"
        np.savez(ids_file, prompt=prompt)
        args = [str(path), str(ids_file), str(new_tokens), str(threads), str(out_file)]
        run = subprocess.run([sys.executable, "-c", _PEER_SCRIPT, *args], capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise TinyQwenError(f"transformers could not run the checkpoint {path}: {last}")
        with np.load(out_file) as t:
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
