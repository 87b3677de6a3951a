"""The course notebooks: every notebooks/NN-slug.py has a committed, output-free .ipynb twin with the same cells.

The .py (jupytext percent format) is the source of truth in git; the .ipynb is what a learner opens. They are
regenerated with `jupytext --to ipynb notebooks/NN-slug.py`, and these tests make sure that was done. Running the
notebooks is not done here: CI executes each one (`pytest --nbmake notebooks/`) and the book build executes them
again. The checks below are static and take well under a second per notebook.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="the `course` extra (pip install -e '.[course]') is needed")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
BOOK = REPO / "book"
CHAPTER = re.compile(r"^(\d\d)-[a-z0-9]+(?:-[a-z0-9]+)*$")  # NN-slug: lower case words joined by "-"
SOURCES = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]-*.py"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
NOTEBOOK_LINK = re.compile(r"^(\d\d-[A-Za-z0-9_.-]+?)\.ipynb(?:#.*)?$")


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def cells(notebook) -> list[tuple[str, str, list]]:
    """What must agree between the two files: each cell's kind, text and tags (which the book reads, e.g.
    remove-input). Ids, outputs and Jupyter's view metadata (scrolled, collapsed) may differ."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in notebook.cells]


def committed_text(path: Path) -> str:
    """The file as staged in git (what the next commit holds), or as on disk when git does not track it.

    A learner who runs a notebook in Jupyter saves outputs into their working copy; that is fine and must not fail
    `pytest`. What may never carry outputs is the version in the repository.
    """
    git = shutil.which("git")
    if git is not None:
        rel = path.relative_to(REPO).as_posix()
        shown = subprocess.run(
            [git, "show", f":{rel}"], cwd=REPO, capture_output=True, text=True, encoding="utf-8"
        )
        if shown.returncode == 0:
            return shown.stdout
    return path.read_text(encoding="utf-8")


def test_chapter_files_come_in_named_pairs():
    """Every notebooks/NN-* file is NN-slug.py or NN-slug.ipynb, and has its twin beside it."""
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]-*")):
        assert path.suffix in (".py", ".ipynb"), f"{path.name}: chapter files are NN-slug.py/.ipynb pairs"
        assert CHAPTER.match(path.stem), f"{path.name}: chapter files are named NN-slug (e.g. 04-rope-yarn)"
        twin = path.with_suffix(".ipynb" if path.suffix == ".py" else ".py")
        assert twin.is_file(), f"{path.name} has no {twin.name} beside it"


def test_chapter_numbers_are_unique():
    numbers = [p.name[:2] for p in SOURCES]
    assert len(numbers) == len(set(numbers)), f"two notebooks share a chapter number: {numbers}"


@pytest.mark.parametrize("source", SOURCES, ids=ids(SOURCES))
def test_py_is_a_percent_notebook_with_a_python3_kernel(source):
    text = source.read_text(encoding="utf-8")
    assert text.startswith("# ---\n# jupyter:\n"), (
        f"{source.name}: no jupytext header (jupytext --to py:percent)"
    )
    notebook = jupytext.reads(text, fmt="py:percent")
    representation = notebook.metadata.get("jupytext", {}).get("text_representation", {})
    assert representation.get("format_name") == "percent", f"{source.name}: not in the percent format"
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", f"{source.name}: kernel python3"
    assert any(c.cell_type == "markdown" for c in notebook.cells) and any(
        c.cell_type == "code" for c in notebook.cells
    ), f"{source.name}: a chapter has prose and code"


@pytest.mark.parametrize("source", SOURCES, ids=ids(SOURCES))
def test_ipynb_has_the_cells_of_the_py(source):
    """The .ipynb a learner opens is `jupytext --to ipynb` of the .py: same cells, same order, same text."""
    twin = source.with_suffix(".ipynb")
    assert twin.is_file(), f"missing {twin.name}: run `jupytext --to ipynb notebooks/{source.name}`"
    want = jupytext.read(source)
    have = jupytext.read(twin)
    assert cells(have) == cells(want), (
        f"{twin.name} has drifted from {source.name}: run `jupytext --to ipynb notebooks/{source.name}`"
    )
    assert have.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("source", SOURCES, ids=ids(SOURCES))
def test_committed_ipynb_carries_no_outputs(source):
    twin = source.with_suffix(".ipynb")
    notebook = json.loads(committed_text(twin))
    for number, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
            f"{twin.name}, cell {number}: outputs are committed; regenerate it with "
            f"`jupytext --to ipynb notebooks/{source.name}`"
        )


@pytest.mark.parametrize("source", SOURCES, ids=ids(SOURCES))
def test_links_resolve_in_jupyter_and_in_the_book(source):
    """`[chapter 4](04-rope-yarn.ipynb)` must name an existing chapter (or a book placeholder such as 11-cupy);
    a relative link to any other file must name a file of the repository."""
    notebook = jupytext.read(source)
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for target in LINK.findall(cell.source):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # https:, mailto:, an anchor on the same page
            chapter = NOTEBOOK_LINK.match(target)
            if chapter:
                stem = chapter.group(1)
                assert (NOTEBOOKS / f"{stem}.py").is_file() or (BOOK / f"{stem}.md").is_file(), (
                    f"{source.name}: link to {target}, but there is no notebooks/{stem}.py"
                )
                continue
            path = (NOTEBOOKS / target.split("#")[0]).resolve()
            assert path.is_file() and path.is_relative_to(REPO), (
                f"{source.name}: link to {target}, which is not a file of the repository"
            )


@pytest.mark.parametrize("source", SOURCES, ids=ids(SOURCES))
def test_code_runs_offline_from_a_fresh_clone(source):
    """What the course conventions forbid in a notebook's code: torch/transformers, ../shared, __file__."""
    notebook = jupytext.read(source)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    for pattern, why in [
        (r"^\s*(import|from)\s+(torch|transformers)\b", "notebooks never import torch or transformers"),
        (r"\bshared/", "notebooks never read ../shared (a fresh clone has none)"),
        (r"__file__", "a notebook has no __file__: `from course_setup import REPO` names the repository"),
    ]:
        match = re.search(pattern, code, re.M)
        assert match is None, f"{source.name}: {why} (found {match.group(0).strip()!r})"


@pytest.mark.parametrize("source", SOURCES, ids=ids(SOURCES))
def test_the_set_up_is_one_import_of_course_setup(source):
    """Every chapter finds the repository the same way, written once in notebooks/course_setup.py: it imports
    course_setup once, before anything from tinyqwen, and never walks up to pyproject.toml or edits sys.path itself."""
    notebook = jupytext.read(source)
    lines = "\n".join(c.source for c in notebook.cells if c.cell_type == "code").splitlines()
    setup = [i for i, line in enumerate(lines) if re.match(r"from course_setup import \w", line)]
    assert len(setup) == 1, f"{source.name}: imports course_setup once (`from course_setup import REPO`)"
    tinyqwen = [i for i, line in enumerate(lines) if re.match(r"\s*(import|from)\s+tinyqwen\b", line)]
    assert all(i > setup[0] for i in tinyqwen), f"{source.name}: import course_setup before tinyqwen"
    by_hand = [
        line
        for i, line in enumerate(lines)
        if i != setup[0]
        and re.search(r"pyproject\.toml|sys\.path", line)
        # a folder of the checkout named from course_setup's REPO (chapter 11 adds tests/ for its executor) is fine
        and "str(REPO / " not in line
    ]
    assert not by_hand, (
        f"{source.name}: finds the repository by hand ({by_hand[0].strip()!r}); course_setup does that"
    )
