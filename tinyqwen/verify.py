"""`tinyqwen verify`: compare our logits on a checkpoint with Hugging Face transformers' logits.

tinyqwen itself never imports torch or transformers. The reference side runs as a separate Python process (the
script below, fed to `python -c`), which loads the checkpoint with `AutoModelForCausalLM` in float32 and writes its
logits to a .npz file; this process then compares. So `verify` works where transformers is installed and says
what to install where it is not, and nothing else in tinyqwen depends on it.

Checkpoints that carry a `reference.npz` (the committed fixtures in tests/fixtures/) also hold transformers' logits
recorded by tests/fixtures/make_fixtures.py; `verify_stored` compares against those, no torch needed.

What "equal" means in numbers is defined once, here (`RTOL`, `tolerance`), and used by `tinyqwen verify`,
tests/test_model.py and tests/test_crosscheck.py alike.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyqwen.errors import TinyQwenError

# ------------------------------------------------------------------------------ "equal to the official implementation"

RTOL = 1e-5
"""tinyqwen's outputs equal transformers' when every compared value (logits, hidden states, router logits) obeys

    |ours - theirs|  <=  RTOL * max(1, max |theirs|)          (`tolerance(theirs)`)

that is, one part in 100,000 of the largest value compared (1e-5 absolute for values below 1): 6.3e-5 for the
logits of moe-norm-topk (largest |logit| 6.29), 2.1e-4 for those of dense-yarn (21.2).

Why relative to the values' size: float32 keeps about 7 significant digits (machine epsilon 2**-23 = 1.2e-7), so
the rounding error of a long sum grows with the size of what is summed. Two programs that compute the same
formulas in a different order (NumPy + OpenBLAS vs torch; or torch on an Intel AVX-512/AMX CPU vs an AMD one,
whose kernels block their sums differently) agree to some dozens of float32 steps of the values' magnitude, not to
a fixed absolute number: an AMD EPYC host re-running transformers found the stored logits of dense-tied and
moe-sparse-step 1.03e-5 and 1.07e-5 away, which an absolute 1e-5 wrongly called drift.

Why 1e-5, measured as max |difference| / max(1, max |reference|) on every fixture in tests/fixtures/:
- tinyqwen vs transformers' stored outputs: at most 1.7e-6 (OpenBLAS's SkylakeX, Haswell and Prescott kernels),
  and 1.9e-6 on a random checkpoint of Qwen3-0.6B's full shape (28 layers, hidden 1024): depth barely adds;
- transformers' stored outputs vs transformers re-run with other kernels (torch DEFAULT / AVX2 / AVX-512, MKL on
  SSE4.2 / AVX2 / "COMPATIBLE"): at most 1.9e-6;
- real mistakes land above it: RMSNorm with eps 1e-5 (Llama's) instead of Qwen3's 1e-6 moves the logits by
  1.9e-5 to 2.9e-5; a YaRN attention factor 0.1% off by 2e-3; a wrong RoPE layout, a missing norm or a wrong
  expert by 1e-2 to 1.
So the bound sits about 5x above float32 noise on any CPU and still below the subtlest real bug we know of.
"""


def tolerance(reference, rtol: float = RTOL) -> float:
    """The largest |difference| from `reference` that still counts as equal: rtol * max(1, max |reference|).

    >>> tolerance([0.5, -20.0]), tolerance([0.001])
    (0.0002, 1e-05)
    """
    reference = np.asarray(reference, dtype=np.float64)
    return rtol * max(1.0, float(np.abs(reference).max(initial=0.0)))


# The reference side. Kept as text on purpose: it only ever runs in a child process.
_REFERENCE_SCRIPT = """
import importlib
import sys
import numpy as np
torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")

path, ids_file, out_file = sys.argv[1:4]
ids = np.load(ids_file)["input_ids"]
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
model.eval()
with torch.no_grad():
    logits = model(torch.from_numpy(ids).long()).logits.float().numpy()
np.savez(out_file, logits=logits, version=np.array(transformers.__version__))
"""


@dataclass(frozen=True)
class VerifyResult:
    """One comparison of tinyqwen's logits with transformers' on the same ids."""

    max_abs_diff: float  # max |ours - theirs| over every logit compared
    max_abs_logit: float  # max |theirs|: the scale `tolerance` is relative to
    shape: tuple[int, ...]  # [B, T, vocab] of the logits compared
    argmax_agree: int  # positions whose most likely next token is the same on both sides
    transformers_version: str
    stored: bool  # compared with outputs stored beside the checkpoint (reference.npz), not a live run

    @property
    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    def bound(self, rtol: float = RTOL, atol: float | None = None) -> float:
        """The largest difference that counts as equal: `atol` if given, else rtol * max(1, max |logit|)."""
        return atol if atol is not None else rtol * max(1.0, self.max_abs_logit)

    def ok(self, rtol: float = RTOL, atol: float | None = None) -> bool:
        return self.max_abs_diff <= self.bound(rtol, atol)


def _compare(ours: np.ndarray, theirs: np.ndarray, version: str, stored: bool) -> VerifyResult:
    if theirs.shape != ours.shape:
        where = "stored" if stored else "transformers"
        raise TinyQwenError(f"logit shapes differ: tinyqwen {list(ours.shape)}, {where} {list(theirs.shape)}")
    return VerifyResult(
        max_abs_diff=float(np.abs(ours.astype(np.float64) - theirs).max()),
        max_abs_logit=float(np.abs(theirs).max()),
        shape=tuple(int(n) for n in ours.shape),
        argmax_agree=int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
        transformers_version=version,
        stored=stored,
    )


def transformers_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def missing_modules(python: str, modules: tuple[str, ...]) -> list[str]:
    """The `modules` that the interpreter `python` cannot import (all of them if it does not run at all)."""
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    try:
        run = subprocess.run([python, "-c", probe, *modules], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return list(modules)
    return run.stdout.split() if run.returncode == 0 else list(modules)


def run_child(
    script: str,
    path: Path | str,
    inputs: dict[str, np.ndarray],
    *args,
    python: str | None = None,
    env: dict[str, str] | None = None,
    what: str = "the child process",
) -> dict:
    """Run `script` in a child Python (`python`, default this one); return the arrays it saved.

    The child sees `sys.argv[1:]` = checkpoint path, an .npz with `inputs`, the .npz to write, then `args`;
    `env` is added to this process's environment. A failing child is a TinyQwenError carrying its last stderr line.
    """
    with tempfile.TemporaryDirectory(prefix="tinyqwen-child-") as tmp:
        in_file, out_file = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(in_file, **inputs)
        argv = [
            python or sys.executable,
            "-c",
            script,
            str(path),
            str(in_file),
            str(out_file),
            *map(str, args),
        ]
        run = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if run.returncode != 0 or not out_file.exists():
            last = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}, no output"])[-1]
            raise TinyQwenError(f"{what} could not run the checkpoint {path}: {last}")
        with np.load(out_file) as data:
            return {name: data[name] for name in data.files}


def run_transformers(
    script: str,
    path: Path,
    inputs: dict[str, np.ndarray],
    *args,
    needed_for: str,
    python: str | None = None,
    env=None,
) -> dict:
    """`run_child` in a Python that has torch + transformers (this one, or `python`); says what to install if not."""
    if python is None and not transformers_available():
        raise TinyQwenError(f'{needed_for} needs torch and transformers: pip install "tinyqwen[crosscheck]"')
    if python is not None and (missing := missing_modules(python, ("torch", "transformers"))):
        raise TinyQwenError(
            f"{needed_for} needs torch and transformers, and {python} lacks {', '.join(missing)}"
        )
    return run_child(script, path, inputs, *args, python=python, env=env, what="transformers")


def reference_logits(path: Path, ids: np.ndarray) -> tuple[np.ndarray, str]:
    """transformers' float32 logits for `ids` [B, T] -> ([B, T, vocab], transformers version)."""
    out = run_transformers(_REFERENCE_SCRIPT, path, {"input_ids": ids}, needed_for="verify")
    return out["logits"], str(out["version"])


def verify_stored(model, reference: Path) -> VerifyResult:
    """Compare with transformers' logits stored beside the checkpoint (`reference.npz`: input_ids, logits)."""
    try:
        with np.load(reference) as data:
            ids, theirs = data["input_ids"], data["logits"]
    except (OSError, KeyError, ValueError) as e:
        raise TinyQwenError(f"{reference}: not a reference file with input_ids and logits ({e})") from None
    version = "?"
    made = Path(reference).with_name("generate.json")  # the fixtures record which transformers made them
    if made.is_file():
        try:
            version = str(json.loads(made.read_text(encoding="utf-8")).get("transformers_version", "?"))
        except (ValueError, AttributeError):
            pass
    return _compare(model.forward(ids).logits, theirs, version, stored=True)


def verify(model, ids: np.ndarray) -> VerifyResult:
    """Run both implementations on `ids` [B, T] and compare their logits."""
    ours = model.forward(ids).logits  # [B, T, vocab]
    theirs, version = reference_logits(model.path, ids)
    return _compare(ours, theirs, version, stored=False)


# ------------------------------------------------------------------------------------------ the report


def is_test_fixture(path: Path) -> bool:
    """A checkpoint made by tests/fixtures/make_fixtures.py: tiny, random weights, transformers' outputs beside."""
    made = Path(path) / "generate.json"
    try:
        return made.is_file() and "fixture" in json.loads(made.read_text(encoding="utf-8"))
    except (ValueError, TypeError):
        return False


def describe(config) -> str:
    """One line on what a checkpoint is, e.g. 'qwen3_moe: 2 layers, hidden 64, 8 experts (2 per token), vocab 512'."""
    parts = [f"{config.num_hidden_layers} layers", f"hidden {config.hidden_size}"]
    if config.is_moe:
        parts.append(f"{config.num_experts} experts ({config.num_experts_per_tok} per token)")
    parts.append(f"vocab {config.vocab_size:,}")
    return f"{config.model_type}: " + ", ".join(parts)


def report(
    model, name: str, results: list[VerifyResult], rtol: float = RTOL, atol: float | None = None
) -> str:
    """What `tinyqwen verify` prints: the verdict first, then what was compared, what the numbers mean, and what
    to do next, for someone who has never seen the project."""
    ok = all(r.ok(rtol, atol) for r in results)
    verdict = "equal" if ok else "differ from"
    lines = [
        f"{'OK' if ok else 'MISMATCH'}: tinyqwen's logits {verdict} Hugging Face transformers' on {name}",
        "",
    ]
    lines.append(f"  checkpoint  {describe(model.config)}")
    fixture = is_test_fixture(model.path)
    if fixture:
        lines += [
            "              a tiny test model with random weights: its text is gibberish, but every number it",
            "              computes must equal the official implementation's",
        ]
    for n, r in enumerate(results):
        B, T, V = r.shape
        if n:
            lines.append("")
        if r.stored:
            source = f"transformers {r.transformers_version} computed for them (stored in reference.npz)"
        else:
            source = f"transformers {r.transformers_version} computes for them now (random ids)"
        bound = r.bound(rtol, atol)
        allowed = f"{atol:g} absolute (--atol)" if atol is not None else f"{rtol:g} of it ({bound:.1e})"
        too_far = "" if r.ok(rtol, atol) else "TOO FAR: "
        lines += [
            f"  compared    {B * T} positions ({B} sequences x {T} tokens) x {V:,} logits each, with the logits",
            f"              {source}",
            f"  difference  {too_far}largest |tinyqwen - transformers| = {r.max_abs_diff:.1e}, that is "
            f"{r.max_abs_diff / max(1.0, r.max_abs_logit):.1e} of the largest |logit| ({r.max_abs_logit:.3g})",
            f"              equal allows {allowed}: float32 rounding stays below, a wrong formula goes above",
            f"  next token  the most likely next token agrees at {r.argmax_agree}/{B * T} positions",
        ]
    lines.append("")
    if not ok:
        lines += [
            "next: a difference this size means a formula differs, not rounding. `pytest tests/test_model.py`",
            "      compares the fixtures layer by layer and names the first layer that differs.",
        ]
    elif fixture:
        lines += [
            "next: `pytest` runs every check (no torch needed). With a real checkpoint:",
            '      tinyqwen chat --model Qwen/Qwen3-0.6B       (pip install "tinyqwen[hub]" downloads it)',
            '      tinyqwen verify --model Qwen/Qwen3-0.6B     (live comparison: pip install "tinyqwen[crosscheck]")',
        ]
    else:
        lines.append(f"next: tinyqwen chat --model {name}")
    return "\n".join(lines)
