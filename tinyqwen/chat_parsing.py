"""Reading a Qwen3 reply: thinking vs answer, and structured tool calls.

The chat template turns messages into text; this module goes the other way for what the model writes back:

    <think>\\nThe user wants the weather.\\n</think>\\n\\nLet me check.\\n<tool_call>\\n{"name": "get_weather",
    "arguments": {"city": "Paris"}}\\n</tool_call><|im_end|>

1. `split_thinking` cuts the generated ids at the LAST `</think>` (id 151668), the way Qwen's model card does:
   what comes before is the thinking, what comes after is the answer. `split_thinking_text` does the same on text.
2. `parse_tool_calls` takes the answer text, pulls out every `<tool_call>{json}</tool_call>` block and returns the
   calls as `ToolCall(name, arguments)`, plus the text that remains. A malformed block raises `ToolCallParseError`
   naming the block; we never guess.

Qwen3.5 (and Qwen3-Coder) write the same block in an XML-like form instead of JSON,

    <tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>

and `parse_tool_call` reads both: a body that starts with `<function=` is this form (`parse_function_call`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tinyqwen.errors import TinyQwenError, ToolCallParseError

THINK_START_ID = 151667  # <think>
THINK_END_ID = 151668  # </think>
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def split_thinking(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split generated ids at the last `</think>`: ([thinking ids], [content ids]).  # [T] -> [T1], [T2]

    As in Qwen's example, `index = len(ids) - ids[::-1].index(151668)` is the position just after the last
    `</think>`; everything from there on is content. The `</think>` itself belongs to neither part, and neither
    does a `<think>` (151667) that opens the thinking. Without `</think>`, all ids are content (thinking was off,
    or the model never closed its think block -- then the caller sees the raw text as content).

    >>> split_thinking([151667, 198, 11, 12, 151668, 271, 21])
    ([198, 11, 12], [271, 21])
    >>> split_thinking([21, 22])
    ([], [21, 22])
    """
    ids = [int(i) for i in ids]
    if THINK_END_ID not in ids:
        return [], ids
    index = len(ids) - ids[::-1].index(THINK_END_ID)
    thinking = ids[: index - 1]
    if thinking[:1] == [THINK_START_ID]:
        thinking = thinking[1:]
    return thinking, ids[index:]


def split_thinking_text(text: str) -> tuple[str, str]:
    """Split decoded text at the last `</think>`: (thinking, content), tags and surrounding newlines removed.

    Qwen's example decodes both halves and calls `.strip("\\n")` on each; we also drop the opening `<think>`.

    >>> split_thinking_text("<think>\\nLet me add.\\n</think>\\n\\n4")
    ('Let me add.', '4')
    >>> split_thinking_text("\\n4\\n")
    ('', '4')
    """
    thinking, found, content = text.rpartition("</think>")
    if not found:
        return "", text.strip("\n")
    thinking = thinking.strip("\n").removeprefix("<think>").strip("\n")
    return thinking, content.strip("\n")


@dataclass
class ToolCall:
    """One function call the model asked for. `dataclasses.asdict(call)` is a valid template `tool_calls` item."""

    name: str
    arguments: dict


def parse_tool_call(body: str, number: int, schemas: dict[str, dict] | None = None) -> ToolCall:
    """Parse the JSON between `<tool_call>` and `</tool_call>`. `number` (1-based) names the block in errors.

    `arguments` must be an object; a JSON *string* holding an object (the OpenAI wire format) is decoded too.
    A body in Qwen3.5's `<function=...>` form goes to `parse_function_call` (`schemas`: see there).

    >>> parse_tool_call('{"name": "f", "arguments": {"x": 1}}', 1)
    ToolCall(name='f', arguments={'x': 1})
    >>> parse_tool_call('{"name": "f", "arguments": "{\\\\"x\\\\": 1}"}', 1)
    ToolCall(name='f', arguments={'x': 1})
    """
    where = f"tool call block {number}"
    if body.startswith("<function"):
        return parse_function_call(body, where, schemas or {})
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(f"{where}: malformed JSON ({e}): {_preview(body)}") from None
    if not isinstance(call, dict):
        raise ToolCallParseError(f"{where}: expected a JSON object, got {_json_type(call)}: {_preview(body)}")
    name = call.get("name")
    if "name" not in call:
        raise ToolCallParseError(f"{where}: the object has no 'name': {_preview(body)}")
    if not isinstance(name, str) or not name:
        raise ToolCallParseError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    arguments = tool_call_arguments(call, f"{where} ({name})")
    return ToolCall(name=name, arguments=arguments)


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def parse_function_call(body: str, where: str, schemas: dict[str, dict]) -> ToolCall:
    """Qwen3.5's form of a call: `<function=NAME>` holding `<parameter=P>value</parameter>` pairs.

    A value is the text between its tags less one newline at each end (the model writes each value on lines of
    its own). Values are text; where the tool's JSON schema (`schemas[NAME]`, the `parameters` object the client
    sent) gives the parameter a type other than "string", the value is read as JSON -- `5` becomes 5, `true`
    becomes True -- and kept as text if it is not JSON. Text between the parameters other than whitespace, or a
    parameter given twice, is malformed.

    >>> parse_function_call("<function=f>\\n<parameter=x>\\nParis\\n</parameter>\\n</function>", "call 1", {})
    ToolCall(name='f', arguments={'x': 'Paris'})
    >>> schema = {"f": {"type": "object", "properties": {"n": {"type": "integer"}}}}
    >>> parse_function_call("<function=f><parameter=n>5</parameter></function>", "call 1", schema).arguments
    {'n': 5}
    """
    found = _FUNCTION.fullmatch(body.strip())
    if found is None:
        raise ToolCallParseError(f"{where}: expected <function=NAME>...</function>: {_preview(body)}")
    name, inner = found.group(1).strip(), found.group(2)
    properties = (schemas.get(name) or {}).get("properties") or {}
    arguments: dict[str, Any] = {}
    pos = 0
    for parameter in _PARAMETER.finditer(inner):
        if inner[pos : parameter.start()].strip():
            raise ToolCallParseError(
                f"{where} ({name}): text outside <parameter=...>: {_preview(inner[pos:])}"
            )
        key, value = parameter.group(1).strip(), parameter.group(2)
        value = value.removeprefix("\n").removesuffix("\n")
        if key in arguments:
            raise ToolCallParseError(f"{where} ({name}): parameter {key!r} is given twice")
        arguments[key] = _typed(value, (properties.get(key) or {}).get("type"))
        pos = parameter.end()
    if inner[pos:].strip():
        raise ToolCallParseError(f"{where} ({name}): text outside <parameter=...>: {_preview(inner[pos:])}")
    return ToolCall(name=name, arguments=arguments)


def _typed(value: str, kind: Any) -> Any:
    """A parameter's text as its schema type says: text for "string" (or no type), else JSON if it parses."""
    if kind in (None, "string") or (isinstance(kind, list) and "string" in kind):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def tool_call_arguments(call: dict, where: str, error: type[TinyQwenError] = ToolCallParseError) -> dict:
    """A tool call's `arguments` as a dict: a JSON object, or a JSON *string* holding one (the OpenAI wire format).

    The one rule for both directions: `parse_tool_call` reads what the model wrote, and the chat template refuses
    to write a call that this rule rejects (raising its own `error` class), since the model would then see a call
    its own format calls malformed. The template's format line reads
    `{"name": <function-name>, "arguments": <args-json-object>}`: both keys are required, so a call without
    arguments is malformed rather than "no arguments". `where` names the call in the error.

    >>> tool_call_arguments({"arguments": '{"x": 1}'}, "call 1 (f)")
    {'x': 1}
    >>> tool_call_arguments({"arguments": [1]}, "call 1 (f)")
    Traceback (most recent call last):
        ...
    tinyqwen.errors.ToolCallParseError: call 1 (f): 'arguments' must be a JSON object, got an array
    """
    if "arguments" not in call:
        raise error(f"{where}: the object has no 'arguments'")
    arguments = call["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise error(f"{where}: 'arguments' is a string that is not JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise error(f"{where}: 'arguments' must be a JSON object, got {_json_type(arguments)}")
    return arguments


def parse_tool_calls(
    text: str, schemas: dict[str, dict] | None = None, strip: bool = True
) -> tuple[str, list[ToolCall]]:
    """Pull every `<tool_call>...</tool_call>` block out of `text`: (remaining content, [calls in order]).

    The remaining content is the text outside the blocks, joined and (with `strip`) stripped of newlines at both
    ends (the template puts a newline before each block). An unclosed `<tool_call>` or a `</tool_call>` with no
    opening tag is an error: a reply cut off mid-call must not look like a reply without calls. `schemas` maps a
    tool's name to its JSON schema, for the values of Qwen3.5's `<function=...>` form (`parse_function_call`).

    >>> parse_tool_calls('Let me check.\\n<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>')
    ('Let me check.', [ToolCall(name='f', arguments={})])
    >>> parse_tool_calls("No calls here.")
    ('No calls here.', [])
    """
    outside: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        stray = text.find(TOOL_CALL_CLOSE, pos, None if start < 0 else start)
        if stray >= 0:
            raise ToolCallParseError(
                f"a {TOOL_CALL_CLOSE} at character {stray} has no opening {TOOL_CALL_OPEN} "
                f"(after {len(calls)} complete block(s))"
            )
        if start < 0:
            outside.append(text[pos:])
            break
        number = len(calls) + 1
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        if end < 0:
            raise ToolCallParseError(
                f"tool call block {number}: the {TOOL_CALL_OPEN} at character {start} is never closed "
                f"(no {TOOL_CALL_CLOSE}); was the reply cut off? {_preview(text[body_start:])}"
            )
        outside.append(text[pos:start])
        calls.append(parse_tool_call(text[body_start:end].strip(), number, schemas))
        pos = end + len(TOOL_CALL_CLOSE)
    rest = "".join(outside)
    return rest.strip("\n") if strip else rest, calls


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", tuple: "an array", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}  # fmt: skip
    return names.get(type(value), f"a {type(value).__name__}")


def _preview(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
