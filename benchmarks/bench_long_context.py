"""Long-context prefill benchmark: time and peak RSS against what `tinyqwen info` predicts.

    python benchmarks/bench_long_context.py [--layers 28] [--prompt-tokens 8192 32768] [--kv-dtype bfloat16]
                                            [--chunk 2048] [--backend numpy] [--out DIR] [--json]

The checkpoint has Qwen3-0.6B's exact config.json (tinyqwen/data/configs/Qwen3-0.6B.json: 28 layers, hidden 1024,
16 query / 8 kv heads, head_dim 128, ffn 3072, vocab 151,936, tied) with random BF16 weights (normal, std 0.02;
norms 1), written to --out (default $TINYQWEN_PEER_DIR/qwen3-0.6b-random-<N>layers; never commit it) on the first run and reused.
`--layers N` cuts it to its first N layers: the same shapes, so the memory *per layer* (weights and KV cache) and
the activations of one chunk are those of the full model; time scales with the layers (see the results note).

Each prompt length runs in a fresh child process: load the checkpoint, then reset the kernel's peak-RSS counter
(`/proc/self/clear_refs` ← 5, so loading's own peak — the bf16 file mapped while it is widened — does not count),
allocate a KV cache for the prompt, prefill the random prompt in chunks (`last_only=True`, as generation does) and
read the peak (VmHWM). The prediction is `tinyqwen.kv_cache.memory_estimate` — the numbers `tinyqwen info
--context N` prints — for the same context, cache dtype, chunk and backend.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tinyqwen" / "data" / "configs" / "Qwen3-0.6B.json"


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> Path:
    """Random BF16 weights for Qwen3-0.6B's config cut to `layers` layers, one model.safetensors."""
    sys.path.insert(0, str(REPO))
    from tinyqwen.config import config_from_dict, expected_tensors
    from tinyqwen.safetensors import save_file

    config = json.loads(CONFIG.read_text())
    config.update(num_hidden_layers=layers, max_window_layers=layers)
    shapes = expected_tensors(config_from_dict(config))
    rng = np.random.default_rng(seed)
    tensors = {
        name: np.ones(shape, np.float32)
        if name.endswith("norm.weight")
        else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        for name, shape in shapes.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"}, bf16=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # written last: marks it complete
    return out


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str, tokens: int, kv_dtype: str, chunk: int, backend: str) -> dict:
    """Runs in the child process: load, reset the peak, prefill, measure."""
    import tinyqwen
    from tinyqwen.kv_cache import memory_estimate

    t = time.perf_counter()
    model = tinyqwen.load_model(path, backend=backend)
    load_s = time.perf_counter() - t
    load_peak = status_kib("VmHWM") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    after_load = status_kib("VmRSS") * 1024
    ids = np.random.default_rng(0).integers(0, 151643, (1, tokens))
    t = time.perf_counter()
    cache = model.new_cache(1, tokens, dtype=kv_dtype)
    for start in range(0, tokens, chunk):
        out = model.forward(ids[:, start : start + chunk], cache=cache, last_only=True)
    prefill_s = time.perf_counter() - t
    assert np.isfinite(out.logits).all()
    peak = status_kib("VmHWM") * 1024
    weight_bytes = None if backend == "numpy" else sum(_resident(model.weights))
    predicted = memory_estimate(model.config, tokens, kv_dtype, chunk=chunk, weight_bytes=weight_bytes)
    return {
        "prompt_tokens": tokens,
        "layers": model.config.num_hidden_layers,
        "kv_dtype": kv_dtype,
        "chunk": chunk,
        "backend": backend,
        "load_s": round(load_s, 2),
        "prefill_s": round(prefill_s, 2),
        "prefill_tok_s": round(tokens / prefill_s, 1),
        "rss_after_load": after_load,
        "peak_rss_prefill": peak,
        "peak_rss_loading": load_peak,
        "kv_cache_bytes": cache.nbytes,
        "predicted": predicted,
        "predicted_total": sum(predicted.values()),
        "peak_over_predicted": round(peak / sum(predicted.values()), 4),
    }


def _resident(weights) -> list[int]:  # bytes of every weight array the backend holds (bf16 stays 2 bytes)
    seen: set[int] = set()
    out = []

    def walk(obj):
        if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
            if id(obj) not in seen:
                seen.add(id(obj))
                out.append(int(obj.nbytes))
        elif isinstance(obj, list):
            for o in obj:
                walk(o)
        elif hasattr(obj, "__dataclass_fields__"):
            for name in obj.__dataclass_fields__:
                walk(getattr(obj, name))

    walk(weights)
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="checkpoint directory (default $TINYQWEN_PEER_DIR/qwen3-0.6b-random-<N>layers)",
    )
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--kv-dtype", default="bfloat16")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (generation's default: 2048)")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--json", action="store_true", help="print the runs as one JSON object")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, tokens, kv_dtype, chunk, backend = args.child
        print(json.dumps(child(path, int(tokens), kv_dtype, int(chunk), backend)))
        return

    folder = os.environ.get("TINYQWEN_PEER_DIR")
    if args.out is None and not folder:
        parser.error(
            "no checkpoint folder: pass --out DIR or set TINYQWEN_PEER_DIR (where it is written, outside the repo)"
        )
    out = args.out or Path(folder) / f"qwen3-0.6b-random-{args.layers}layers"
    if not (out / "config.json").is_file():
        print(f"writing a random {args.layers}-layer Qwen3-0.6B-shaped checkpoint to {out}", file=sys.stderr)
        write_checkpoint(out, args.layers)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for tokens in args.prompt_tokens:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(out),
            str(tokens),
            args.kv_dtype,
            str(args.chunk),
            args.backend,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            sys.exit(f"child failed for {tokens} tokens:\n{done.stderr}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(
            f"{tokens:>6} tokens: prefill {r['prefill_s']:.1f} s, peak RSS {gib(r['peak_rss_prefill'])}, "
            f"predicted {gib(r['predicted_total'])} ({r['peak_over_predicted']:.3f}x)",
            file=sys.stderr,
            flush=True,
        )
    report = {
        "command": " ".join(["python", "benchmarks/bench_long_context.py", *sys.argv[1:]]),
        "checkpoint": str(out),
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"{'tokens':>7} {'layers':>6} {'prefill s':>10} {'tok/s':>7} {'peak RSS':>10} {'predicted':>10} {'ratio':>6}"
    )
    for r in runs:
        print(
            f"{r['prompt_tokens']:>7} {r['layers']:>6} {r['prefill_s']:>10.1f} {r['prefill_tok_s']:>7.1f} "
            f"{gib(r['peak_rss_prefill']):>10} {gib(r['predicted_total']):>10} {r['peak_over_predicted']:>6.3f}"
        )


if __name__ == "__main__":
    main()
