"""Planted mistakes for chapter 9: classic chat-template and parsing bugs must fail with their hint.

The buggy templates are written the way a learner would write them from the exercise's docstring, with a switch per
bug; with every switch off the same code must pass (so the docstring's rules are enough to pass the checkpoints).
"""

from __future__ import annotations

import json

import pytest

from exercises import test_ch09_chat_template_thinking as grading
from exercises.solutions import ch09_chat_template_thinking as good


def render(messages, add_generation_prompt=False, enable_thinking=True, *, keep_old=False, header="\n",
           think="auto"):  # fmt: skip
    """A learner-style render_chat from the docstring's rules. keep_old: every turn keeps its reasoning;
    header: what follows '<|im_start|>assistant' in the generation prompt; think: 'auto' | 'always' | 'never'."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    out = []
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant":
            out.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
            continue
        reasoning = m.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        if (i > last_user and (i == len(messages) - 1 or reasoning)) or (keep_old and reasoning):
            out.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                       f"{content.lstrip(chr(10))}<|im_end|>\n")  # fmt: skip
        else:
            out.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant" + header)
        if think == "always" or (think == "auto" and not enable_thinking):
            out.append(good.EMPTY_THINK)
    return "".join(out)


def split_at_first(ids):
    index = ids.index(151668) + 1 if 151668 in ids else 0
    return list(ids[:index]), list(ids[index:])


def parse_keeping_blocks(text):
    _, calls = good.parse_tool_calls(text)
    return text.strip("\n"), calls


def parse_first_only(text):
    content, calls = good.parse_tool_calls(text)
    return content, calls[:1]


PLANTS = [
    ("render_chat", lambda m, g=False, t=True: render(m, g, t, header=""), grading.test_one_turn,
     "newline after '<|im_start|>assistant'"),
    ("render_chat", lambda m, g=False, t=True: render(m, g, t, think="always"), grading.test_one_turn,
     "although enable_thinking is True"),
    ("render_chat", lambda m, g=False, t=True: render(m, g, t, think="never"), grading.test_enable_thinking,
     "missing although enable_thinking is False"),
    ("render_chat", lambda m, g=False, t=True: render(m, g, t, keep_old=True), grading.test_reasoning_history,
     "kept its reasoning"),
    ("render_chat", lambda m, g=False, t=True: render(m, g, t, header=""), grading.test_your_qwen3_end_to_end,
     "newline after '<|im_start|>assistant'"),
    ("split_thinking", split_at_first, grading.test_split_thinking, "FIRST </think>"),
    ("parse_tool_calls", parse_keeping_blocks, grading.test_parse_tool_calls, "left in the content"),
    ("parse_tool_calls", parse_first_only, grading.test_parse_tool_calls, "only the first call"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "bug", "checkpoint", "hint"), PLANTS, ids=[f"{p[0]}-{p[3]}" for p in PLANTS]
)
def test_planted_mistake_is_caught(solutions, assert_caught, name, bug, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch09", **{name: bug}), hint=hint)


def test_learner_style_template_passes(solutions):
    """The same learner-style code with no bug switched on passes every template checkpoint: the docstring's rules
    are complete."""
    course = solutions.with_overrides("ch09", render_chat=render)
    for checkpoint in (grading.test_one_turn, grading.test_enable_thinking, grading.test_history,
                       grading.test_reasoning_history):  # fmt: skip
        checkpoint(course)
    assert json.dumps(render([{"role": "user", "content": "x"}], True, False)).count("think") == 2


def test_untouched_solutions_pass_the_planted_checkpoints(solutions):
    for checkpoint in {p[2] for p in PLANTS}:
        checkpoint(solutions)
