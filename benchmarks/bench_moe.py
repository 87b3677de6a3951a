"""MoE benchmark: a random, scaled-down Qwen3-30B-A3B: numpy vs numba (bf16), or numba vs llama.cpp (Q4_K_M).

    python benchmarks/bench_moe.py [--out DIR] [--layers 2] [--json]
    python benchmarks/bench_moe.py --quant --peer-python PY [--layers 2] [--prompt-tokens 128 --new-tokens 32]
        [--repeat 2] [--rounds 2] [--gemv int8 float] [--json]

--quant: the GGUF file people have. The first run writes the random model as a BF16 GGUF (tinyqwen's writer, one
tensor at a time, the packaged tokenizer; 3.7 GB for 2 layers) and quantizes it to Q4_K_M with llama.cpp's own
quantizer (`llama_model_quantize` of llama-cpp-python, run with PY: 1.19 GB, token_embd Q4_K, output Q6_K, the
expert stacks Q4_K but ffn_down_exps / attn_v Q6_K in layer 1, as llama.cpp's _M mix picks), both in $TINYQWEN_PEER_DIR
(or beside --gguf) and reused after. Then llama.cpp and tinyqwen's numba backend, with its two decode GEMVs ("int8": the activations
quantized to int8 blocks as llama.cpp does; "float": the codes widened in registers; "int8:two-launch": decode's
MoE in two launches, the pairs' gate/up rows and then their down rows, as before each pair became one job of a
single launch, backends/numba/moe.py's MOE_PAIR_JOBS; "int8:tiles": prefill's experts all on the int8 tiles and
one panel launch per dense weight, as before moe.MOE_PREFILL_PANELS / linear.QUANT_PANELS_MANY), each in its own process with
the same thread count, greedy from the same random prompt ids: prefill tok/s = P / t(first token), decode tok/s =
N / (t(1 + N tokens) − t(first token)), best of --repeat within a process and of --rounds processes per engine
(the engines interleaved); peak RSS (getrusage). Random weights give near-tied logits,
so greedy ids part after a few tokens on any difference in rounding: the report gives how many leading ids agree
with llama.cpp's, and the KL divergence (nats) and top-1 agreement of the next-token distributions on --kl-steps + 1
teacher-forced positions (a 16-token prompt, then its next ids one at a time: decode's kernels). Last, the peak RSS
that `tinyqwen info` predicts for numba at this context, beside the measured ones.

The checkpoint has Qwen3-30B-A3B's exact config.json (tinyqwen/data/configs/Qwen3-30B-A3B.json: 128 experts,
top-8, hidden 2048, expert ffn 768, 32 query / 4 kv heads, vocab 151,936, untied) except for the number of layers:
2 by default, i.e. 1.87 B parameters, 3.7 GB in bf16 (the numpy backend widens them to 7.5 GB of fp32; each extra
layer adds 0.62 B parameters, 1.25 GB of bf16). The weights are random (normal, std 0.02; norms 1), written as BF16 safetensors shards
to --out (default $TINYQWEN_PEER_DIR/qwen3-30b-a3b-<N>layers-random: never commit it) on the first run and reused
after.

It then times the two tinyqwen backends with `tinyqwen.bench.run_benchmark` (the same child processes and timing
loop as `tinyqwen bench`), with the GEMV bandwidth probe, and prints the table (or the JSON). The decode bytes per
token count only the 8 routed experts of each layer, plus attention, router and the lm_head: 425 M weights with
2 layers, 311 M of them the lm_head, so `decode GB/s` says more than the tok/s ratio about the MoE kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tinyqwen" / "data" / "configs" / "Qwen3-30B-A3B.json"
SHARD_BYTES = 1 << 30  # fp32 bytes generated per shard before it is written as bf16 (512 MB on disk)


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> Path:
    """Random BF16 weights for Qwen3-30B-A3B's config with `layers` layers, as sharded safetensors + index."""
    from tinyqwen.config import config_from_dict, expected_tensors
    from tinyqwen.safetensors import save_file

    config = json.loads(CONFIG.read_text())
    config.update(num_hidden_layers=layers, max_window_layers=layers)
    shapes = expected_tensors(config_from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():  # group tensors into shards of about SHARD_BYTES of fp32
        nbytes = 4 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(shapes[name], dtype=np.float32)
            else:
                tensors[name] = rng.standard_normal(shapes[name], dtype=np.float32) * np.float32(0.02)
        save_file(tensors, out / file, metadata={"format": "pt"}, bf16=True)
        weight_map.update(dict.fromkeys(names, file))
        print(f"  wrote {file} ({len(names)} tensors)", file=sys.stderr, flush=True)
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(
        json.dumps(config, indent=2)
    )  # written last: marks the checkpoint complete
    return out


def write_random_gguf(path: Path, layers: int, seed: int = 0) -> Path:
    """The same kind of random model as `write_checkpoint`, written straight to a BF16 GGUF file (llama.cpp's
    tensor names and metadata, the packaged Qwen3 tokenizer) one tensor at a time: the input of llama.cpp's
    quantizer, with no safetensors copy in between (memory: one expert stack, 0.8 GB of float32)."""
    from tinyqwen.bf16 import float32_to_bf16
    from tinyqwen.config import config_from_dict, expected_tensors
    from tinyqwen.gguf import LazyTensor, write_gguf
    from tinyqwen.gguf_checkpoint import gguf_name
    from tinyqwen.quantize import _gguf_order, model_metadata, tokenizer_metadata
    from tinyqwen.tokenizer import DATA_DIR, Tokenizer

    raw = json.loads(CONFIG.read_text())
    raw.update(num_hidden_layers=layers, max_window_layers=layers)
    config = config_from_dict(raw)
    metadata = model_metadata(config, "bf16", path.stem)
    metadata |= tokenizer_metadata(Tokenizer.qwen3(), config.vocab_size, DATA_DIR)
    shapes = {gguf_name(n): s for n, s in expected_tensors(config).items() if ".experts." not in n}
    for i in range(layers):
        for g in ("ffn_gate_exps", "ffn_up_exps"):
            shapes[f"blk.{i}.{g}.weight"] = (
                config.num_experts,
                config.moe_intermediate_size,
                config.hidden_size,
            )
        shapes[f"blk.{i}.ffn_down_exps.weight"] = (
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )  # fmt: skip
    rngs = {name: np.random.default_rng([seed, i]) for i, name in enumerate(sorted(shapes))}

    def tensor(name: str, shape: tuple[int, ...]) -> LazyTensor:
        if len(shape) == 1:  # the norms' weights: 1, as a freshly initialised model
            return LazyTensor("F32", shape, lambda: np.ones(shape, np.float32))
        if name.endswith("ffn_gate_inp.weight"):  # the router stays F32 in every GGUF file
            return LazyTensor("F32", shape, lambda: rngs[name].standard_normal(shape, np.float32) * 0.02)

        def make():
            return ("BF16", float32_to_bf16(rngs[name].standard_normal(shape, np.float32) * np.float32(0.02)))

        return LazyTensor("BF16", shape, make)

    tensors = {n: tensor(n, s) for n, s in sorted(shapes.items(), key=lambda kv: _gguf_order(kv[0]))}
    part = path.with_suffix(".part")
    write_gguf(part, metadata, tensors)
    part.rename(path)  # only a complete file gets the real name
    return path


LLAMA_QUANTIZE = r"""
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = getattr(llama_cpp, sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def llama_quantize(peer_python: str, src: Path, dst: Path, ftype: str = "LLAMA_FTYPE_MOSTLY_Q4_K_M") -> Path:
    """`src` (a BF16 GGUF) quantized by llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`)."""
    part = dst.with_suffix(".part")
    done = subprocess.run(
        [peer_python, "-c", LLAMA_QUANTIZE, str(src), str(part), ftype, "2"], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(
            f"llama.cpp's quantizer failed on {src}: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    part.rename(dst)
    return dst


# One engine in its own process: the timing loop of bench_quant.py (same prompt ids, greedy, best of R), then the
# next-token logits of K teacher-forced decode steps (the prompt's first 16 ids, then its next K ids one at a time,
# whatever the engine would have picked), saved for the KL comparison: the decode kernels' logits, not prefill's.
CHILD = r"""
import json, resource, sys, time
import numpy as np
engine, path, P, N, R, threads, K, logits_out = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8]), sys.argv[8]
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if engine == "llama.cpp":
    from llama_cpp import Llama
    base = rss()
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=P + N + 8, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    vocab = llm.n_vocab()
    def logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).copy()
    def start(prompt):
        llm.reset(); llm.eval(prompt); return logits()
    def step(token):
        llm.eval([token]); return logits()
else:
    import tinyqwen
    from tinyqwen.backends.numba import backend
    base = rss()
    t0 = time.perf_counter()
    model = tinyqwen.load_model(path, backend="numba")
    model.backend = backend(quant_gemv=engine.split(":")[1])
    if engine.endswith(":two-launch"):  # decode's MoE as before the pair jobs: up rows, then down rows
        from tinyqwen.backends.numba import moe
        moe.MOE_PAIR_JOBS = False
    if engine.endswith(":tiles"):  # prefill as before: every expert on the int8 tiles, a panel launch per weight
        from tinyqwen.backends.numba import linear, moe
        moe.MOE_PREFILL_PANELS = linear.QUANT_PANELS_MANY = False
    vocab = model.config.vocab_size
    state = {}
    def start(prompt):
        state["cache"] = model.new_cache(1, P + N + 8, "bfloat16")
        return model.forward(np.asarray([prompt]), cache=state["cache"], last_only=True).logits[0, -1]
    def step(token):
        return model.forward(np.asarray([[token]]), cache=state["cache"], last_only=True).logits[0, -1]
def run(prompt, k):
    out = [int(start(prompt).argmax())]
    while len(out) < k:
        out.append(int(step(out[-1]).argmax()))
    return out
load_s = time.perf_counter() - t0
prompt = [int(x) for x in np.random.default_rng(0).integers(0, min(vocab, 151643), P)]
run(prompt[:8], 2)  # warm-up (JIT, caches)
best1 = bestN = float("inf")
for _ in range(R):
    t = time.perf_counter(); run(prompt, 1); best1 = min(best1, time.perf_counter() - t)
    t = time.perf_counter(); ids = run(prompt, 1 + N); bestN = min(bestN, time.perf_counter() - t)
peak = rss()  # before the logits below (a few MB)
rows = [start(prompt[:16])] + [step(t) for t in prompt[16:16 + K]]
np.save(logits_out, np.stack(rows).astype(np.float32))
print(json.dumps({"prefill": P / best1, "decode": N / max(bestN - best1, 1e-9), "ids": ids, "load_s": load_s,
                  "peak_rss": peak, "base_rss": base}))
"""


def run_engine(python: str, engine: str, path: Path, args, logits_out: Path) -> dict:
    """One engine's timings, greedy ids and peak RSS on GGUF file `path` (its own process; `args.threads` threads)."""
    threads = str(args.threads)
    env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                          "NUMBA_NUM_THREADS"), threads)}  # fmt: skip
    sizes = (args.prompt_tokens, args.new_tokens, args.repeat, threads, args.kl_steps)
    cmd = [python, "-c", CHILD, engine, str(path), *map(str, sizes), str(logits_out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def kl_divergence(
    p_logits: np.ndarray, q_logits: np.ndarray
) -> np.ndarray:  # [T, V] x2 -> [T] KL(p || q), nats
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def scratch_dir() -> Path:
    """Where the random models are written when no path is given: $TINYQWEN_PEER_DIR (outside the repo)."""
    folder = os.environ.get("TINYQWEN_PEER_DIR")
    if not folder:
        sys.exit("bench_moe.py: no folder for the random model: pass --out / --gguf or set TINYQWEN_PEER_DIR")
    return Path(folder)


def bench_gguf(args) -> dict:
    """llama.cpp against tinyqwen's numba backend (int8 and float decode GEMVs) on one Q4_K_M MoE file, same run."""
    from tinyqwen.cli.info import predict_rss

    path = args.gguf
    if path is None:
        path = scratch_dir() / f"qwen3-30b-a3b-{args.layers}layers-random-q4_k_m.gguf"
        if not path.is_file():
            bf16 = path.with_name(path.name.replace("q4_k_m", "bf16"))
            if not bf16.is_file():
                print(
                    f"writing a random {args.layers}-layer BF16 GGUF to {bf16}", file=sys.stderr, flush=True
                )
                write_random_gguf(bf16, args.layers)
            print(f"quantizing it to {path} with llama.cpp's quantizer", file=sys.stderr, flush=True)
            llama_quantize(args.peer_python, bf16, path)
    engines = [("llama.cpp", args.peer_python)] + [(f"numba:{g}", sys.executable) for g in args.gemv]
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # engines interleaved, A B C A B C: a busy machine's drift hits all
            for name, python in engines:
                print(f"  round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                out = Path(tmp) / f"{name.replace(':', '-')}.npy"
                r = run_engine(python, name, path, args, out)
                if out.is_file():
                    logits[name] = np.load(out)
                old = results.get(name)
                if old is None or "error" in old:
                    results[name] = r
                elif "error" not in r:  # the best of the rounds, each figure on its own
                    for key in ("prefill", "decode"):
                        old[key] = max(old[key], r[key])
                    old["peak_rss"] = max(old["peak_rss"], r["peak_rss"])
    ref = results["llama.cpp"]
    for name, r in results.items():
        if "error" in r or "error" in ref:
            continue
        r["decode_vs_llama"] = r["decode"] / ref["decode"]
        r["prefill_vs_llama"] = r["prefill"] / ref["prefill"]
        agree = [a == b for a, b in zip(r["ids"], ref["ids"], strict=False)]
        r["ids_agree_prefix"] = agree.index(False) if False in agree else len(agree)
        if name in logits and "llama.cpp" in logits:
            kl = kl_divergence(logits["llama.cpp"], logits[name])
            top1 = logits["llama.cpp"].argmax(-1) == logits[name].argmax(-1)
            r["kl_vs_llama"] = {"mean": float(kl.mean()), "max": float(kl.max()), "top1": float(top1.mean()),
                                "positions": len(kl)}  # fmt: skip
    rss = predict_rss(path, context=args.prompt_tokens + args.new_tokens + 8)
    return {"file": str(path), "file_bytes": path.stat().st_size, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "repeat": args.repeat, "rounds": args.rounds, "threads": args.threads,
            "predicted_numba_rss": rss, "results": results}  # fmt: skip


def print_gguf_report(report: dict) -> None:
    print(f"{report['file']} ({report['file_bytes'] / 1e9:.2f} GB): P={report['prompt_tokens']} "
          f"N={report['new_tokens']}, best of {report['repeat']} x {report['rounds']} rounds, "
          f"{report['threads']} threads")  # fmt: skip
    print(f"{'engine':<12} {'prefill':>8} {'x llama':>7} {'decode':>7} {'x llama':>7} {'RSS MB':>7} "
          f"{'ids agree':>9} {'KL mean':>8} {'top1':>5}")  # fmt: skip
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:<12} error: {r['error']}")
            continue
        kl = r.get("kl_vs_llama", {})
        print(f"{name:<12} {r['prefill']:8.1f} {r.get('prefill_vs_llama', 1):7.2f} {r['decode']:7.2f} "
              f"{r.get('decode_vs_llama', 1):7.2f} {r['peak_rss'] / 1e6:7.0f} "
              f"{r.get('ids_agree_prefix', len(r['ids'])):>4}/{len(r['ids']):<4} "
              f"{kl.get('mean', 0):8.2e} {kl.get('top1', 1):5.2f}")  # fmt: skip
    p = report["predicted_numba_rss"]
    print(
        f"tinyqwen info's prediction for numba at this context: {p['total'] / 1e6:.0f} MB "
        f"(weights {p['weights'] / 1e6:.0f}, kv {p['kv_cache'] / 1e6:.0f}, prefill temporaries "
        f"{p['activations'] / 1e6:.0f}, runtime {p['runtime'] / 1e6:.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="checkpoint directory (default $TINYQWEN_PEER_DIR/qwen3-30b-a3b-<N>layers-random)",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the run as one JSON object")
    gguf = parser.add_argument_group("quantized GGUF (--quant): numba against llama.cpp on one Q4_K_M file")
    gguf.add_argument("--quant", action="store_true", help="run the GGUF benchmark instead of numpy vs numba")
    gguf.add_argument("--gguf", type=Path, help="the file (default: $TINYQWEN_PEER_DIR/qwen3-30b-a3b-<N>layers-random-q4_k_m.gguf, "
                      "made on the first run: a random BF16 GGUF quantized by llama.cpp's quantizer)")  # fmt: skip
    gguf.add_argument("--peer-python", default="python", help="a python with llama-cpp-python")
    gguf.add_argument("--gemv", nargs="+", default=["int8", "float"], help="numba's decode GEMVs to time")
    gguf.add_argument("--kl-steps", type=int, default=8, help="teacher-forced decode steps compared by KL")
    gguf.add_argument("--rounds", type=int, default=1, help="run every engine this many times, interleaved")
    args = parser.parse_args()
    if args.quant:
        report = bench_gguf(args)
        print(json.dumps(report, indent=1) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            print_gguf_report(report)
        return

    from tinyqwen.bench import format_report, run_benchmark

    out = args.out or scratch_dir() / f"qwen3-30b-a3b-{args.layers}layers-random"
    if not (out / "config.json").is_file():
        print(
            f"writing a random {args.layers}-layer Qwen3-30B-A3B-shaped checkpoint to {out}", file=sys.stderr
        )
        write_checkpoint(out, args.layers)
    report = run_benchmark(
        out,
        ["numpy", "numba"],
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeat=args.repeat,
        threads=args.threads,
        progress=None if args.json else lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))


if __name__ == "__main__":
    main()
