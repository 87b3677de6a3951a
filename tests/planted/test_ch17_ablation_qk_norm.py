"""Planted mistakes for the QK-Norm ablation: a loop that is not the specified one fails with the slip named."""

from __future__ import annotations

import exercises.solutions.ch17_ablation_qk_norm as solution
import exercises.test_ch17_ablation_qk_norm as grading


def switch_ignored(lr, steps, qk_norm):
    return solution.train_run(lr, steps, qk_norm=True)


def swapped(lrs, steps):
    result = solution.ablation(lrs, steps)
    return {"qk_norm": result["no_qk_norm"], "no_qk_norm": result["qk_norm"]}


def test_switch_ignored(solutions, assert_caught):
    buggy = solutions.with_overrides("ch17", train_run=switch_ignored)
    assert_caught(grading.test_train_run, buggy, hint="qk_norm switch")


def test_no_clipping(solutions, assert_caught):
    buggy = solutions.with_overrides("ch17", train_run=grading._without_clipping)
    assert_caught(grading.test_train_run, buggy, hint="not clipped")


def test_swapped(solutions, assert_caught):
    buggy = solutions.with_overrides("ch17", ablation=swapped)
    assert_caught(grading.test_ablation, buggy, hint="swapped")
