"""The `tinyqwen` command line, run as a real process (and `chat` in a real terminal, through pexpect's pty)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_tiny_qwen3

FIXTURES = Path(__file__).parent / "fixtures"


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def tinyqwen(*args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyqwen.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env(**extra_env), cwd=REPO,
    )  # fmt: skip


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("tinyqwen: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def tokenizer():
    return pytest.importorskip("tinyqwen.tokenizer").Tokenizer.qwen3()


# ------------------------------------------------------------------------------------------ info


def test_info_counts_qwen3_0_6b_parameters_by_hand(tmp_path):
    # config only: info never reads weights. Qwen3-0.6B, derived by hand:
    # embedding 151936·1024 = 155,582,464 (tied: counted once)
    # per layer: q 1024·2048 + k 1024·1024 + v 1024·1024 + o 2048·1024 = 6,291,456; mlp 3·1024·3072 = 9,437,184;
    #            q_norm, k_norm 2·128; two layer norms 2·1024  -> 15,730,944;  x 28 = 440,466,432
    # final norm 1024  -> 596,049,920
    shutil.copy(FIXTURES / "configs" / "Qwen3-0.6B.json", tmp_path / "config.json")
    run = tinyqwen("info", "--model", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "596,049,920" in run.stdout
    assert "440,467,456 without the embedding" in run.stdout  # 596,049,920 - 155,582,464
    # KV cache per token: 2 (K, V) · 28 layers · 8 kv heads · 128 · 4 bytes = 229,376 B = 224.0 KiB
    assert "224.0 KiB per token" in run.stdout


def test_info_on_a_moe_config_reports_active_parameters(tmp_path):
    shutil.copy(FIXTURES / "configs" / "Qwen3-30B-A3B.json", tmp_path / "config.json")
    run = tinyqwen("info", "--model", str(tmp_path))
    assert run.returncode == 0, run.stderr
    total = int(run.stdout.split("parameters")[1].split()[0].replace(",", ""))
    active = int(run.stdout.split("active")[1].split()[0].replace(",", ""))
    assert 30.0e9 < total < 30.9e9 and 3.0e9 < active < 3.6e9  # "30B-A3B": 30.5B total, 3.3B active


# ------------------------------------------------------------------------------------------ errors


def test_missing_model_id_offline_says_what_to_run(tmp_path):
    run = tinyqwen("info", "--model", "Qwen/Qwen3-0.6B", HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    from tinyqwen.hub import (
        download_command,
    )  # `hf download` or `huggingface-cli download`: what is installed

    assert_one_line_error(
        run, "Qwen/Qwen3-0.6B", "not in the Hugging Face cache", download_command("Qwen/Qwen3-0.6B")
    )
    if importlib.util.find_spec("huggingface_hub") is None or "hf" in {
        e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points
    }:
        assert "hf download Qwen/Qwen3-0.6B" in run.stderr


def test_missing_directory(tmp_path):
    assert_one_line_error(tinyqwen("info", "--model", str(tmp_path / "nope")), "no such directory")


def test_model_id_found_in_the_hugging_face_cache(tmp_path, tiny_qwen3_dir):
    snapshot = tmp_path / "models--Tiny--Qwen3" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--Tiny--Qwen3" / "refs").mkdir()
    (tmp_path / "models--Tiny--Qwen3" / "refs" / "main").write_text("0123abcd")
    for file in tiny_qwen3_dir.iterdir():
        (snapshot / file.name).symlink_to(file)  # the real cache links into blobs/ the same way
    run = tinyqwen("info", "--model", "Tiny/Qwen3", HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    assert str(snapshot) in run.stdout


def test_unknown_backend(tiny_qwen3_dir, tokenizer):
    run = tinyqwen("generate", "--model", str(tiny_qwen3_dir), "--backend", "tpu", "hi")
    assert_one_line_error(run, "unknown backend 'tpu'")


def test_checkpoint_without_tokenizer_files(tmp_path):
    folder = write_tiny_qwen3(tmp_path / "no-tokenizer", with_tokenizer=False)
    run = tinyqwen("generate", "--model", str(folder), "hi")
    assert_one_line_error(run, "no tokenizer files", "--tokenizer")


def test_prompt_longer_than_the_context(tmp_path, tokenizer):
    folder = write_tiny_qwen3(tmp_path / "short", max_position_embeddings=32)
    run = tinyqwen("generate", "--model", str(folder), "--raw", "word" + " word" * 39)  # 40 tokens
    assert_one_line_error(run, "prompt has 40 tokens but the model's context is 32")


def test_bad_sampling_flag(tiny_qwen3_dir, tokenizer):
    run = tinyqwen("generate", "--model", str(tiny_qwen3_dir), "--top-p", "1.5", "hi")
    assert_one_line_error(run, "top_p must be in (0, 1]")


# ------------------------------------------------------------------------------------------ generate


def test_generate_matches_the_library_single_and_batched(
    tmp_path, tiny_qwen3_dir, tiny_qwen3_model, tokenizer
):
    from tinyqwen.chat_template import apply_chat_template
    from tinyqwen.generation import generate

    prompts = ["What is 2+2?", "Name a prime number /no_think", "Hi"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    run = tinyqwen("generate", "--model", str(tiny_qwen3_dir), "--file", str(tmp_path / "prompts.txt"),
                   "--temperature", "0", "--max-new-tokens", "6", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for prompt, record in zip(prompts, records, strict=True):
        text = apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert record["ids"] == generate(tiny_qwen3_model, tokenizer.encode(text), 6)


# ------------------------------------------------------------------------------------------ chat in a terminal


def test_chat_end_to_end_in_a_pty(tiny_qwen3_dir, tiny_qwen3_model, tokenizer):
    """Two turns through a real terminal: the second prompt holds the first exchange, /no_think switches the
    mode (and the non-thinking preset), and Ctrl-D exits with status 0."""
    pexpect = pytest.importorskip("pexpect")
    from tinyqwen.chat_template import apply_chat_template
    from tinyqwen.cli import answer_text
    from tinyqwen.generation import generate

    # what the REPL should do, computed here with the library
    eos = (151645, 151643)
    first = [{"role": "user", "content": "Hello there"}]
    reply = generate(
        tiny_qwen3_model, tokenizer.encode(apply_chat_template(first, add_generation_prompt=True)), 8
    )
    answer = answer_text(tokenizer, reply, eos)[1]
    second = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Be brief /no_think"},
    ]
    second_prompt = apply_chat_template(second, add_generation_prompt=True)
    second_len = len(tokenizer.encode(second_prompt))

    child = pexpect.spawn(
        sys.executable,
        ["-m", "tinyqwen.cli", "chat", "--model", str(tiny_qwen3_dir), "--temperature", "0", "--max-new-tokens",
         "8", "--show-prompt", "--no-color"],
        env=env(), cwd=str(REPO), encoding="utf-8", timeout=120, dimensions=(50, 400),
    )  # fmt: skip
    try:
        child.expect_exact(">>> ")
        child.sendline("Hello there")
        child.expect(r"\[prompt: \d+ tokens, thinking mode\]")
        child.expect_exact("[/prompt]")
        child.expect_exact(">>> ")
        child.sendline("Be brief /no_think")
        child.expect(r"\[prompt: (\d+) tokens, (\S+) mode\]")
        assert int(child.match.group(1)) == second_len, "the second prompt must carry the first exchange"
        assert child.match.group(2) == "non-thinking"
        child.expect_exact("[/prompt]")
        shown = child.before.replace("\r\n", "\n")
        assert "<|im_start|>user\nHello there<|im_end|>" in shown
        assert "<|im_start|>user\nBe brief /no_think<|im_end|>\n<|im_start|>assistant\n" in shown
        assert shown.count("<|im_start|>assistant\n") == 2
        child.expect_exact(">>> ")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in (child.before or "")


# ------------------------------------------------------------------------------------------ verify, bench


def test_verify_without_transformers_uses_stored_reference_or_says_what_to_install(
    monkeypatch, capsys, tmp_path
):

    import tinyqwen.verify
    from tinyqwen.cli import main

    monkeypatch.setattr(tinyqwen.verify, "transformers_available", lambda: False)
    # a committed fixture carries transformers' logits: verify compares against those, no torch needed
    assert main(["verify", "--model", str(FIXTURES / "dense-yarn")]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("OK: tinyqwen's logits equal Hugging Face transformers'")
        and "(stored in reference.npz)" in out
    )
    assert "TOO FAR" not in out
    # a stored reference that disagrees is reported as a mismatch, exit 1
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "dense-yarn", bad)
    ref = dict(np.load(bad / "reference.npz"))
    ref["logits"] = ref["logits"] + 0.01
    np.savez(bad / "reference.npz", **ref)
    assert main(["verify", "--model", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("MISMATCH") and "TOO FAR: largest |tinyqwen - transformers| = 1.0e-02" in out
    # no stored reference and no transformers: one line saying what to install
    (bad / "reference.npz").unlink()
    assert main(["verify", "--model", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "tinyqwen[crosscheck]"' in err


@pytest.mark.crosscheck
@pytest.mark.slow
def test_verify_against_transformers_on_a_fixture():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    run = tinyqwen("verify", "--model", str(FIXTURES / "moe-norm-topk"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("OK: tinyqwen's logits equal")
    assert "transformers 5.23.0 computes for them now (random ids)" in run.stdout
    assert "agrees at 32/32 positions" in run.stdout and "TOO FAR" not in run.stdout


def test_bench_reports_prefill_and_decode_speed():
    run = tinyqwen(
        "bench",
        "--model",
        str(FIXTURES / "dense-yarn"),
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "4",
        "--no-peer",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].split() == ["engine", "prefill", "tok/s", "decode", "tok/s"]
    assert lines[1].startswith("tinyqwen (numpy, fp32)") and len(lines) == 2
    prefill, decode = map(float, lines[1].split()[-2:])
    assert prefill > 0 and decode > 0


@pytest.mark.crosscheck
def test_bench_prints_ratio_against_transformers_in_the_same_run():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    run = tinyqwen(
        "bench", "--model", str(FIXTURES / "dense-yarn"), "--prompt-tokens", "16", "--new-tokens", "4"
    )
    assert run.returncode == 0, run.stderr
    assert "transformers 5." in run.stdout and "ratio tinyqwen / transformers" in run.stdout
