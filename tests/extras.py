"""Tests that need an optional extra: skipped with the command that installs it on a learner's machine, failed in CI.

The README's first command installs the `course` extra only (what a learner needs); the GPU chapter's tools (`gpu`),
oneDNN (`onednn`) and the book's toolchain (`book`) are extras of their own, and `.[all]` installs every one. A test
that needs one of them calls `unavailable(...)`: on a learner's machine it skips and says what to install; with
CI=true, where everything is installed, a missing tool is a failure, never a silent skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str):
    """Skip on a learner's machine; fail in CI, where every test must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run in CI)")
    pytest.skip(reason)


def require(module: str, extra: str):
    """`module` imported, or the test skipped (failed in CI) naming the extra that installs it."""
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # "a.b" imports a first
        found = None
    if found is None:
        unavailable(f"{module} is not installed: pip install -e '.[{extra}]'")
    return importlib.import_module(module)
