"""How the exercises are graded: compare with the official reference, then explain a failure like a teacher.

Each test in `exercises/test_chNN_*.py` takes one argument, `course` (see `exercises/conftest.py`): the
implementation under test. `course.ch04` is your `exercises/ch04_rope_yarn.py`, or — in solutions mode
(`pytest exercises/ --solutions`, or TINYQWEN_SOLUTIONS=1) — `exercises/solutions/ch04_rope_yarn.py`, which calls
tinyqwen's own code. The expected values are never tinyqwen's output: they are stored reference files made by the
official implementation (transformers, the official tokenizer; see `exercises/references/make_*.py`) or derived by
hand in the test.

The helpers a test uses:

    expect_close(got, want, what=..., atol=..., rtol=..., mistakes=[Mistake(...)], reread=...)   # float arrays
    expect_equal(got, want, what=..., mistakes=[...], reread=...)                                 # ids, text, ints
    expect(condition, what=..., problem=..., reread=...)                  # a property with its own message
    call(fn, *args, what=..., reread=..., hint=..., hints={KeyError: ...}, kwargs={...})   # run YOUR function
    Mistake(cause, wrong, hint)   # a classic bug and the output it would produce on the same input
    learner_model(course, upto=N, fixture=...)   # a real fixture model running YOUR kernels of chapters <= N
    reference_file("ch04_rope_yarn.npz")         # a chapter's stored expected values, exercises/references/
    reference(fixture)                           # transformers' stored outputs for a test fixture
    expect_logits(model, fixture, what=...)      # its logits vs transformers' stored logits for that fixture

A failure names the checkpoint and the input, the expected and the received shape, the largest difference and
where it is, how many values are off, and — when your output equals what a known classic mistake produces — that
mistake and how to fix it, plus the notebook section to re-read.

`learner_model(course, upto=N)` is the model of chapter N's model checkpoints: every function of chapters <= N
that the model has a place for is the learner's (cumulative: chapter 9's model runs the loader of chapter 2, the
kernels of 3-7, the cache of 8). exercises/learner.py (PARTS) lists them; the score table prints, under each
chapter, which of them ran inside the model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from exercises.learner import PARTS, CacheShapeError, LearnerFunctionError, YourCode
from tinyqwen.config import CONFIG_DIR
from tinyqwen.verify import tolerance

EXERCISES = Path(__file__).resolve().parent
REPO = EXERCISES.parent
REFERENCES = EXERCISES / "references"
FIXTURES = REPO / "tests" / "fixtures"


def config_json(name: str) -> dict:
    """A stored config.json as a dict: a test fixture's (`fixture-*`, in tests/fixtures/configs) or an official one
    (`Qwen3-0.6B`, ..., as tinyqwen ships it in tinyqwen/data/configs)."""
    folder = FIXTURES / "configs" if name.startswith("fixture-") else CONFIG_DIR
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


# chapter number -> (title in the score table, notebook slug)
CHAPTERS: dict[int, tuple[str, str]] = {
    1: ("Tokenization", "01-tokenization"),
    2: ("Loading weights", "02-loading-weights"),
    3: ("Embeddings & RMSNorm", "03-embeddings-rmsnorm"),
    4: ("RoPE & YaRN", "04-rope-yarn"),
    5: ("Attention", "05-attention"),
    6: ("The dense model", "06-dense-model"),
    7: ("Mixture of experts", "07-mixture-of-experts"),
    8: ("KV cache & generation", "08-kv-cache-generation"),
    9: ("Chat template & thinking", "09-chat-template-thinking"),
    10: ("Making it fast on the CPU", "10-numba"),
    11: ("Making it fast on the GPU", "11-cupy"),
    12: ("Serving", "12-serving"),
    13: ("Training a tiny Qwen3-MoE", "13-training"),
    14: ("Quantization", "14-quantization"),
    # beyond fill-in-the-function: a capstone per part of the course, problems graded by the number
    15: ("Capstone: Qwen3 from math", "06-dense-model"),
    16: ("Resource accounting", "10-numba"),
    17: ("Ablation: QK-Norm on/off", "13-training"),
    18: ("Capstone: tokenizer files", "01-tokenization"),
}

# "equal to transformers" for the whole model is the project's one definition, tinyqwen.verify.tolerance:
# |ours - theirs| <= LOGITS_RTOL * max(1, max |theirs|) — 6.3e-5 for logits of size 6, 1.7e-4 for size 17.
# expect_logits uses it, and its failure message prints both the bound and where it comes from. LOGITS_ATOL is the
# plain absolute bound the chapters use for other logit-sized values (router logits, single-sequence logits): the
# same order, 1e-4. Both sides compute in float32; the differences come from summation order in matrix products
# (~1e-6 relative per layer), while a real bug moves logits by 0.1 or more.
LOGITS_RTOL = 1e-5
LOGITS_ATOL = 1e-4


class GradeError(AssertionError):
    """A checkpoint failed; the message is written for the learner."""


def notebook(chapter: int, section: str | None = None) -> str:
    """'notebooks/04-rope-yarn.ipynb, section "9. YaRN"' — where to re-read; `section` is one of its headings."""
    slug = CHAPTERS[chapter][1]
    if section is not None and section not in headings(chapter):
        raise ValueError(
            f"the exercises send the learner to section {section!r} of notebooks/{slug}.py, which has no such "
            "heading: fix the pointer (or the heading)"
        )
    return f"notebooks/{slug}.ipynb" + (f', section "{section}"' if section else "")


@functools.cache
def headings(chapter: int) -> frozenset[str]:
    """The section titles of a chapter's notebook: its markdown lines '# ## 1.1 SiLU' (read once)."""
    source = REPO / "notebooks" / f"{CHAPTERS[chapter][1]}.py"
    lines = source.read_text(encoding="utf-8").splitlines()
    return frozenset(line.lstrip("# ").strip() for line in lines if line.startswith("# #"))


# ------------------------------------------------------------------------------------------ mistakes


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A classic bug: what it is, the output it would give on this very input, and what to change.

    `wrong` is that output (an array, a list, a string) or a zero-argument function computing it (called only when
    the check fails). When your output matches it, the failure message says so.
    """

    cause: str
    wrong: Any
    hint: str = ""

    def output(self) -> Any:
        return self.wrong() if callable(self.wrong) else self.wrong

    def describe(self) -> str:
        return f"likely cause: {self.cause}." + (f" {self.hint}" if self.hint else "")


def _matches(got: np.ndarray, wrong: Any, atol: float, rtol: float) -> bool:
    try:
        wrong = np.asarray(wrong)
        if wrong.shape != got.shape or wrong.dtype.kind not in "fiub" or got.dtype.kind not in "fiub":
            return False
        # a mistake is recognised with a looser tolerance than the grade: a bug seldom reproduces bit for bit
        return bool(np.allclose(got, wrong, atol=10 * atol + 1e-6, rtol=10 * rtol + 1e-6, equal_nan=True))
    except Exception:
        return False


def _diagnose(got, mistakes: Sequence[Mistake], same: Callable[[Any], bool]) -> list[str]:
    found = []
    for m in mistakes:
        try:
            if same(m.output()):
                found.append(m.describe())
        except Exception:  # a mistake that cannot be evaluated on this input simply does not match
            continue
    return found


def _fail(what: str, lines: list[str], inputs: str | None, reread: str | None) -> None:
    head = [what] + ([f"input: {inputs}"] if inputs else [])
    tail = [f"re-read: {reread}"] if reread else []
    raise GradeError("\n  ".join(head + lines + tail))


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return repr(v.item() if isinstance(v, np.generic) else v)


def _shape(a: np.ndarray) -> str:
    return f"{list(a.shape)} {a.dtype}"


# ------------------------------------------------------------------------------------------ expectations


def expect_close(
    got: Any,
    want: Any,
    *,
    what: str,
    atol: float,
    rtol: float = 0.0,
    mistakes: Sequence[Mistake] = (),
    reread: str | None = None,
    inputs: str | None = None,
) -> None:
    """Pass when |got - want| <= atol + rtol·|want| everywhere (numpy.allclose), shapes equal, no stray NaN."""
    if got is None:
        _fail(what, ["your function returned None — is a `return` missing?"], inputs, reread)
    want = np.asarray(want)
    try:
        got_a = np.asarray(got)
    except Exception:
        _fail(what, [f"expected an array {_shape(want)}, got {type(got).__name__}"], inputs, reread)
    if got_a.dtype.kind not in "fiub":
        _fail(what, [f"expected numbers {_shape(want)}, got an array of {got_a.dtype}"], inputs, reread)
    if got_a.shape != want.shape:
        lines = [f"expected shape {list(want.shape)}, got {list(got_a.shape)}"]
        if got_a.size == want.size and sorted(got_a.shape) == sorted(want.shape):
            lines.append("same number of values in another order: axes transposed or reshaped the wrong way?")
        elif got_a.ndim != want.ndim:
            lines.append(
                "a different number of axes: a missing keepdims=True, or a reduction over the wrong axis?"
            )
        lines += _diagnose(got_a, mistakes, lambda w: _matches(got_a, w, atol, rtol))
        _fail(what, lines, inputs, reread)
    got_f = got_a.astype(np.float64)
    want_f = want.astype(np.float64)
    bad_nan = ~np.isfinite(got_f) & np.isfinite(want_f)
    with np.errstate(invalid="ignore"):
        diff = np.abs(got_f - want_f)
        same_special = (np.isnan(got_f) & np.isnan(want_f)) | (np.isinf(want_f) & (got_f == want_f))
        off = ~(diff <= atol + rtol * np.abs(want_f)) & ~same_special
    if not off.any():
        return
    lines = [f"shape {list(want.shape)} is right; {int(off.sum()):,} of {want.size:,} values are off"]
    if bad_nan.any():
        where = tuple(int(i) for i in np.argwhere(bad_nan)[0])
        lines.append(
            f"{int(bad_nan.sum()):,} values are NaN or inf (first at {list(where)}) where the reference is finite: "
            "an overflow (exp of a large number?) or a division by zero"
        )
    finite = np.where(np.isfinite(diff), diff, -1.0)
    where = np.unravel_index(int(np.argmax(finite)), want.shape)
    if finite[where] >= 0:
        lines.append(
            f"largest difference {finite[where]:.3g} at {[int(i) for i in where]}: expected {_fmt(want[where])}, "
            f"got {_fmt(got_a[where])} (allowed |Δ| <= {atol:g}"
            + (f" + {rtol:g}·|expected|)" if rtol else ")")
        )
    scale = _constant_factor(got_f, want_f)
    if scale is not None:
        lines.append(
            f"your output is the expected one times {scale:.4g} everywhere: a missing or extra scale factor?"
        )
    lines += _diagnose(got_a, mistakes, lambda w: _matches(got_a, w, atol, rtol))
    _fail(what, lines, inputs, reread)


def _constant_factor(got: np.ndarray, want: np.ndarray) -> float | None:
    ok = np.isfinite(got) & np.isfinite(want) & (np.abs(want) > 1e-6)
    if ok.sum() < 4:
        return None
    ratio = got[ok] / want[ok]
    r = float(np.median(ratio))
    if abs(r) > 1e-3 and abs(r - 1) > 1e-3 and np.allclose(ratio, r, rtol=1e-3, atol=1e-6):
        return r
    return None


def expect_equal(
    got: Any,
    want: Any,
    *,
    what: str,
    mistakes: Sequence[Mistake] = (),
    reread: str | None = None,
    inputs: str | None = None,
) -> None:
    """Exact equality for ids, strings, ints, booleans and nested lists of them; shows the first difference."""
    if got is None and want is not None:
        _fail(what, ["your function returned None — is a `return` missing?"], inputs, reread)
    if isinstance(got, np.ndarray):
        got = got.tolist()
    if isinstance(want, np.ndarray):
        want = want.tolist()
    if isinstance(got, tuple) and isinstance(want, list):
        got = list(got)
    if got == want:
        return
    lines = _first_difference(got, want)
    lines += _diagnose(got, mistakes, lambda w: (w.tolist() if isinstance(w, np.ndarray) else w) == got)
    _fail(what, lines, inputs, reread)


def _first_difference(got: Any, want: Any) -> list[str]:
    if isinstance(want, str) and isinstance(got, str):
        i = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
        )
        lo = max(0, i - 20)
        return [
            f"texts differ from character {i} on (expected {len(want)} characters, got {len(got)})",
            f"expected …{want[lo : i + 20]!r}…",
            f"got      …{got[lo : i + 20]!r}…",
        ]
    if isinstance(want, list) and isinstance(got, list):
        i = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
        )
        lines = [f"expected {len(want)} items, got {len(got)}; the first difference is at index {i}"]
        if i < len(want) and i < len(got):
            lines.append(f"expected [{i}] = {want[i]!r}, got {got[i]!r}")
        lo = max(0, i - 3)
        lines.append(f"expected [{lo}:{i + 4}] = {want[lo : i + 4]!r}")
        lines.append(f"got      [{lo}:{i + 4}] = {got[lo : i + 4]!r}")
        return lines
    return [f"expected {want!r}", f"got      {got!r}"]


def expect(
    condition: bool, *, what: str, problem: str, reread: str | None = None, inputs: str | None = None
) -> None:
    """A check with its own message, for properties that are not one array (e.g. "the cache was used")."""
    if not condition:
        _fail(what, [problem], inputs, reread)


def call(
    fn: Callable,
    *args: Any,
    what: str,
    reread: str | None = None,
    hint: str = "",
    hints: Mapping[type[BaseException] | str, str] | None = None,
    inputs: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """fn(*args, **kwargs), the learner's function; a crash in it becomes a failure written for the learner.

    NotImplementedError ("not written yet") and GradeError pass through. Any other exception is a wrong answer: the
    message names the call (`what`, `inputs`), the exception's type and the first line of its message, a hint, and
    the section to re-read. The hint is `hints[key]` for the first key that is the exception's type (isinstance) or
    a text in its message, else `hint`. `kwargs` is a dict so that fn's own keywords never clash with these.
    """
    try:
        return fn(*args, **(kwargs or {}))
    except (NotImplementedError, GradeError):
        raise
    except Exception as error:  # e.g. a NumPy shape error deep inside: one line, plus what usually causes it
        crash = error
    text = str(crash).strip()
    lines = [f"your code raised {type(crash).__name__}" + (f": {text.splitlines()[0]}" if text else "")]
    for key, key_hint in (hints or {}).items():
        if isinstance(crash, key) if isinstance(key, type) else key in text:
            hint = key_hint
            break
    _fail(what, lines + ([hint] if hint else []), inputs, reread)  # outside `except`: no chained traceback


# ------------------------------------------------------------------------------------------ the course


class Course:
    """The implementation being graded: the learner's `exercises/chNN_*.py`, or the solutions.

    `course.ch04` is the chapter's module; `course.with_overrides("ch04", apply_rope=f)` is a copy of the course in
    which that chapter's `apply_rope` is `f` (the planted-mistake tests inject bugs this way).
    """

    def __init__(self, solutions: bool = False, overrides: dict[str, dict[str, Any]] | None = None):
        self.solutions = solutions
        self._overrides = overrides or {}

    def __repr__(self) -> str:
        return f"Course(solutions={self.solutions})"

    def module_name(self, chapter: str) -> str:
        number = int(chapter.removeprefix("ch"))
        folder = EXERCISES / "solutions" if self.solutions else EXERCISES
        found = sorted(folder.glob(f"ch{number:02d}_*.py"))
        if not found:
            raise GradeError(f"no exercise file for chapter {number} in {folder}")
        package = "exercises.solutions" if self.solutions else "exercises"
        return f"{package}.{found[0].stem}"

    def __getattr__(self, name: str):
        if not (name.startswith("ch") and name[2:].isdigit()):
            raise AttributeError(name)
        module = importlib.import_module(self.module_name(name))
        extra = self._overrides.get(name)
        if not extra:
            return module
        view = SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
        for key, value in extra.items():
            setattr(view, key, value)
        view.__name__ = module.__name__
        return view

    def with_overrides(self, chapter: str, **functions: Any) -> Course:
        merged = {k: dict(v) for k, v in self._overrides.items()}
        merged.setdefault(chapter, {}).update(functions)
        return Course(self.solutions, merged)


def solutions_mode(flag: bool = False) -> bool:
    return flag or os.environ.get("TINYQWEN_SOLUTIONS", "").lower() in ("1", "true", "yes", "on")


def solutions_course() -> Course:
    """The course graded in solutions mode (tinyqwen's own code): the base the planted mistakes are injected into."""
    return Course(solutions=True)


# ------------------------------------------------------------------------------------------ the real model


class _GradedCode(YourCode):
    """YourCode whose crashes inside the model (and KV-cache shape errors) are failures written for the learner; a
    stub's NotImplementedError passes through ("not written yet")."""

    def __init__(self, course: Course, upto: int):
        super().__init__(course, upto, strict_errors=True, fallback_before=upto)

    def _crash(self, error: Exception, outer: str) -> Exception:
        if isinstance(error, (NotImplementedError, GradeError)):
            return error
        line = str(super()._crash(error, outer))
        return GradeError(
            f"{line}\n  it ran as part of the model, on the model's own shapes and dtypes (see its docstring's shapes, "
            "and backends/contract.py for what each place in the model passes)"
        )

    def cache_class(self):
        base = super().cache_class()

        class GradedCache(base):
            def update(self, layer, k, v):
                try:
                    return super().update(layer, k, v)
                except CacheShapeError as error:
                    raise GradeError(
                        f"your kv_cache_update inside the model\n  {error}\n  re-read: {notebook(8, 'The KV cache')}"
                    ) from None

        return GradedCache


# chapter -> the learner's code of that chapter's model checkpoints: the score table prints what ran inside the model
MODEL_RUNS: dict[int, list[YourCode]] = {}


def learner_model(course: Course, upto: int, fixture: str = "dense-tied", **replace: Callable):
    """A real checkpoint (tests/fixtures/<fixture>, or a folder) running every function of the learner's chapters
    <= upto that the model has a place for (exercises/learner.py: PARTS) — weights read by their loader, their
    kernels, mask, angles and KV cache. Everything else is tinyqwen's NumPy reference.

    Extra keyword arguments replace backend kernels by name (a classic mistake's output is computed that way);
    such a model is not reported in the score table. `model.your_code.ran` says which functions ran.
    """
    try:
        code = _GradedCode(course, upto)
    except LearnerFunctionError as error:  # a function renamed or deleted from an exercises file
        raise GradeError(str(error)) from None
    path = Path(fixture) if Path(fixture).is_absolute() else FIXTURES / fixture
    model = code.model(path, **replace)
    if not replace:
        MODEL_RUNS.setdefault(upto, []).append(code)
    return model


def stubs_replaced(chapter: int) -> list[int]:
    """The earlier chapters with functions still stubs, so tinyqwen's ran in their place in this chapter's model."""
    return sorted({c for code in MODEL_RUNS.get(chapter, []) for c in code.stub_chapter.values()})


def ran_inside_the_model(chapter: int) -> list[str]:
    """The learner's functions that ran inside the model during the chapter's checkpoints, in chapter order."""
    ran: dict[str, int] = {}
    for code in MODEL_RUNS.get(chapter, []):
        ran |= code.ran
    return sorted(ran, key=lambda name: (ran[name], _PART_ORDER.get(name, 99)))


_PART_ORDER = {name: i for parts in PARTS.values() for i, (name, _) in enumerate(parts)}


def your(model, name: str) -> Callable:
    """The learner's function `name` of a learner_model, recorded as running inside it (the generation loop)."""
    return model.your_code.traced(name)


class StoredArrays(Mapping[str, np.ndarray]):
    """The arrays of a reference .npz, read once; every lookup hands out a fresh copy (as numpy's NpzFile does), so
    a function under test that writes into its input cannot change what a later check compares against."""

    def __init__(self, path: Path):
        with np.load(path) as data:
            self._arrays = {k: data[k] for k in data.files}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key].copy()

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


@functools.cache
def reference_file(name: str) -> Any:
    """A chapter's stored expected values, exercises/references/<name>, read once per session.

    name.npz -> {key: array} (a StoredArrays: each lookup is a fresh copy); name.json -> the parsed object (shared:
    do not modify it). Not to be confused with `reference(fixture)`: transformers' outputs stored with a fixture.
    """
    path = REFERENCES / name
    if path.suffix == ".npz":
        return StoredArrays(path)
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    raise ValueError(f"reference_file reads .npz and .json files, not {name!r}")


def reference(fixture: str) -> dict[str, np.ndarray]:
    """transformers' stored outputs for a fixture: input_ids [2, T], logits [2, T, vocab], single_* ..."""
    with np.load(FIXTURES / fixture / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def expect_logits(
    model_or_logits: Any,
    fixture: str,
    *,
    what: str,
    reread: str | None = None,
    mistakes: Sequence[Mistake] = (),
) -> None:
    """The model's logits on the fixture's stored input equal transformers' (max |Δ| <= tinyqwen.verify.tolerance).

    Diagnoses the classic pattern: position 0 right but later positions wrong points at what mixes positions
    (RoPE, the causal mask, attention); everything wrong points at per-token pieces (norms, MLP, embedding, head).
    """
    ref = reference(fixture)
    if callable(model_or_logits):
        logits = model_or_logits(ref["input_ids"])
    else:
        logits = model_or_logits
    want = ref["logits"]
    bound = tolerance(want, LOGITS_RTOL)
    try:
        expect_close(logits, want, what=what, atol=bound, mistakes=mistakes, reread=reread,
                     inputs=f"fixture {fixture}, input_ids {list(ref['input_ids'].shape)}; logits equal when |Δ| <= "
                            f"{LOGITS_RTOL:g} · max(1, max |logit| = {np.abs(want).max():.3g}) = {bound:.2g}")  # fmt: skip
    except GradeError as error:
        got = np.asarray(logits, dtype=np.float64)
        if got.shape == want.shape and np.isfinite(got).all():
            per_position = np.abs(got - want).max(axis=(0, 2))  # [T]
            if per_position[0] <= bound < per_position[1:].max():
                note = ("position 0 is right but later positions are not: look at what mixes positions — RoPE "
                        "(pairing, angles), the causal mask, the attention softmax")  # fmt: skip
            else:
                note = ("position 0 is already wrong: look at the per-token pieces — RMSNorm, the MLP, the "
                        "embedding or the output head — at which kv head each query head uses (GQA grouping), or at "
                        "a softmax over the wrong axis (each query's weights must sum to 1 over the keys, the last "
                        "axis; over the queries even position 0 mixes in later tokens)")  # fmt: skip
            raise GradeError(_with_ran_line(f"{error}\n  {note}", model_or_logits)) from None
        raise GradeError(_with_ran_line(str(error), model_or_logits)) from None


def _with_ran_line(message: str, model: Any) -> str:
    """The message with, right under its first line, which of the learner's functions ran inside the model."""
    code = getattr(model, "your_code", None)
    if code is None:
        return message
    first, _, rest = message.partition("\n")
    return f"{first}\n  {code.report()}" + (f"\n{rest}" if rest else "")
