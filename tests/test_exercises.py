"""The graded exercises grade: tinyqwen's own code passes every checkpoint, untouched stubs pass none.

Runs `pytest exercises/` twice in a subprocess, exactly as a learner (and CI) would: with `--solutions`, and on the
stubs as committed. Both runs must print the per-chapter score table.

The stubs run is never made on the learner's working files — a learner who has filled in chapter 3 must still see
this suite pass. It grades a copy of `exercises/` in a temporary folder whose `chNN_*.py` are the versions the
course shipped: read from git, at the upstream branch a clone tracks (`origin/HEAD`: a learner's own commits never
land there) or else at HEAD.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted(int(p.name[7:9]) for p in (REPO / "exercises").glob("test_ch[0-9][0-9]_*.py"))
ROW = re.compile(r"^Chapter +(\d+) .*?(\d+)/(\d+)", re.M)


def grade(*flags: str, root: Path = REPO) -> tuple[int, str, dict[int, tuple[int, int]]]:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "exercises", "-q", "-p", "no:cacheprovider", *flags],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    table = {int(c): (int(p), int(t)) for c, p, t in ROW.findall(run.stdout)}
    return run.returncode, run.stdout, table


def test_every_chapter_has_exercises():
    from exercises.grading import CHAPTERS as GRADED

    assert set(range(1, 11)) <= set(CHAPTERS), f"expected exercises for chapters 1-10, found {CHAPTERS}"
    # later chapters (13-training, ...) must be in the score table's list too
    assert set(CHAPTERS) <= set(GRADED), (
        f"exercises for chapters {sorted(set(CHAPTERS) - set(GRADED))} not in grading.CHAPTERS"
    )


def reread_pointers(path: Path) -> set[tuple[int, str]]:
    """(chapter, section) for every `reread("...")` and `notebook(N, "...")` written in a checkpoint file."""
    chapter = int(path.name[7:9])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            if node.func.id == "reread" and len(args) == 1 and isinstance(args[0], str):
                found.add((chapter, args[0]))
            elif node.func.id == "notebook" and len(args) == 2 and isinstance(args[1], str):
                found.add((args[0], args[1]))
    return found


def test_every_reread_pointer_is_a_notebook_heading():
    """Every section a failure sends the learner to is a heading of that chapter's notebook.

    grading.notebook refuses a missing heading whenever it runs; this reads the pointers from the source, so the
    ones only a failure reaches are checked too."""
    from exercises.grading import notebook

    found = {p.name: reread_pointers(p) for p in sorted((REPO / "exercises").glob("test_ch[0-9][0-9]_*.py"))}
    assert len(found) == len(CHAPTERS) and all(len(pointers) >= 3 for pointers in found.values()), found
    broken = []
    for name, pointers in found.items():
        for chapter, section in sorted(pointers):
            try:
                notebook(chapter, section)
            except ValueError as error:
                broken.append(f"{name}: {error}")
    assert not broken, "\n".join(broken)


@pytest.mark.slow
def test_solutions_pass_every_checkpoint():
    code, out, table = grade("--solutions")
    assert code == 0, out[-3000:]
    assert sorted(table) == CHAPTERS, out[-3000:]
    assert all(p == t > 0 for p, t in table.values()), table
    assert "Every checkpoint passes" in out


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def shipped_stubs(into: Path) -> Path:
    """A folder laid out like the repository whose `exercises/chNN_*.py` are the stubs as the course shipped them
    (git, at origin/HEAD or else HEAD); everything else links to the checkout. Skips where there is no git."""
    if shutil.which("git") is None or git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: the shipped stubs cannot be read (CI grades them on a clean clone)")
    ref = "origin/HEAD" if git("rev-parse", "--verify", "-q", "origin/HEAD").returncode == 0 else "HEAD"
    for name in ("tinyqwen", "backends", "tests", "notebooks", "pyproject.toml"):
        (into / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "exercises", into / "exercises", ignore=shutil.ignore_patterns("__pycache__"))
    for stub in sorted((REPO / "exercises").glob("ch[0-9][0-9]_*.py")):
        shipped = git("show", f"{ref}:exercises/{stub.name}")
        assert shipped.returncode == 0, f"git show {ref}:exercises/{stub.name}: {shipped.stderr.strip()}"
        (into / "exercises" / stub.name).write_text(shipped.stdout, encoding="utf-8")
    return into


@pytest.mark.slow
def test_untouched_stubs_pass_no_checkpoint(tmp_path):
    code, out, table = grade(root=shipped_stubs(tmp_path))
    assert code == 1, out[-3000:]
    assert sorted(table) == CHAPTERS, out[-3000:]
    assert all(p == 0 < t for p, t in table.values()), table
    assert " passed" not in out.splitlines()[-1], out.splitlines()[-1]
    assert "not written yet" in out and "Next: chapter 1" in out


def test_the_stubs_run_ignores_the_learners_work(tmp_path):
    """A filled-in exercise in the working tree does not reach the copy the stubs run grades."""
    root = shipped_stubs(tmp_path)
    for stub in sorted((REPO / "exercises").glob("ch[0-9][0-9]_*.py")):
        shipped = (root / "exercises" / stub.name).read_text(encoding="utf-8")
        assert "raise NotImplementedError" in shipped, stub.name
    assert (root / "exercises" / "ch03_embeddings_rmsnorm.py").resolve().parent == (
        root / "exercises"
    ).resolve()


@pytest.mark.slow
def test_a_learner_who_starts_at_chapter_3_can_complete_it(tmp_path):
    """Only chapter 3 written (the solution's functions pasted over the shipped stubs, chapter 2 untouched): every
    chapter 3 checkpoint passes; its model runs the learner's embed and rms_norm with tinyqwen's loader in place of
    the unwritten chapter 2, and the table says so."""
    root = shipped_stubs(tmp_path)
    solution = (REPO / "exercises" / "solutions" / "ch03_embeddings_rmsnorm.py").read_text(encoding="utf-8")
    stub = root / "exercises" / "ch03_embeddings_rmsnorm.py"
    stub.write_text(stub.read_text(encoding="utf-8") + "\n\n" + solution.split("import numpy as np", 1)[1])
    code, out, table = grade(root=root)
    assert code == 1 and table[3][0] == table[3][1] >= 10, out[-3000:]  # chapter 3 complete, the others not
    assert all(p == 0 for c, (p, _) in table.items() if c != 3), table
    assert "your functions inside the model: embed, rms_norm" in out, out[-3000:]
    assert "tinyqwen's in place of chapters 1, 2 (not written yet)" in out, out[-3000:]
    assert "your functions inside the model: causal_mask" not in out, out[
        -3000:
    ]  # a stub that raised never ran


@pytest.mark.slow
def test_deselected_checkpoints_are_not_run_not_failed():
    """With -k, the checkpoints left out are shown as not run: the table never says "0/10" while softmax passes,
    and its columns line up for chapters 1-13 alike."""
    code, out, table = grade("--solutions", "-k", "softmax")
    assert code == 0, out[-3000:]
    assert table[5][0] == table[5][1] >= 2, table  # the softmax checkpoints ran and passed
    assert all(p == t for p, t in table.values()), table  # nothing counts as failed
    assert "(8 not run)" in out and "Next:" not in out, out[-3000:]
    rows = [line for line in out.splitlines() if ROW.match(line)]
    assert len({line.rindex("/") for line in rows}) == 1, "\n".join(rows)  # one column (a title may hold a /)


# chapter -> the functions its model checkpoints must run (the solutions, which write every function)
IN_THE_MODEL = {
    3: {"load_checkpoint", "embed", "rms_norm"},
    4: {"rope_inv_freq", "rope_cos_sin", "apply_rope"},
    5: {"causal_mask", "attention"},
    6: {"linear", "swiglu"},
    7: {"moe_block"},
    8: {"kv_cache_update"},
}


@pytest.mark.parametrize("upto", [3, 4, 5, 6, 7, 8])
def test_the_model_runs_every_function_written_so_far(upto):
    """Cumulative: chapter N's model runs the learner's functions of every chapter <= N, and none of later ones."""
    from exercises.grading import learner_model, solutions_course

    fixture = "moe-sparse-step" if upto >= 7 else "dense-tied"  # MoE and dense layers
    model = learner_model(solutions_course(), upto=upto, fixture=fixture)
    cache = model.new_cache(1, 8)
    model.forward(np.array([[3, 1, 4, 1]]), cache=cache)
    model.forward(np.array([[5]]), cache=cache)
    ran = set(model.your_code.ran)
    want = set().union(*(names for chapter, names in IN_THE_MODEL.items() if chapter <= upto))
    later = set().union(*(names for chapter, names in IN_THE_MODEL.items() if chapter > upto))
    assert want <= ran, want - ran
    assert not ran & later, ran & later
    assert model.your_code.report().startswith("your functions that ran: load_checkpoint, embed, rms_norm")
