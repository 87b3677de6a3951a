"""What every chapter starts with, written once: `from course_setup import FIXTURES, REPO`.

A chapter runs with this folder, notebooks/, as its working directory (Jupyter, nbmake and the book's build all do
that), so this module beside the chapters is importable from each of them. Importing it

- finds the repository: the folder above this one, which holds pyproject.toml;
- puts it first on sys.path, so that `import tinyqwen` means this checkout's tinyqwen — from a fresh clone without
  installing anything, and ahead of a tinyqwen installed from another checkout;
- names the folders the chapters read: REPO, and FIXTURES (the tiny checkpoints in tests/fixtures/).

A chapter imports it before tinyqwen. It never imports tinyqwen itself, and it changes nothing but sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # resolve(): the book reaches this folder through a symlink
if not (REPO / "pyproject.toml").is_file():
    raise ImportError(
        f"course_setup: {REPO} has no pyproject.toml; the notebooks live in a tinyqwen checkout"
    )
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))

FIXTURES = REPO / "tests" / "fixtures"
