"""Part V capstone checkpoints: the QK-Norm ablation, run exactly as specified.

An ablation has no official answer: the stored curves (exercises/references/ch17_ablation_qk_norm.json, made by
exercises/references/make_ch17_ablation_qk_norm.py) are the course's own run of the loop the exercise specifies,
whose pieces chapter 13 checks against torch autograd. So these checkpoints grade that your experiment is the
specified one — same model, same data, same batches, same optimiser, one switch — and reproduces ours; what the
result means is for you to judge (the plot, and the question in the exercise file).

Tolerance: 1e-3 on a training loss after 15 steps. Two correct loops differ only by float32 summation order
(another BLAS thread count, another CPU): ~1e-5 here. Each classic slip below moves a loss by 0.01 or more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np

from exercises.grading import Mistake, call, expect, expect_close, notebook, reference_file

REF = reference_file("ch17_ablation_qk_norm.json")["graded"]
LOOP = notebook(13, "8. AdamW and the schedule")
RUN = notebook(13, "9. A short training run")
QK = notebook(5, "7. QK-Norm: bounded logits")


@contextlib.contextmanager
def one_blas_thread():
    """A tiny model's matrices run ~10x faster on one BLAS thread than on an oversubscribed pool."""
    from tinyqwen.train import limit_blas_threads

    before = limit_blas_threads(1)
    try:
        yield
    finally:
        if before:
            limit_blas_threads(before)


def _without_clipping(lr: float, steps: int, qk_norm: bool) -> list[float]:
    """The specified loop minus gradient clipping: what that slip produces (only to name it)."""
    from exercises.solutions import ch17_ablation_qk_norm as ab
    from tinyqwen.grad import loss_and_grads, named_parameters
    from tinyqwen.train import AdamW, init_weights

    config = ab.CONFIG if qk_norm else dataclasses.replace(ab.CONFIG, qk_norm=False)
    w = init_weights(ab.CONFIG, ab.SEED)
    params, opt, losses = named_parameters(w), AdamW(ab.BETAS, ab.ADAM_EPS, ab.WEIGHT_DECAY), []
    for step in range(1, steps + 1):
        r = loss_and_grads(config, w, ab.batch(step))
        opt.update(params, named_parameters(r.grads), lr)
        losses.append(r.ce)
    return losses


def test_train_run(course):
    """train_run: your loop reproduces the specified runs, with and without QK-Norm"""
    steps = REF["steps"]
    for i, lr in enumerate(REF["lrs"]):
        for key, flag in (("qk_norm", True), ("no_qk_norm", False)):
            other = "no_qk_norm" if flag else "qk_norm"
            with one_blas_thread():
                got = call(course.ch17.train_run, lr, steps, flag, reread=LOOP,
                           what=f"train_run(lr={lr:g}, steps={steps}, qk_norm={flag})")  # fmt: skip
            got = np.asarray(got, dtype=np.float64)
            want = np.asarray(REF["curves"][key][i])
            expect(got.shape == want.shape, what="train_run", reread=LOOP,
                   problem=f"expected one loss per step ({steps}), got an array of shape {list(got.shape)}")  # fmt: skip
            expect(abs(got[0] - want[0]) <= 1e-3, what=f"train_run(qk_norm={flag}): the loss of step 1", reread=RUN,
                   problem=f"step 1's loss is {got[0]:.4f}, expected {want[0]:.4f}: before any update, so the "
                           "initial weights (init_weights(CONFIG, SEED)), the batch (batch(1)) or the qk_norm "
                           "switch differ from the specification")  # fmt: skip
            expect_close(
                got, want, atol=1e-3, reread=LOOP, what=f"train_run(lr={lr:g}, qk_norm={flag}): the loss curve",
                inputs=f"CONFIG, batches batch(1..{steps}), AdamW {course.ch17.BETAS}, clip {course.ch17.GRAD_CLIP}",
                mistakes=[
                    Mistake("the qk_norm switch did not reach the model", REF["curves"][other][i],
                            f"Train dataclasses.replace(CONFIG, qk_norm={flag}): loss_and_grads reads the switch from the config."),
                    Mistake("the gradients were not clipped", functools.partial(_without_clipping, lr, steps, flag),
                            "Clip the global gradient norm to GRAD_CLIP before each AdamW update."),
                ],
            )  # fmt: skip


def test_ablation(course):
    """ablation: the experiment's final losses, with and without QK-Norm"""
    lrs, steps = tuple(REF["lrs"]), REF["steps"]
    with one_blas_thread():
        got = call(course.ch17.ablation, lrs, steps, reread=QK, what=f"ablation({lrs}, {steps})")
    expect(isinstance(got, dict) and set(got) == {"qk_norm", "no_qk_norm"}, what="ablation", reread=QK,
           problem=f"expected a dict with the keys 'qk_norm' and 'no_qk_norm', got {got!r:.120}")  # fmt: skip
    final = {k: [float(np.mean(c[-10:])) for c in curves] for k, curves in REF["curves"].items()}
    for key in ("qk_norm", "no_qk_norm"):
        other = "no_qk_norm" if key == "qk_norm" else "qk_norm"
        expect_close(got[key], final[key], atol=1e-3, reread=QK, what=f"ablation: {key!r}, one final loss per lr",
                     mistakes=[Mistake("the two settings are swapped", final[other],
                                       "'qk_norm' is the run WITH QK-Norm (Qwen3's architecture).")])  # fmt: skip
