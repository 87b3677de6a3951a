"""The benchmark's runner and report: plan the engines, time each in a child process, summarise, print the table.

The overview (what one run measures, and how) is the package's docstring: `tinyqwen/bench/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tinyqwen.errors import TinyQwenError
from tinyqwen.verify import missing_modules, run_child

THREADS = 2
TINYQWEN_BACKENDS = ("numpy", "numba", "cupy")
TRANSFORMERS_DTYPES = ("fp32", "bf16")
ENGINE_KINDS = ("numpy", "numba", "transformers", "llama.cpp")  # the default run (CPU engines)
NUMBA_KV_DTYPE = "bfloat16"  # the numba engines' KV cache (the numpy engine, the reference, keeps float32)
KNOWN_KINDS = (*ENGINE_KINDS, "cupy")  # cupy only when asked for: it needs an NVIDIA GPU
GEMV_SHAPE = (151_936, 1_024)  # Qwen3-0.6B's lm_head: 622 MB in fp32, far beyond any cache


# ------------------------------------------------------------------------------------------ what decode reads


def decode_params(config) -> int:
    """Weights one decode step reads: every layer's, the lm_head, and only the k routed experts of a MoE layer.

    The input embedding contributes one row (ignored); tied, it is read in full as the lm_head.

    >>> from tinyqwen.config import config_from_dict
    >>> c = config_from_dict({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 8,
    ...     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2,
    ...     "max_position_embeddings": 64, "tie_word_embeddings": True})
    >>> decode_params(c)  # q 4·4 + k,v 2·4 each + o 4·4 + mlp 3·8·4 + norms 4+4+2+2+4 + lm_head 10·4
    200
    """
    from tinyqwen.config import count_parameters

    c = config
    params = count_parameters(c)
    if not c.tie_word_embeddings:
        params -= c.vocab_size * c.hidden_size  # the embedding: one row per token
    if c.is_moe:
        per_expert = 3 * c.moe_intermediate_size * c.hidden_size
        moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        params -= moe_layers * (c.num_experts - c.num_experts_per_tok) * per_expert
    return params


def resident_bytes(obj, seen: set | None = None) -> int:
    """Bytes held by the arrays in `obj` (dataclasses, lists, tuples, dicts of arrays), each array counted once.

    >>> import numpy as np
    >>> w = np.zeros((4, 4), np.float32)
    >>> resident_bytes({"embed": w, "lm_head": w, "norm": np.zeros(4, np.uint16)})  # tied: counted once
    72
    """
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if hasattr(obj, "nbytes") and not isinstance(obj, type):
        return int(obj.nbytes)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(resident_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(resident_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(resident_bytes(v, seen) for v in obj)
    return 0


# ------------------------------------------------------------------------------------------ the child processes

ENGINES = Path(__file__).resolve().parent / "engines"
# the engine module each kind runs (tinyqwen/bench/engines/): its `load`, timed by driver.main
ENGINE_MODULES = {
    "numpy": "numpy_numba",
    "numba": "numpy_numba",
    "cupy": "cupy_gpu",
    "transformers": "hf_transformers",
    "llama.cpp": "llama_cpp_gguf",
}


def engine_script(kind: str) -> str:
    """What a child Python runs for an engine: its module and the driver, both by path (a peer's Python may not
    have tinyqwen installed, so neither is imported as tinyqwen.bench.engines.x)."""
    engine, driver = ENGINES / f"{ENGINE_MODULES[kind]}.py", ENGINES / "driver.py"
    return f"import runpy; runpy.run_path({str(driver)!r})['main'](runpy.run_path({str(engine)!r})['load'])"


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {k: n for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}


def measure_gemv(threads: int = THREADS, shape: tuple[int, int] = GEMV_SHAPE) -> dict:
    """The machine's streaming bandwidth as decode sees it: NumPy fp32 BLAS GEMV over `shape`, best of 5."""
    script = f"import runpy; runpy.run_path({str(ENGINES / 'gemv.py')!r})['main']()"
    out = run_child(script, "-", {}, *shape, env=thread_env(threads), what="the GEMV probe")
    seconds, nbytes = float(out["seconds"]), int(out["bytes"])
    return {
        "what": f"NumPy fp32 BLAS GEMV (w @ x) on a [{shape[0]} x {shape[1]}] matrix, best of 5",
        "bytes": nbytes,
        "seconds": seconds,
        "gb_s": nbytes / seconds / 1e9,
    }


# ------------------------------------------------------------------------------------------ which engines


@dataclasses.dataclass(frozen=True)
class Engine:
    name: str  # "tinyqwen-numpy", "transformers-bf16", "llama.cpp-q8_0", ...
    kind: str  # one of ENGINE_KINDS
    option: str  # backend name, torch dtype, or GGUF path
    skip: str = ""  # why it cannot run here ("" if it can)


def find_ggufs(model: Path) -> dict[str, Path]:
    """GGUF files for a checkpoint: <dir>/*.gguf, and <dir>-<type>.gguf beside it (../shared/peers/setup's names).

    The label is the file name after the checkpoint's name, e.g. qwen3-0.6b-random-q8_0.gguf -> "q8_0".
    """
    found = sorted(model.glob("*.gguf")) + sorted(model.parent.glob(f"{model.name}-*.gguf"))
    return {gguf_label(p, model): p for p in found}


def gguf_label(path: Path, model: Path | None = None) -> str:
    stem = path.stem
    if model is not None and stem.startswith(model.name + "-"):
        return stem[len(model.name) + 1 :]
    return stem.rsplit("-", 1)[-1] if "-" in stem else stem


def plan_engines(
    model: Path, kinds=ENGINE_KINDS, peer_python: str | None = None, ggufs: list[Path] | None = None
) -> list[Engine]:
    """Every engine asked for, each with the reason it cannot run here (if any)."""
    from tinyqwen.backends import get_backend

    unknown = [k for k in kinds if k not in KNOWN_KINDS]
    if unknown:
        raise TinyQwenError(f"unknown engine {unknown[0]!r} (choose from {', '.join(KNOWN_KINDS)})")
    peer = peer_python or sys.executable
    # the modules the peer Python lacks: probed once, and only if a peer is asked for
    lacking: list[str] | None = None
    engines = []
    for kind in kinds:
        if kind in TINYQWEN_BACKENDS:
            try:
                get_backend(kind)
                skip = ""
            except TinyQwenError as e:
                skip = str(e)
            if kind != "numba":
                engines.append(Engine(f"tinyqwen-{kind}", kind, kind, skip))
                continue
            # numba keeps its KV cache in bf16, as llama.cpp keeps its in f16 (2 bytes a value, half of float32's
            # reads per decode step); "medium" also rounds the inputs of the weight products to bf16, as
            # llama.cpp's bf16 path does, and runs prefill on the bf16 matrix units
            engines.append(Engine("tinyqwen-numba", kind, f"numba:highest:{NUMBA_KV_DTYPE}", skip))
            engines.append(Engine("tinyqwen-numba-medium", kind, f"numba:medium:{NUMBA_KV_DTYPE}", skip))
            continue
        if lacking is None:
            lacking = missing_modules(peer, ("torch", "transformers", "llama_cpp"))
        needs = ("torch", "transformers") if kind == "transformers" else ("llama_cpp",)
        lacks = [m for m in needs if m in lacking]
        skip = (
            f"{peer} lacks {', '.join(lacks)} (give --peer-python: e.g. ../shared/peers/setup's venv)"
            if lacks
            else ""
        )
        if kind == "transformers":
            if model.is_file():  # the first thing to fix, whatever the peer Python has
                skip = f"transformers needs a Hugging Face checkpoint folder, not a file ({model.name})"
            engines += [Engine(f"transformers-{d}", kind, d, skip) for d in TRANSFORMERS_DTYPES]
        else:
            files = {gguf_label(Path(p), model): Path(p) for p in ggufs} if ggufs else find_ggufs(model)
            absent = [str(p) for p in files.values() if not p.is_file()]
            if absent:
                raise TinyQwenError(f"GGUF file not found: {absent[0]}")
            if not files:
                reason = f"no GGUF file (give --gguf, or put {model.name}-bf16.gguf beside the checkpoint)"
                engines.append(Engine("llama.cpp", kind, "", skip or reason))
            engines += [Engine(f"llama.cpp-{label}", kind, str(p), skip) for label, p in files.items()]
    return engines


# ------------------------------------------------------------------------------------------ one run


def run_engine(
    engine: Engine,
    model: Path,
    prompt: np.ndarray,
    new_tokens: int,
    repeat: int,
    threads: int,
    peer_python=None,
) -> dict:
    """Time one engine in its own process; the raw measurements as plain numbers."""
    env = thread_env(threads)
    python = None if engine.kind in TINYQWEN_BACKENDS else peer_python
    args = (
        engine_script(engine.kind),
        model,
        {"prompt": prompt},
        new_tokens,
        repeat,
        threads,
        engine.option,
    )
    with tempfile.TemporaryDirectory(prefix="tinyqwen-numba-cache-") as cache:
        if engine.kind == "numba":
            # twice: first with a fresh JIT cache (its compile time and first call are the ones reported: the
            # compile is never hidden in tok/s), then as every later run starts, loading the compiled kernels
            # from that cache — its speeds and peak RSS are the ones reported (LLVM's compiler needs ~100 MB
            # of its own while it compiles, once)
            env["NUMBA_CACHE_DIR"] = cache
            first = run_child(*args[:3], 2, 1, *args[5:], python=python, env=env, what=engine.name)
        out = run_child(*args, python=python, env=env, what=engine.name)
    if engine.kind == "numba":
        out = {**out, **{k: first[k] for k in ("compile_s", "first_call_s", "second_call_s")}}
        out["peak_rss_first_run"] = first["peak_rss"]
    raw = {k: (str(v) if v.dtype.kind == "U" else v.tolist()) for k, v in out.items()}
    return raw


def summarise(
    engine: Engine, raw: dict, config, prompt_tokens: int, new_tokens: int, gemv: dict | None
) -> dict:
    """The reported numbers of one engine: speeds, TTFT, memory, decode bandwidth against the GEMV's."""
    from tinyqwen.config import count_parameters

    per_weight = raw["weight_bytes"] / count_parameters(config)
    decode_bytes = decode_params(config) * per_weight
    step_s = raw["decode_s"] / new_tokens
    result = {
        "engine": engine.name,
        "status": "ok",
        "version": raw["version"],
        "prefill_tok_s": prompt_tokens / raw["ttft_s"],
        "decode_tok_s": new_tokens / raw["decode_s"],
        "ttft_s": raw["ttft_s"],
        "load_s": raw["load_s"],
        "first_call_s": raw["first_call_s"],
        "peak_rss_mb": raw["peak_rss"] / 1e6,
        "peak_rss_after_load_mb": raw["peak_rss_load"] / 1e6,
        "weight_mb": raw["weight_bytes"] / 1e6,
        "bytes_per_weight": per_weight,
        "decode_mb_per_token": decode_bytes / 1e6,
        "decode_gb_s": decode_bytes / step_s / 1e9,
        "first_ids": raw["first_ids"],
    }
    if engine.kind == "numba":  # time spent in Numba's compiler (a fresh cache: nothing is loaded from disk)
        result["compile_s"] = raw["compile_s"]
        result["peak_rss_first_run_mb"] = raw["peak_rss_first_run"] / 1e6  # the run that compiled
    if engine.kind == "cupy":
        # decode GB/s is then the achieved HBM bandwidth: against the GPU's theoretical peak
        result["hbm_peak_gb_s"] = raw["hbm_peak_gb_s"]
        result["hbm_of_peak"] = result["decode_gb_s"] / raw["hbm_peak_gb_s"]
    if gemv:
        result["decode_vs_gemv"] = result["decode_gb_s"] / gemv["gb_s"]
    return result


def ratios(results: list[dict]) -> list[dict]:
    """tinyqwen's speed over every other engine's from the same run (>1: tinyqwen is faster)."""
    ok = [r for r in results if r["status"] == "ok"]
    out = []
    for i, ours in enumerate(ok):
        if not ours["engine"].startswith("tinyqwen-"):
            continue
        for j, peer in enumerate(ok):
            if j == i or (peer["engine"].startswith("tinyqwen-") and j > i):
                continue
            out.append(
                {
                    "engine": ours["engine"],
                    "peer": peer["engine"],
                    "prefill": ours["prefill_tok_s"] / peer["prefill_tok_s"],
                    "decode": ours["decode_tok_s"] / peer["decode_tok_s"],
                }
            )
    return out


def run_benchmark(
    model: str | Path,
    kinds=ENGINE_KINDS,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    repeat: int = 2,
    threads: int = THREADS,
    peer_python: str | None = None,
    ggufs: list[Path] | None = None,
    gemv_shape: tuple[int, int] | None = GEMV_SHAPE,
    progress=None,
) -> dict:
    """Measure every engine of `kinds` on the checkpoint `model`; the whole run as one JSON-ready dict."""
    from tinyqwen.config import count_parameters, load_config
    from tinyqwen.gguf_checkpoint import is_gguf, load_any_config
    from tinyqwen.hub import resolve_model
    from tinyqwen.verify import describe

    for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("repeat", repeat)):
        if value < 1:
            raise TinyQwenError(f"{name} must be at least 1, got {value}")
    path = resolve_model(str(model))
    if is_gguf(path) and path.is_file():
        # a GGUF file: tinyqwen's engines load it as it is (its config and tokenizer from the metadata) and
        # llama.cpp runs the same file; transformers needs a Hugging Face checkpoint folder (plan_engines says so)
        config = load_any_config(path)
        ggufs = ggufs or [path]
    else:
        config = load_config(path)
    prompt = np.random.default_rng(0).integers(0, min(config.vocab_size, 151643), prompt_tokens)
    engines = plan_engines(path, kinds, peer_python, ggufs)
    say = progress or (lambda line: None)
    load_before = os.getloadavg()[0]  # how busy the machine was: a shared host makes every timing slower
    gemv = None
    if gemv_shape:
        say(f"GEMV bandwidth probe, {threads} threads")
        gemv = measure_gemv(threads, gemv_shape)
    results = []
    for engine in engines:
        if engine.skip:
            results.append({"engine": engine.name, "status": "skipped", "reason": engine.skip})
            continue
        say(f"{engine.name}: {prompt_tokens}-token prompt, {new_tokens} new tokens, best of {repeat}")
        try:
            raw = run_engine(engine, path, prompt, new_tokens, repeat, threads, peer_python)
        except TinyQwenError as e:
            results.append({"engine": engine.name, "status": "error", "reason": str(e)})
            continue
        results.append(summarise(engine, raw, config, prompt_tokens, new_tokens, gemv))
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(path),
        "config": describe(config),
        "parameters": count_parameters(config),
        "decode_params_per_token": decode_params(config),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeat": repeat,
        "threads": threads,
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,  # 1-minute load averages: above `cores`, engines shared the CPU
            "load_average_after": os.getloadavg()[0],
        },
        "gemv": gemv,
        "method": (
            "each engine in its own process, greedy, same random prompt ids; prefill tok/s = prompt / time to first "
            "new token; decode tok/s = new tokens / their time; best of `repeat` each; decode GB/s = weights read "
            "per token (decode_params_per_token x the engine's resident bytes per weight) / time per token"
        ),
        "results": results,
        "ratios": ratios(results),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------ the table


def format_report(report: dict) -> str:
    """The run as a table: speeds, TTFT, peak RSS, decode bandwidth; then the ratios and what was skipped."""
    gemv = report.get("gemv")
    lines = [
        f"{report['config']}, {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, "
        f"{report['threads']} threads, best of {report['repeat']} ({report['machine']['cpu']}, "
        f"load average {report['machine'].get('load_average_before', 0):.1f} before, "
        f"{report['machine'].get('load_average_after', 0):.1f} after)",
        f"{'engine':20s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'TTFT s':>7s} {'peak RSS MB':>11s} "
        f"{'decode GB/s':>11s}" + (f" {'of GEMV':>7s}" if gemv else ""),
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        line = (
            f"{r['engine']:20s} {r['prefill_tok_s']:13.1f} {r['decode_tok_s']:12.2f} {r['ttft_s']:7.3f} "
            f"{r['peak_rss_mb']:11.0f} {r['decode_gb_s']:11.1f}"
        )
        if gemv:
            line += f" {r['decode_vs_gemv']:7.0%}"
        if "compile_s" in r:
            line += f"  (first-call compile {r['compile_s']:.1f} s)"
        if "hbm_of_peak" in r:
            line += f"  (HBM: {r['hbm_of_peak']:.0%} of the GPU's {r['hbm_peak_gb_s']:.0f} GB/s peak)"
        lines.append(line)
    if gemv:
        lines.append(f"GEMV bandwidth: {gemv['gb_s']:.1f} GB/s ({gemv['what']})")
    for q in report["ratios"]:
        lines.append(
            f"ratio {q['engine']} / {q['peer']}: prefill {q['prefill']:.2f}x, decode {q['decode']:.2f}x "
            "(same run; >1 means tinyqwen is faster)"
        )
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['status']}: {r['engine']}: {r['reason']}")
    return "\n".join(lines)
