"""Planted mistakes for chapter 12: classic serving bugs must fail the grading with their hint.

The buggy functions are written the way a learner would write them from the exercise's docstrings, with a switch per
bug; with every switch off the same code must pass (so the docstrings' rules are enough to pass the checkpoints).
"""

from __future__ import annotations

import json

import pytest

from exercises import test_ch12_serving as grading
from exercises.solutions import ch12_serving as good


def parse_sse(text, *, space_required=False, keep_unfinished=False, decode_done=False):
    """A learner-style SSE parser. space_required: only 'data: ' lines count; keep_unfinished: an event without its
    blank line is kept; decode_done: '[DONE]' goes through json.loads too."""
    events, data = [], None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for line in lines + ([""] if keep_unfinished else []):
        if line == "":
            if data is not None:
                value = "\n".join(data)
                events.append(value if value == "[DONE]" and not decode_done else json.loads(value))
            data = None
        elif line.startswith("data: ") or (line.startswith("data:") and not space_required):
            data = (data or []) + [line[6:] if line.startswith("data: ") else line[5:]]
    return events


def split_deltas(pieces, final=True, *, last=False, strip=True, hold=True):
    """A learner-style reasoning split. last: close the reasoning at the last </think>; strip: trim newlines;
    hold: hold back trailing newlines while streaming."""
    closes = [i for i, p in enumerate(pieces) if p == "</think>"]
    close_at = closes[-1] if (last and closes) else None
    out, mode, started, held = [], "content", {"reasoning_content": False, "content": False}, ""
    for i, piece in enumerate(pieces):
        if piece == "<think>" and mode == "content":
            mode, held = "reasoning_content", ""
            continue
        if piece == "</think>" and mode == "reasoning_content" and (close_at is None or i == close_at):
            mode, held = "content", ""
            continue
        if piece in good.END_OF_TURN:
            continue
        text = piece
        if strip and not started[mode]:
            text = text.lstrip("\n")
            started[mode] = bool(text)
        if strip and hold:
            text = held + text
            body = text.rstrip("\n")
            held, text = text[len(body) :], body
        if text:
            out.append((mode, text))
    if strip and not hold and final:  # strip at the very end only: what was sent stays sent
        out = [(k, t) for k, t in out]
        for kind in ("reasoning_content", "content"):
            idx = [i for i, (k, _) in enumerate(out) if k == kind]
            if idx:
                k, t = out[idx[-1]]
                out[idx[-1]] = (k, t.rstrip("\n"))
        out = [(k, t) for k, t in out if t]
    return out


def arguments_as_objects(content):
    rest, calls = good.parse_tool_calls(content)
    return rest, [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                  for c in calls]  # fmt: skip


def assemble_overwriting(chunks):
    message, finish = good.assemble(chunks)
    calls = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for piece in choice["delta"].get("tool_calls") or []:
                calls[piece["index"]] = piece["function"].get("arguments", "")
    for i, call in enumerate(message["tool_calls"] or []):
        call["function"]["arguments"] = calls[i]
    return message, finish


def follow_up_objects(messages, reply, tools):
    out = good.follow_up(messages, reply, tools)
    return out[:-1] + [{**out[-1], "content": json.loads(out[-1]["content"])}]


def follow_up_in_place(messages, reply, tools):
    messages.extend(good.follow_up([], reply, tools))
    return messages


PLANTS = [
    ("parse_sse", lambda t: parse_sse(t, space_required=True), grading.test_sse_details, "without a space"),
    ("parse_sse", lambda t: parse_sse(t, keep_unfinished=True), grading.test_sse_details, "unfinished event"),
    ("parse_sse", lambda t: parse_sse(t, decode_done=True), grading.test_sse_events, "[DONE]' is not JSON"),
    ("split_deltas", lambda p, f=True: split_deltas(p, f, last=True), grading.test_reasoning_split, "LAST </think>"),
    ("split_deltas", lambda p, f=True: split_deltas(p, f, strip=False), grading.test_reasoning_split,
     "newlines at the ends"),
    ("split_deltas", lambda p, f=True: split_deltas(p, f, hold=False), grading.test_deltas_never_take_back_text,
     "hold back newlines"),
    ("parse_tool_calls", arguments_as_objects, grading.test_tool_calls, "JSON *string*"),
    ("assemble", assemble_overwriting, grading.test_assemble, "replaced the arguments"),
    ("follow_up", follow_up_objects, grading.test_tool_round_trip, "sent as an object"),
    ("follow_up", follow_up_in_place, grading.test_tool_round_trip, "changed the list"),
    ("parse_sse", lambda t: parse_sse(t, decode_done=True), grading.test_your_client_against_the_real_server,
     "[DONE]' is not JSON"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "bug", "checkpoint", "hint"), PLANTS, ids=[f"{p[0]}-{p[3]}" for p in PLANTS]
)
def test_planted_mistake_is_caught(solutions, assert_caught, name, bug, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch12", **{name: bug}), hint=hint)


def test_learner_style_code_passes(solutions):
    """The learner-style functions with no bug switched on pass their checkpoints: the docstrings are complete."""
    course = solutions.with_overrides("ch12", parse_sse=parse_sse, split_deltas=split_deltas)
    for checkpoint in (grading.test_sse_events, grading.test_sse_details, grading.test_reasoning_split,
                       grading.test_deltas_never_take_back_text):  # fmt: skip
        checkpoint(course)


def test_untouched_solutions_pass_the_planted_checkpoints(solutions):
    for checkpoint in {p[2] for p in PLANTS}:
        checkpoint(solutions)


def scheduler_step(model, running, waiting, max_batch, prefill_budget, *, one_decode=True, chunked=True,
                   cap=True, release=True):  # fmt: skip
    """A learner-style scheduler step. one_decode: one batched decode (else one call per request); chunked: the
    prefill budget is respected (else whole prompts); cap: at most max_batch running; release: free finished."""
    finished = []

    def done(r):
        if r.output and (r.output[-1] in model.eos or len(r.output) >= r.max_tokens):
            running.remove(r)
            if release:
                model.release(r)
            finished.append(r)

    budget = prefill_budget if chunked else 10**9
    while budget > 0:
        partial = [r for r in running if r.prefilled < len(r.prompt)]
        if partial:
            r = partial[0]
        elif waiting and (len(running) < max_batch or not cap):
            r = waiting.pop(0)
            running.append(r)
        else:
            break
        n = min(budget, len(r.prompt) - r.prefilled)
        first = model.prefill(r, r.prompt[r.prefilled : r.prefilled + n])
        r.prefilled += n
        budget -= n
        if first is not None:
            r.output.append(first)
            done(r)
    ready = [r for r in running if r.prefilled == len(r.prompt)]
    groups = [ready] if one_decode else [[r] for r in ready]
    for group in groups:
        if group:
            for r, t in zip(group, model.decode(group, [r.output[-1] for r in group]), strict=True):
                r.output.append(t)
    for r in ready:
        done(r)
    return finished


SCHEDULER_PLANTS = [
    (dict(one_decode=False), "ONE decode call"),
    (dict(chunked=False), "over the budget"),
    (dict(cap=False), "more than max_batch"),
    (dict(release=False), "released"),
]


@pytest.mark.parametrize(("switch", "hint"), SCHEDULER_PLANTS, ids=[p[1] for p in SCHEDULER_PLANTS])
def test_planted_scheduler_mistake_is_caught(solutions, assert_caught, switch, hint):
    def bug(*args):
        return scheduler_step(*args, **switch)

    assert_caught(
        grading.test_scheduler_step, solutions.with_overrides("ch12", scheduler_step=bug), hint=hint
    )


def test_learner_style_scheduler_passes(solutions):
    grading.test_scheduler_step(solutions.with_overrides("ch12", scheduler_step=scheduler_step))
