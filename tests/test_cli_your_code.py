"""`tinyqwen chat/generate --kernels exercises`: the learner's own functions inside a real model.

Run in-process (tinyqwen.cli.main) on a tiny real-vocabulary Qwen3, with the course's solutions standing in for a
learner who has written everything, a course of untouched stubs (built here, so a learner's filled-in files never
change what these tests see), and a learner function that raises.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from exercises.grading import solutions_course  # noqa: E402
from exercises.learner import PARTS, TOKENIZER, YourCode, is_stub  # noqa: E402
from tinyqwen.cli import main  # noqa: E402
from tinyqwen.cli import your_code as cli_your_code  # noqa: E402
from tinyqwen.testing import END_TO_END_SCALE, write_tiny_qwen3  # noqa: E402

NAMES = [name for parts in PARTS.values() for name, _ in parts] + list(TOKENIZER[1])


def _stub(*args, **kwargs):
    raise NotImplementedError


class StubCourse:
    """A course whose every function is the untouched stub: chNN modules holding only `raise NotImplementedError`."""

    def __getattr__(self, name: str):
        if not name.startswith("ch"):
            raise AttributeError(name)
        return SimpleNamespace(**dict.fromkeys(NAMES, _stub))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny"), seed=0, scale=END_TO_END_SCALE)


def run(monkeypatch, capsys, course, *args: str) -> tuple[int, str, str]:
    """`tinyqwen ARGS` with `course` as the exercises (YourCode exactly as --kernels builds it)."""
    monkeypatch.setattr(
        cli_your_code, "your_code", lambda which: YourCode(course, upto=9, fallback=True, strict_errors=True)
    )
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


GREEDY = ("generate", "--max-new-tokens", "6", "--temperature", "0", "--no-color", "Hello there")


def test_stub_detection():
    assert is_stub(_stub)
    assert not is_stub(solutions_course().ch05.attention)


def test_solutions_run_the_model_and_say_which(monkeypatch, capsys, tiny):
    code, want, _ = run(monkeypatch, capsys, solutions_course(), *GREEDY, "--model", str(tiny))
    assert code == 0
    code, got, err = run(
        monkeypatch, capsys, solutions_course(), *GREEDY, "--model", str(tiny), "--kernels", "solutions"
    )
    assert code == 0, err
    assert got == want  # the same greedy reply as tinyqwen's own kernels: every function really in place
    lines = err.strip().splitlines()
    assert lines[0].startswith("tinyqwen: --kernels solutions: your load_checkpoint (ch 2), embed (ch 3)"), (
        err
    )
    ran = lines[-1]
    assert ran.startswith("tinyqwen: your functions that ran: "), err
    for name in ("encode", "load_checkpoint", "embed", "rms_norm", "rope_cos_sin", "apply_rope", "causal_mask",
                 "attention", "linear", "swiglu", "kv_cache_update", "greedy_generate", "render_chat"):  # fmt: skip
        assert name in ran, (name, ran)


def test_solutions_sample_with_the_learners_distribution(monkeypatch, capsys, tiny):
    args = ("generate", "--max-new-tokens", "4", "--seed", "1", "--no-color", "Hi", "--model", str(tiny))
    code, _, err = run(monkeypatch, capsys, solutions_course(), *args, "--kernels", "solutions")
    assert code == 0, err
    assert "sampling_distribution" in err.strip().splitlines()[-1]


def test_stubs_fall_back_to_tinyqwen_and_say_so(monkeypatch, capsys, tiny):
    code, want, _ = run(monkeypatch, capsys, StubCourse(), *GREEDY, "--model", str(tiny))
    code, got, err = run(
        monkeypatch, capsys, StubCourse(), *GREEDY, "--model", str(tiny), "--kernels", "exercises"
    )
    assert code == 0, err
    assert got == want
    assert "none of your functions yet" in err
    assert "your functions that ran: none; still stubs, so tinyqwen's ran instead: load_checkpoint" in err


def test_a_learner_function_that_raises_is_one_line(monkeypatch, capsys, tiny):
    def attention(q, k, v, mask):
        raise ValueError("operands could not be broadcast together")

    course = solutions_course().with_overrides("ch05", attention=attention)
    code, _, err = run(monkeypatch, capsys, course, *GREEDY, "--model", str(tiny), "--kernels", "exercises")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last == (
        "tinyqwen: error: your attention() (exercises, chapter 5) raised ValueError: operands could not be "
        "broadcast together"
    ), err


def test_other_backends_are_refused(monkeypatch, capsys, tiny):
    code, _, err = run(monkeypatch, capsys, solutions_course(), *GREEDY, "--model", str(tiny),
                       "--kernels", "solutions", "--backend", "numba")  # fmt: skip
    assert code == 1 and err.strip() == (
        "tinyqwen: error: --kernels solutions runs your NumPy functions: it needs --backend numpy, got numba"
    )


def test_without_the_model_it_runs_on_a_stand_in_and_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code, out, err = run(monkeypatch, capsys, solutions_course(), *GREEDY, "--model", "Qwen/Qwen3-0.6B",
                         "--kernels", "solutions")  # fmt: skip
    assert code == 0, err
    notes = [line for line in err.splitlines() if "not available here" in line]
    assert len(notes) == 1 and "tiny random Qwen3" in notes[0], err
    assert out.strip()
