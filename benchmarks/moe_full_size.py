"""The full-size Qwen3-30B-A3B in Q4_K_M (random weights), on this machine: tinyqwen's numba backend and llama.cpp.

    python benchmarks/moe_full_size.py --peer-python PY [--out FILE.gguf]
        [--prompt-tokens 32 --new-tokens 16] [--keep] [--results FILE.json]

1. Writes the file block by block (`write_gguf`'s LazyTensor: one tensor in memory at a time, the largest an expert
   stack of 165 MB): Qwen3-30B-A3B's exact config (48 layers, 128 experts, top-8, the packaged tokenizer), each
   tensor in the type tinyqwen's Q4_K_M rule gives it (`tinyqwen.quantize.tensor_type`: Q4_K, Q6_K for the lm_head
   and for attn_v / ffn_down_exps in the layers llama.cpp's _M mix picks; norms and the router F32). Quantizing 30 B
   random values would take hours in NumPy, so the blocks are drawn: 4,096 blocks of each type quantized from
   normal(0, 0.02) values by tinyqwen's quantizer, and every tensor filled with blocks picked at random among them
   (real blocks with sane scales, not random bytes). ~18 GB, --out (default $TINYQWEN_PEER_DIR/qwen3-30b-a3b-random-q4_k_m.gguf); deleted at the end
   unless --keep.
2. `tinyqwen info --model FILE --context C` (C = prompt + new + 8): the predicted peak RSS of the numba backend.
3. Runs both engines, one after the other in their own processes (2 threads; greedy from the same random prompt
   ids; one timed run after a short warm-up, see CHILD_ONE_RUN), each with the free memory (MemAvailable) sampled
   while it runs: load time, prefill and decode tok/s, peak RSS, the greedy ids (equal or not) and the KL divergence
   of the next-token distributions over the positions where both engines had the same ids before them.

llama.cpp runs with `use_extra_bufts` off: by default it repacks Q4_K weights into its own interleaved layout in
anonymous memory (its RSS on the 2-layer file is 1.57x the file), which for an 18 GB file would not fit the 24 GB of
this machine; without it, it computes on the mapped file as tinyqwen does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import CHILD, CONFIG, kl_divergence  # noqa: E402

# bench_moe's child times decode as t(1 + N tokens) − t(first token) from two runs, which assumes both prefills take
# the same time; at full size the first prefill also pages in most of 18 GB, so here one run is taken apart instead:
# prefill = the first token's time, decode = the N steps after it (the weights they read already paged in by the
# prefill, as in a chat). The logits of every position are saved for the KL comparison.
CHILD_ONE_RUN = (
    CHILD.split("def run(prompt, k):")[0]
    + r"""
load_s = time.perf_counter() - t0
prompt = [int(x) for x in np.random.default_rng(0).integers(0, min(vocab, 151643), P)]
start(prompt[:8]); step(0)  # warm-up (JIT, caches)
t0 = time.perf_counter()
rows = [start(prompt)]
t1 = time.perf_counter()
ids, steps = [int(rows[0].argmax())], []
while len(ids) < 1 + N:
    rows.append(step(ids[-1])); ids.append(int(rows[-1].argmax())); steps.append(time.perf_counter())
t2 = time.perf_counter()
np.save(logits_out, np.stack(rows).astype(np.float32))
gaps = np.diff([t1] + steps)
print(json.dumps({"prefill": P / (t1 - t0), "decode": N / (t2 - t1), "decode_last_half": (N // 2) / gaps[N - N // 2:].sum(),
                  "step_s": [round(float(g), 3) for g in gaps], "ids": ids, "load_s": load_s,
                  "peak_rss": rss(), "base_rss": base}))
"""
)

TEMPLATE_BLOCKS = 4096

# llama.cpp without its weight repacking (see the module docstring), then bench_moe's child as it is
NO_REPACK = r"""
import llama_cpp.llama_cpp as _ll
_default = _ll.llama_model_default_params
def _no_repack():
    p = _default()
    p.use_extra_bufts = False
    return p
_ll.llama_model_default_params = _no_repack
"""


def write_full_size(path: Path, layers: int | None = None, seed: int = 0) -> dict:
    """Write the random full-size Qwen3-30B-A3B Q4_K_M file (`layers`: fewer, for a quick try); returns its
    tensor type counts."""
    from tinyqwen.config import config_from_dict, expected_tensors
    from tinyqwen.gguf import LazyTensor, write_gguf
    from tinyqwen.gguf_checkpoint import gguf_name
    from tinyqwen.quantization import BLOCK_BYTES, QuantizedTensor, quantize_q4_k, quantize_q6_k
    from tinyqwen.quantize import _gguf_order, model_metadata, tensor_type, tokenizer_metadata
    from tinyqwen.tokenizer import DATA_DIR, Tokenizer

    raw = json.loads(CONFIG.read_text())
    if layers is not None:
        raw.update(num_hidden_layers=layers, max_window_layers=layers)
    config = config_from_dict(raw)
    metadata = model_metadata(config, "q4_k_m", path.stem)
    metadata |= tokenizer_metadata(Tokenizer.qwen3(), config.vocab_size, DATA_DIR)
    shapes = {gguf_name(n): s for n, s in expected_tensors(config).items() if ".experts." not in n}
    E, F, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
    for i in range(config.num_hidden_layers):
        shapes[f"blk.{i}.ffn_gate_exps.weight"] = shapes[f"blk.{i}.ffn_up_exps.weight"] = (E, F, H)
        shapes[f"blk.{i}.ffn_down_exps.weight"] = (E, H, F)
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((TEMPLATE_BLOCKS, 256), np.float32) * np.float32(0.02)
    templates = {"q4_k": quantize_q4_k(values), "q6_k": quantize_q6_k(values)}  # [T, block bytes] each
    counts: dict[str, int] = {}

    def tensor(name: str, shape: tuple[int, ...]) -> LazyTensor:
        kind = tensor_type(name, shape, config, "q4_k_m")
        counts[kind] = counts.get(kind, 0) + 1
        local = np.random.default_rng([seed, len(counts), sum(counts.values())])
        if kind == "F32":
            if len(shape) == 1:  # the norms' weights: 1, as a freshly initialised model
                return LazyTensor("F32", shape, lambda: np.ones(shape, np.float32))
            return LazyTensor("F32", shape, lambda: local.standard_normal(shape, np.float32) * 0.02)
        qtype = kind.lower()
        if qtype not in templates:
            raise SystemExit(f"{name}: type {kind} has no template blocks (shape {shape})")

        def make():
            blocks = int(np.prod(shape)) // 256
            picked = templates[qtype][local.integers(0, TEMPLATE_BLOCKS, blocks)]
            return QuantizedTensor(
                qtype, shape, picked.reshape(*shape[:-1], shape[-1] // 256 * BLOCK_BYTES[qtype])
            )

        return LazyTensor(kind, shape, make)

    tensors = {n: tensor(n, s) for n, s in sorted(shapes.items(), key=lambda kv: _gguf_order(kv[0]))}
    write_gguf(path, metadata, tensors)  # (to PATH.partial, renamed when complete)
    return counts


def run_engine(python: str, engine: str, path: Path, args, logits_out: Path) -> dict:
    """bench_moe's child for one engine, with the smallest MemAvailable seen while it ran."""
    env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                          "NUMBA_NUM_THREADS"), str(args.threads))}  # fmt: skip
    child = (NO_REPACK if engine == "llama.cpp" else "") + CHILD_ONE_RUN
    sizes = (args.prompt_tokens, args.new_tokens, 1, args.threads, 0)
    cmd = [python, "-c", child, engine, str(path), *map(str, sizes), str(logits_out)]
    low = [available()]
    done_flag = threading.Event()

    def watch():
        while not done_flag.wait(1.0):
            low[0] = min(low[0], available())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    done_flag.set()
    watcher.join()
    out = (
        {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        if done.returncode
        else json.loads(done.stdout.strip().splitlines()[-1])
    )
    out["wall_s"] = time.perf_counter() - t0
    out["min_mem_available_gb"] = low[0] / 1e9
    return out


def available() -> int:  # MemAvailable, bytes
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="a python with llama-cpp-python")
    folder = os.environ.get("TINYQWEN_PEER_DIR")
    parser.add_argument(
        "--out",
        type=Path,
        default=folder and Path(folder) / "qwen3-30b-a3b-random-q4_k_m.gguf",
        help="the file written (default: $TINYQWEN_PEER_DIR/qwen3-30b-a3b-random-q4_k_m.gguf)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--layers", type=int, help="fewer layers than the model's 48 (a quick try of the script)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the file (18 GB) after the run")
    parser.add_argument("--results", type=Path, help="also write the report as JSON here")
    args = parser.parse_args()
    if args.out is None:
        parser.error(
            "no --out: pass the file to write or set TINYQWEN_PEER_DIR (a folder outside the repo, ~18 GB free)"
        )
    report: dict = {
        "command": " ".join(sys.argv),
        "mem_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9,
    }
    path = args.out
    try:
        if not path.is_file():
            t = time.perf_counter()
            # in a child process: the engines' processes are started from this one, and a child's peak RSS
            # (getrusage) starts at its parent's resident size, which the writing would have raised
            code = (
                "import json, sys; sys.path.insert(0, sys.argv[1]); from moe_full_size import write_full_size; "
                "print(json.dumps(write_full_size(__import__('pathlib').Path(sys.argv[2]), "
                "None if sys.argv[3] == 'None' else int(sys.argv[3]))))"
            )
            here = str(Path(__file__).resolve().parent)
            done = subprocess.run(
                [sys.executable, "-c", code, here, str(path), str(args.layers)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise SystemExit(f"writing {path} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            report["tensor_types"] = json.loads(done.stdout.strip().splitlines()[-1])
            report["write_s"] = time.perf_counter() - t
            print(f"wrote {path} in {report['write_s']:.0f} s", file=sys.stderr, flush=True)
        report["file_bytes"] = path.stat().st_size
        context = args.prompt_tokens + args.new_tokens + 8
        info = subprocess.run(
            [sys.executable, "-m", "tinyqwen.cli", "info", "--model", str(path), "--context", str(context)],
            capture_output=True, text=True,
        )  # fmt: skip
        report["info_rss_line"] = next(
            (line for line in info.stdout.splitlines() if line.startswith("numba RSS")), info.stderr.strip()
        )
        from tinyqwen.cli.info import predict_rss

        report["predicted_numba_rss"] = predict_rss(path, context)
        results, logits = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, python in (("numba:int8", sys.executable), ("llama.cpp", args.peer_python)):
                print(f"running {name} ...", file=sys.stderr, flush=True)
                out = Path(tmp) / f"{name.replace(':', '-')}.npy"
                results[name] = run_engine(python, name, path, args, out)
                if out.is_file():
                    logits[name] = np.load(out)
                print(f"  {results[name]}", file=sys.stderr, flush=True)
        a, b = results.get("numba:int8", {}), results.get("llama.cpp", {})
        if len(logits) == 2 and "ids" in a and "ids" in b:
            same = [x == y for x, y in zip(a["ids"], b["ids"], strict=False)]
            n = (same.index(False) if False in same else len(same)) + 1  # positions with the same context
            kl = kl_divergence(logits["llama.cpp"][:n], logits["numba:int8"][:n])
            top1 = logits["llama.cpp"][:n].argmax(-1) == logits["numba:int8"][:n].argmax(-1)
            report["kl_numba_vs_llama"] = {"mean": float(kl.mean()), "max": float(kl.max()),
                                           "top1": float(top1.mean()), "positions": len(kl)}  # fmt: skip
        if "ids" in a and "ids" in b:
            report["ids_agree_prefix"] = same.index(False) if False in same else len(same)
            report["decode_numba_vs_llama"] = a["decode"] / b["decode"]
            report["prefill_numba_vs_llama"] = a["prefill"] / b["prefill"]
        report["results"] = results
    finally:
        if not args.keep:
            for p in (path, Path(str(path) + ".partial")):
                p.unlink(missing_ok=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.results:
        args.results.write_text(text + "\n")


if __name__ == "__main__":
    main()
