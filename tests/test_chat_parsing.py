"""Reading replies: thinking/content split and tool-call parsing. Expected values are derived by hand."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyqwen.chat_parsing import (
    THINK_END_ID,
    THINK_START_ID,
    ToolCall,
    parse_tool_calls,
    split_thinking,
    split_thinking_text,
)
from tinyqwen.chat_template import apply_chat_template
from tinyqwen.errors import ToolCallParseError

# ------------------------------------------------------------------------------------------ split_thinking (ids)


def test_think_ids_are_the_official_ones():
    assert (THINK_START_ID, THINK_END_ID) == (151667, 151668)  # <think>, </think> in tokenizer_config.json


@pytest.mark.parametrize(
    "ids, thinking, content",
    [
        ([151667, 198, 11, 12, 151668, 271, 21], [198, 11, 12], [271, 21]),  # a normal thinking reply
        ([21, 22, 151645], [], [21, 22, 151645]),  # no </think>: everything is content
        ([], [], []),
        ([1, 151668, 2, 151668, 3], [1, 151668, 2], [3]),  # split at the LAST </think>
        ([151667, 5, 151668], [5], []),  # nothing after the think block
        ([151668, 7], [], [7]),  # </think> first (the <think> was in the prompt)
        ([5, 151667, 6, 151668, 8], [5, 151667, 6], [8]),  # only a LEADING <think> is dropped
        ([151667, 151668, 9], [], [9]),  # empty thinking
    ],
)
def test_split_thinking(ids, thinking, content):
    assert split_thinking(ids) == (thinking, content)


def test_split_thinking_accepts_arrays_and_returns_ints():
    thinking, content = split_thinking(np.array([151667, 3, 151668, 4], dtype=np.int64))
    assert (thinking, content) == ([3], [4])
    assert all(type(i) is int for i in thinking + content)


@given(st.lists(st.sampled_from([1, 2, 198, 271, THINK_START_ID, THINK_END_ID]), max_size=12))
def test_split_thinking_matches_model_card_index(ids):
    # Qwen3 model card: index = len(ids) - ids[::-1].index(151668), or 0 when there is no </think>.
    try:
        index = len(ids) - ids[::-1].index(THINK_END_ID)
    except ValueError:
        index = 0
    thinking, content = split_thinking(ids)
    assert content == ids[index:]
    before = ids[: max(index - 1, 0)]
    assert thinking == (before[1:] if before[:1] == [THINK_START_ID] else before)
    assert THINK_END_ID not in content


# ------------------------------------------------------------------------------------------ split_thinking_text


@pytest.mark.parametrize(
    "text, thinking, content",
    [
        ("<think>\nLet me add.\n</think>\n\n4", "Let me add.", "4"),
        ("\n4\n", "", "4"),  # no </think>: all content, newlines stripped like the model card's .strip("\n")
        ("<think>\n\n</think>\n\nHi", "", "Hi"),  # the empty think block of enable_thinking=False
        ("<think>a</think>b</think>\nc", "a</think>b", "c"),  # last </think> wins
        ("reasoning\n</think>\n\nanswer", "reasoning", "answer"),  # the <think> was part of the prompt
        ("<think> spaced \n</think> kept ", " spaced ", " kept "),  # only newlines are stripped
        ("x<think>y</think>z", "x<think>y", "z"),  # a <think> that does not open the text stays
    ],
)
def test_split_thinking_text(text, thinking, content):
    assert split_thinking_text(text) == (thinking, content)


# ------------------------------------------------------------------------------------------ parse_tool_calls


def test_parse_one_call_with_text():
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    )
    assert parse_tool_calls(text) == ("Let me check.", [ToolCall("get_weather", {"city": "Zürich"})])


def test_parse_several_calls_keeps_order_and_text_between():
    text = (
        'A\n<tool_call>\n{"name": "f", "arguments": {"x": [1, 2.5, null, true]}}\n</tool_call>\nB\n'
        '<tool_call>{"name": "g", "arguments": "{\\"y\\": {\\"z\\": \\"w\\"}}"}</tool_call>\n'
    )
    content, calls = parse_tool_calls(text)
    assert content == "A\n\nB"
    assert calls == [ToolCall("f", {"x": [1, 2.5, None, True]}), ToolCall("g", {"y": {"z": "w"}})]


def test_parse_no_calls():
    assert parse_tool_calls("\nJust text <tool_response> is not a call.\n") == (
        "Just text <tool_response> is not a call.",
        [],
    )
    assert parse_tool_calls("") == ("", [])


def test_parse_ignores_extra_keys():
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {}, "id": 3}</tool_call>')[1] == [
        ToolCall("f", {})
    ]


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('<tool_call>{"name": "f", "arguments": {}</tool_call>', r"block 1: malformed JSON"),
        (
            '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{name: "g"}</tool_call>',
            r"block 2: malformed",
        ),
        ("<tool_call></tool_call>", r"block 1: malformed JSON"),
        ('<tool_call>["f", {}]</tool_call>', r"block 1: expected a JSON object, got an array"),
        ('<tool_call>"f"</tool_call>', r"expected a JSON object, got a string"),
        ('<tool_call>{"arguments": {}}</tool_call>', r"block 1: the object has no 'name'"),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', r"'name' must be a non-empty string, got 3"),
        ('<tool_call>{"name": "", "arguments": {}}</tool_call>', r"'name' must be a non-empty string"),
        ('<tool_call>{"name": "f"}</tool_call>', r"block 1 \(f\): the object has no 'arguments'"),
        (
            '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
            r"\(f\): 'arguments' must be a JSON object, got an array",
        ),
        ('<tool_call>{"name": "f", "arguments": null}</tool_call>', r"must be a JSON object, got null"),
        ('<tool_call>{"name": "f", "arguments": 2}</tool_call>', r"must be a JSON object, got a number"),
        (
            '<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>',
            r"'arguments' is a string that is not JSON",
        ),
        ('<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>', r"must be a JSON object, got an array"),
        (
            'ok <tool_call>\n{"name": "f", "arguments": {"x": 1',
            r"block 1: the <tool_call> at character 3 is never closed",
        ),
        (
            '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"na',
            r"block 2: .* never closed",
        ),
        ("text </tool_call> more", r"</tool_call> at character 5 has no opening <tool_call>"),
        (
            '<tool_call>{"name": "f", "arguments": {}}</tool_call></tool_call>',
            r"no opening .*after 1 complete",
        ),
    ],
)
def test_parse_errors(text, pattern):
    with pytest.raises(ToolCallParseError, match=pattern):
        parse_tool_calls(text)


# ------------------------------------------------------------------------------------------ round trip

SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="<>\n", blacklist_categories=("Cs",)), max_size=20
)
NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,12}", fullmatch=True)
VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | SAFE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_TEXT, inner, max_size=3),
    max_leaves=6,
)
ARGS = st.dictionaries(SAFE_TEXT, VALUE, max_size=4)


@settings(max_examples=200, deadline=None)
@given(SAFE_TEXT, SAFE_TEXT, st.lists(st.tuples(NAME, ARGS, st.booleans()), min_size=1, max_size=3))
def test_rendered_calls_parse_back(reasoning, content, calls):
    """Render an assistant turn with the template, cut out the reply, and read it back."""
    tool_calls = [
        {
            "type": "function",
            "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False) if as_str else a},
        }
        for n, a, as_str in calls
    ]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls},
    ]
    prompt = apply_chat_template(messages)
    reply = prompt.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")
    thinking, answer = split_thinking_text(reply)
    assert thinking == reasoning
    text, parsed = parse_tool_calls(answer)
    assert text == content
    assert parsed == [ToolCall(n, a) for n, a, _ in calls]
    # ToolCall is shaped like a template tool call: feeding it back renders the same turn.
    again = [messages[0], {**messages[1], "tool_calls": [dataclasses.asdict(c) for c in parsed]}]
    assert apply_chat_template(again) == prompt
