"""Planted mistakes: plausible learner bugs injected into the solutions must fail grading with the intended hint.

    def test_interleaved_rope_is_caught(solutions, assert_caught):
        buggy = solutions.with_overrides("ch04", apply_rope=interleaved_rope)
        assert_caught(grading.test_apply_rope, buggy, hint="split-half")

`solutions` is the course in solutions mode (tinyqwen's own code, which passes every checkpoint); `assert_caught`
runs one checkpoint (a test function of exercises/test_chNN_*.py) on the buggy course and checks that it fails with
a GradeError whose message contains `hint` (case-insensitive).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from exercises.grading import Course, GradeError, solutions_course  # noqa: E402


def caught(checkpoint, course: Course, hint: str) -> str:
    """Run `checkpoint(course)`; it must raise GradeError mentioning `hint`. Returns the message."""
    try:
        checkpoint(course)
    except GradeError as error:
        message = str(error)
    else:
        raise AssertionError(f"the planted mistake passed {checkpoint.__name__}: the grading cannot see it")
    assert hint.lower() in message.lower(), (
        f"{checkpoint.__name__} failed, but without the hint {hint!r}; its message was:\n{message}"
    )
    return message


@pytest.fixture(scope="session")
def solutions() -> Course:
    return solutions_course()


@pytest.fixture
def assert_caught():
    return caught
