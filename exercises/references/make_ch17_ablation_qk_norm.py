"""Regenerate exercises/references/ch17_ablation_qk_norm.json: the QK-Norm ablation as the course ran it.

    python exercises/references/make_ch17_ablation_qk_norm.py      # from the repository root, 1-2 minutes

Unlike the other reference makers this one runs the course's own loop (exercises/solutions/ch17_ablation_qk_norm.py):
an ablation has no official answer to compare with. Its pieces are the ones chapter 13 checks against torch
autograd (exercises/references/ch13_training.npz; tests/test_crosscheck_training.py trains the same loop next to
torch), and the two settings differ only in `qk_norm`, whose gradient tests/test_backward.py checks by finite
differences. One BLAS thread, so a run is reproducible to the last bit on one machine (to ~1e-5 across machines).

Keys: graded.{lrs, steps, curves.{qk_norm, no_qk_norm}} — the short runs the checkpoints compare with (per lr, the
loss of every step); full.{lrs, steps, final.{qk_norm, no_qk_norm}, curves.{...}} — the whole experiment the
notebook plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from exercises.solutions import ch17_ablation_qk_norm as ab  # noqa: E402
from tinyqwen.train import limit_blas_threads  # noqa: E402

GRADED_LRS, GRADED_STEPS = (1e-2, 3e-2), 15


def runs(lrs, steps) -> dict[str, list[list[float]]]:
    return {key: [ab.train_run(lr, steps, qk_norm=flag) for lr in lrs]
            for key, flag in (("qk_norm", True), ("no_qk_norm", False))}  # fmt: skip


def main() -> None:
    limit_blas_threads(1)
    graded = runs(GRADED_LRS, GRADED_STEPS)
    full = runs(ab.LRS, ab.STEPS)
    out = {
        "graded": {"lrs": list(GRADED_LRS), "steps": GRADED_STEPS, "curves": graded},
        "full": {
            "lrs": list(ab.LRS),
            "steps": ab.STEPS,
            "final": {key: [ab.final_loss(c) for c in curves] for key, curves in full.items()},
            "curves": full,
        },
    }
    path = REPO / "exercises" / "references" / "ch17_ablation_qk_norm.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    for i, lr in enumerate(ab.LRS):
        print(f"lr {lr:g}: with QK-Norm {out['full']['final']['qk_norm'][i]:.3f}, "
              f"without {out['full']['final']['no_qk_norm'][i]:.3f}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
