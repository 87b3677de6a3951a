"""The benchmark harness (tinyqwen/bench/, `tinyqwen bench`): a smoke test of its JSON's shape on a tiny fixture.

Never a timing assertion (speed belongs in benchmarks): only that every engine asked for gets an entry that says
what happened, that the numbers that must be positive are, and that the derived figures follow from the raw ones.
Each engine is a child process, so this takes seconds, not minutes (8-token prompt, 2 new tokens, one run).
"""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tinyqwen.bench as bench
from tinyqwen.config import load_config
from tinyqwen.errors import TinyQwenError

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
NUMBERS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "first_call_s", "peak_rss_mb", "decode_gb_s")


def test_doctests():
    result = doctest.testmod(bench.runner)
    assert result.attempted >= 3 and result.failed == 0


def test_decode_params_counts_only_routed_experts_and_the_lm_head():
    dense = load_config(FIXTURES / "dense-untied-bf16-sharded")  # untied: the embedding is one row per token
    from tinyqwen.config import count_parameters

    assert bench.decode_params(dense) == count_parameters(dense) - dense.vocab_size * dense.hidden_size
    moe = load_config(FIXTURES / "moe-norm-topk")
    per_expert = 3 * moe.moe_intermediate_size * moe.hidden_size
    layers = sum(moe.is_moe_layer(i) for i in range(moe.num_hidden_layers))
    skipped = layers * (moe.num_experts - moe.num_experts_per_tok) * per_expert
    embed = 0 if moe.tie_word_embeddings else moe.vocab_size * moe.hidden_size
    assert bench.decode_params(moe) == count_parameters(moe) - embed - skipped


def test_run_benchmark_json_shape(tmp_path):
    """numpy runs; a peer Python without torch/llama_cpp gives 'skipped' entries that say why; GEMV probe runs."""
    # (not NUMBA_OPT=0 for the children: Numba then saves no kernel with the cache, so the timed child compiles
    # everything again, and the test took longer, not shorter)
    (tmp_path / "dense-yarn-bf16.gguf").write_bytes(b"GGUF")  # found beside the checkpoint, by name
    model = tmp_path / "dense-yarn"
    model.symlink_to(FIXTURES / "dense-yarn", target_is_directory=True)
    report = bench.run_benchmark(
        model,
        prompt_tokens=8,
        new_tokens=2,
        repeat=1,
        peer_python=sys.executable if _lacks_peers() else "/nonexistent/python",
        gemv_shape=(512, 256),
    )
    json.dumps(report)  # plain JSON types only
    engines = [r["engine"] for r in report["results"]]
    assert engines == [
        "tinyqwen-numpy",
        "tinyqwen-numba",
        "tinyqwen-numba-medium",
        "transformers-fp32",
        "transformers-bf16",
        "llama.cpp-bf16",
    ]
    by_name = {r["engine"]: r for r in report["results"]}
    numpy = by_name["tinyqwen-numpy"]
    assert numpy["status"] == "ok", numpy
    assert all(numpy[k] > 0 for k in NUMBERS)
    assert numpy["prefill_tok_s"] == pytest.approx(8 / numpy["ttft_s"])
    assert numpy["bytes_per_weight"] == pytest.approx(4.0, rel=1e-6)  # the numpy backend holds fp32
    assert numpy["decode_vs_gemv"] == pytest.approx(numpy["decode_gb_s"] / report["gemv"]["gb_s"])
    assert len(numpy["first_ids"]) == 3  # the first new token, then 2 decode steps
    for name in ("transformers-fp32", "transformers-bf16", "llama.cpp-bf16"):
        assert by_name[name]["status"] == "skipped" and "lacks" in by_name[name]["reason"]
    for name in ("tinyqwen-numba", "tinyqwen-numba-medium"):  # skipped without numba; else compile time apart
        numba = by_name[name]
        assert numba["status"] == "skipped" or (numba["status"] == "ok" and numba["compile_s"] > 0), numba
        if (
            numba["status"] == "ok"
        ):  # the compiling run is a process of its own; the timed one reuses its cache
            assert numba["peak_rss_first_run_mb"] > 0 and "(numba backend" in numba["version"]
    if by_name["tinyqwen-numba-medium"]["status"] == "ok":
        assert "matmul_precision=medium" in by_name["tinyqwen-numba-medium"]["version"]
    ok = {r["engine"] for r in report["results"] if r["status"] == "ok"}
    assert all(q["engine"] in ok and q["peer"] in ok for q in report["ratios"])
    assert report["gemv"]["gb_s"] > 0 and report["threads"] == 2 and report["prompt_tokens"] == 8


def _lacks_peers() -> bool:
    from tinyqwen.verify import missing_modules

    return set(missing_modules(sys.executable, ("torch", "transformers", "llama_cpp"))) == {
        "torch",
        "transformers",
        "llama_cpp",
    }


def test_cli_bench_json_prints_one_object():
    run = subprocess.run(
        [sys.executable, "-m", "tinyqwen.cli", "bench", "--model", str(FIXTURES / "moe-norm-topk"), "--json",
         "--engines", "numpy", "--prompt-tokens", "8", "--new-tokens", "2", "--repeat", "1", "--no-gemv"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [r["engine"] for r in report["results"]] == ["tinyqwen-numpy"]
    result = report["results"][0]
    assert result["status"] == "ok" and result["decode_tok_s"] > 0 and "decode_vs_gemv" not in result
    assert report["gemv"] is None and report["ratios"] == []


def test_cli_bench_table_and_bad_input(capsys):
    common = ["--prompt-tokens", "8", "--new-tokens", "2", "--repeat", "1", "--no-gemv"]
    run = subprocess.run(
        [sys.executable, "-m", "tinyqwen.cli", "bench", "--model", str(FIXTURES / "dense-tied"), *common,
         "--no-peer"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[1].split()[:4] == ["engine", "prefill", "tok/s", "decode"]
    assert lines[2].startswith("tinyqwen-numpy")
    # bad input: the same `main` as the process above, called in this one (a Python start-up each saved); an
    # exception other than the one-line error would fail the test here as a traceback would there
    from tinyqwen.cli import main

    for flags, fragment in (
        (["--engines", "numpy,vllm"], "unknown engine 'vllm'"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--gguf", "/nonexistent.gguf"], "GGUF file not found"),
    ):
        code = main(["bench", "--model", str(FIXTURES / "dense-tied"), *common, *flags])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err and fragment in err.splitlines()[-1], err


def test_gguf_labels(tmp_path):
    model = tmp_path / "qwen3-0.6b-random"
    model.mkdir()
    for name in ("qwen3-0.6b-random-q8_0.gguf", "qwen3-0.6b-random-bf16.gguf", "other-f16.gguf"):
        (tmp_path / name).write_bytes(b"")
    (model / "own-q4_0.gguf").write_bytes(b"")
    assert list(bench.find_ggufs(model)) == ["q4_0", "bf16", "q8_0"]
    with pytest.raises(TinyQwenError, match="unknown engine"):
        bench.plan_engines(model, ["numpy", "torch"])


@pytest.mark.parametrize("kind", sorted(set(bench.runner.ENGINE_MODULES)))
def test_every_engine_module_imports_cleanly_and_defines_load(kind):
    # ruff lints them like every module; this checks that each imports without its engine's packages (torch,
    # llama_cpp, cupy are imported inside `load`, in the child) and has the `load` the driver calls
    module = importlib.import_module(f"tinyqwen.bench.engines.{bench.runner.ENGINE_MODULES[kind]}")
    assert callable(module.load)
    assert callable(importlib.import_module("tinyqwen.bench.engines.driver").main)


def test_cli_bench_takes_a_gguf_file(tmp_path):
    """`--model X.gguf`: tinyqwen's engines load the file itself (config from its metadata), llama.cpp would run the
    same file, and transformers says in one line that it needs a checkpoint folder."""
    from tinyqwen.quantize import quantize_checkpoint
    from tinyqwen.testing import write_tiny_qwen3

    folder = write_tiny_qwen3(tmp_path / "dense", seed=1, with_tokenizer=False)
    gguf = tmp_path / "m-q8_0.gguf"
    quantize_checkpoint(folder, "q8_0", gguf)
    run = subprocess.run(
        [sys.executable, "-m", "tinyqwen.cli", "bench", "--model", str(gguf), "--json", "--engines",
         "numpy,transformers", "--peer-python", sys.executable, "--prompt-tokens", "8", "--new-tokens", "2",
         "--repeat", "1", "--no-gemv"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    by_name = {r["engine"]: r for r in report["results"]}
    assert by_name["tinyqwen-numpy"]["status"] == "ok" and by_name["tinyqwen-numpy"]["decode_tok_s"] > 0
    for name in ("transformers-fp32", "transformers-bf16"):
        assert by_name[name]["status"] == "skipped"
        assert "needs a Hugging Face checkpoint folder" in by_name[name]["reason"]
    from tinyqwen.config import count_parameters

    # the config read from the file's metadata
    assert report["parameters"] == count_parameters(load_config(folder))
