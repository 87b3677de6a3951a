"""The README's first minute, run as written: its Python example and its main command."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
from conftest import REPO
from test_cli import env

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_python_example() -> str:
    """The ```python block under '## Use it from Python'."""
    section = README.split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_example_runs_as_written(tiny_qwen3_dir, capsys):
    """Only the checkpoint path changes: a tiny random Qwen3 with the real tokenizer stands in for Qwen3-0.6B."""
    code = readme_python_example()
    assert code.count('"path/to/Qwen3-0.6B"') == 2
    namespace: dict = {}
    exec(compile(code.replace("path/to/Qwen3-0.6B", str(tiny_qwen3_dir)), "README.md", "exec"), namespace)
    tok, ids, new_ids = namespace["tok"], namespace["ids"], namespace["new_ids"]
    assert capsys.readouterr().out == tok.decode(new_ids) + "\n"
    assert 0 < len(new_ids) <= 64
    assert namespace["logits"].shape == (len(ids), namespace["model"].config.vocab_size)
    assert namespace["logits"].dtype == np.float32
    assert namespace["router_logits"] == [] and namespace["aux"] == 0.0  # a dense model has no router


def test_the_main_command_says_what_it_compared_and_what_next():
    command = re.search(r"tinyqwen verify --model ([^\s`]+)", README)
    assert command, "the README names `tinyqwen verify --model ...` as the engine check"
    model = command.group(1)
    run = subprocess.run([sys.executable, "-m", "tinyqwen.cli", "verify", "--model", model],
                         capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith(f"OK: tinyqwen's logits equal Hugging Face transformers' on {model}\n")
    # which checkpoint, and that its weights are random
    assert "qwen3_moe: 2 layers, hidden 64, 8 experts (2 per token), vocab 512" in out
    assert "random weights" in out
    # against what, on how much
    assert "24 positions (2 sequences x 12 tokens) x 512 logits each" in out
    assert "transformers 5.23.0" in out and "reference.npz" in out
    # what the number means: the difference, relative to the logits' size, and the bound
    diff, scaled, largest = re.search(
        r"largest \|tinyqwen - transformers\| = (\S+), that is (\S+) of the largest \|logit\| \((\S+)\)", out
    ).groups()
    assert abs(float(scaled) - float(diff) / float(largest)) <= 0.1 * float(scaled)  # printed with 2 digits
    assert "equal allows 1e-05 of it" in out
    assert "agrees at 24/24 positions" in out
    # and what to do next
    assert "next: `pytest`" in out and "tinyqwen chat --model Qwen/Qwen3-0.6B" in out
