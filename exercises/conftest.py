"""pytest plugin for the graded exercises: the `course` fixture, short teacher-style failures, the score table.

pytest exercises/                      grade your exercises/chNN_*.py
pytest exercises/test_ch04_rope_yarn.py   one chapter
pytest exercises/ --solutions          grade tinyqwen's own implementation instead (also TINYQWEN_SOLUTIONS=1)
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `import exercises...` from any working directory
    sys.path.insert(0, str(REPO))

from exercises.grading import (  # noqa: E402
    CHAPTERS,
    Course,
    GradeError,
    notebook,
    ran_inside_the_model,
    solutions_mode,
    stubs_replaced,
)

_CHAPTER_FILE = re.compile(r"(?:^|/)exercises/test_ch(\d\d)_\w+\.py$")


def pytest_addoption(parser):
    parser.addoption(
        "--solutions",
        action="store_true",
        default=False,
        help="grade tinyqwen's own implementation (exercises/solutions/) instead of your exercises",
    )


@pytest.fixture(scope="session")
def course(request) -> Course:
    return Course(solutions=solutions_mode(request.config.getoption("--solutions")))


def _chapter_of(nodeid: str) -> int | None:
    match = _CHAPTER_FILE.search(nodeid.split("::")[0])
    return int(match.group(1)) if match else None


def _not_written(excinfo, chapter: int) -> tuple[str, int]:
    """Which stub raised NotImplementedError, and its chapter: ('exercises/ch03_x.py: rms_norm()', 3)."""
    for entry in reversed(excinfo.traceback):
        path = Path(str(entry.path))
        if path.parent.name in ("exercises", "solutions") and re.match(r"ch\d\d_", path.name):
            return f"{path.parent.name}/{path.name}: {entry.name}()", int(path.name[2:4])
    return "a function of the exercises", chapter


class _Grades:
    """Collects, per chapter, each checkpoint's outcome in collection order."""

    def __init__(self):
        self.order: list[str] = []
        self.titles: dict[str, str] = {}
        self.outcome: dict[str, str] = {}  # passed / failed / skipped; absent: not run (deselected with -k)

    def add(self, item) -> None:
        if _chapter_of(item.nodeid) is not None and item.nodeid not in self.titles:
            self.order.append(item.nodeid)
            self.titles[item.nodeid] = self.title(item)

    def title(self, item) -> str:
        doc = (getattr(item, "function", None).__doc__ or "").strip().splitlines()
        return doc[0].rstrip(".") if doc else item.name


_grades = _Grades()


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        _grades.add(item)


def pytest_deselected(items):
    """Checkpoints left out by -k or -m still have their row: they show as not run, never as failed."""
    for item in items:
        _grades.add(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    chapter = _chapter_of(item.nodeid)
    if chapter is None or call.excinfo is None or report.when != "call":
        return
    title = _grades.titles.get(item.nodeid, item.name)
    head = f"Chapter {chapter} · {CHAPTERS[chapter][0]} · checkpoint {title!r}"
    error = call.excinfo.value
    if isinstance(error, NotImplementedError):
        stub, stub_chapter = _not_written(call.excinfo, chapter)
        report.longrepr = (
            f"{head}\n  not written yet: {stub} raises NotImplementedError.\n"
            f"  Work through {notebook(stub_chapter)}, then fill in the function (its docstring has a worked example)."
        )
    elif isinstance(error, GradeError):
        report.longrepr = f"{head}\n  {error}"


def pytest_runtest_logreport(report):
    if report.nodeid not in _grades.titles:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _grades.outcome[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _grades.order:
        return
    per_chapter: dict[int, list[str]] = defaultdict(list)
    for nodeid in _grades.order:
        per_chapter[_chapter_of(nodeid)].append(nodeid)
    write = terminalreporter.write_line
    mode = (
        "solutions (tinyqwen's own code)"
        if solutions_mode(config.getoption("--solutions"))
        else "your exercises"
    )
    terminalreporter.section(f"score: {mode}", sep="=")
    title_width = max(len(title) for title, _ in CHAPTERS.values())
    next_up, not_run = None, 0
    for chapter in sorted(per_chapter):
        ids = per_chapter[chapter]
        ran = [i for i in ids if _grades.outcome.get(i) in ("passed", "failed")]
        passed = sum(_grades.outcome.get(i) == "passed" for i in ran)
        bar = "".join(
            "█" if _grades.outcome.get(i) == "passed" else "░" if i in ran else "·" for i in ids
        )  # in collection order
        skipped = len(ids) - len(ran)
        not_run += skipped
        note = f"  ({skipped} not run)" if skipped else ""
        write(
            f"Chapter {chapter:>2} {CHAPTERS[chapter][0]:<{title_width}} {passed:>2}/{len(ran):<2} {bar}{note}"
        )
        inside = ran_inside_the_model(chapter)
        if inside:
            write(f"{'':11}your functions inside the model: {', '.join(inside)}")
        replaced = stubs_replaced(chapter)
        if replaced:
            chapters = ", ".join(map(str, replaced))
            plural = "s" if len(replaced) > 1 else ""
            write(f"{'':11}tinyqwen's in place of chapter{plural} {chapters} (not written yet)")
        if next_up is None:
            next_up = next((i for i in ran if _grades.outcome.get(i) != "passed"), None)
    if next_up is None:
        if not_run:
            write(f"Every checkpoint that ran passes ({not_run} not run: · in the bars).")
        else:
            write("Every checkpoint passes." + (" Your own code runs Qwen3." if 9 in per_chapter else ""))
    else:
        chapter = _chapter_of(next_up)
        write(f"Next: chapter {chapter}, {_grades.titles[next_up]!r} — pytest {next_up}")
        write(f"      (read {notebook(chapter)} first)")
