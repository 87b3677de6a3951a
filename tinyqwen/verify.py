"""`tinyqwen verify`: compare our logits on a checkpoint with Hugging Face transformers' logits.

tinyqwen itself never imports torch or transformers. The reference side runs as a separate Python process (the
script below, fed to `python -c`), which loads the checkpoint with `AutoModelForCausalLM` in float32 and writes its
logits to a .npz file; this process then compares. So `verify` works where transformers is installed and says
what to install where it is not, and nothing else in tinyqwen depends on it.

Checkpoints that carry a `reference.npz` (the committed fixtures in tests/fixtures/) also hold transformers' logits
recorded by tests/fixtures/make_fixtures.py; `verify_stored` compares against those, no torch needed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyqwen.errors import TinyQwenError

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
    max_abs_diff: float
    tokens: int
    argmax_agree: int
    transformers_version: str

    def ok(self, atol: float) -> bool:
        return self.max_abs_diff <= atol


def transformers_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def run_transformers(script: str, path: Path, inputs: dict[str, np.ndarray], *args, needed_for: str) -> dict:
    """Run `script` in a child Python that has torch + transformers; return the arrays it saved.

    The child sees `sys.argv[1:]` = checkpoint path, an .npz with `inputs`, the .npz to write, then `args`.
    """
    if not transformers_available():
        raise TinyQwenError(f'{needed_for} needs torch and transformers: pip install "tinyqwen[crosscheck]"')
    with tempfile.TemporaryDirectory(prefix="tinyqwen-transformers-") as tmp:
        in_file, out_file = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(in_file, **inputs)
        argv = [sys.executable, "-c", script, str(path), str(in_file), str(out_file), *map(str, args)]
        run = subprocess.run(argv, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise TinyQwenError(f"transformers could not run the checkpoint {path}: {last}")
        with np.load(out_file) as data:
            return {name: data[name] for name in data.files}


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
    ours = model.forward(ids).logits
    if theirs.shape != ours.shape:
        raise TinyQwenError(f"logit shapes differ: tinyqwen {list(ours.shape)}, stored {list(theirs.shape)}")
    return VerifyResult(
        max_abs_diff=float(np.abs(ours - theirs).max()),
        tokens=int(ids.size),
        argmax_agree=int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
        transformers_version="stored in " + reference.name,
    )


def verify(model, ids: np.ndarray) -> VerifyResult:
    """Run both implementations on `ids` [B, T] and compare their logits."""
    ours = model.forward(ids).logits  # [B, T, vocab]
    theirs, version = reference_logits(model.path, ids)
    if theirs.shape != ours.shape:
        raise TinyQwenError(
            f"logit shapes differ: tinyqwen {list(ours.shape)}, transformers {list(theirs.shape)}"
        )
    agree = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
    return VerifyResult(
        max_abs_diff=float(np.abs(ours - theirs).max()),
        tokens=int(ids.size),
        argmax_agree=agree,
        transformers_version=version,
    )
