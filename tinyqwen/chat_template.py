"""The Qwen3 chat template, written out as plain Python.

A chat model never sees "messages": it sees one long string in the ChatML format,

    <|im_start|>system\\nYou are terse.<|im_end|>\\n<|im_start|>user\\nHi!<|im_end|>\\n<|im_start|>assistant\\n

and the official recipe for building that string is a Jinja template stored in `tokenizer_config.json`
(`chat_template` key). Here the same recipe is spelled out branch by branch, so that there is no template engine
at run time and every rule is readable. The output is byte-identical to the official (current) template rendered
the way Hugging Face transformers renders it; the tests compare the two on the reference vectors and on thousands
of random conversations.

What the template does, in order:

1. A system turn. With `tools`, it always exists: the first message's text (if that message is a system message),
   then a `# Tools` block with one JSON line per tool. Without tools, it is just the first system message, if any.
2. It finds the *last real user query*: the last user message that is not a wrapped tool result
   (`<tool_response>...</tool_response>`). Reasoning is only shown for assistant turns after that query;
   older turns lose their `<think>` block (the model does not need to reread its old scratch work).
3. Each message as a ChatML turn. Assistant turns may carry `reasoning_content` and `tool_calls`; consecutive
   `tool` messages are grouped into ONE user turn of `<tool_response>` blocks.
4. With `add_generation_prompt`, the opening of the next assistant turn; with `enable_thinking=False` it also
   pre-fills an empty think block, which tells the model to answer right away.

Where the template would raise, or would quietly produce something surprising (drop a message, print `None`,
write invalid JSON), `apply_chat_template` raises `ChatTemplateError` instead and names the message. Each such
decision is marked "Decision:" below.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from tinyqwen.chat_parsing import tool_call_arguments
from tinyqwen.errors import ChatTemplateError

ROLES = ("system", "user", "assistant", "tool")

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"  # written after the generation prompt when enable_thinking=False


# ---------------------------------------------------------------------------------------------------------------
# JSON exactly as the template prints it
# ---------------------------------------------------------------------------------------------------------------


def tojson(value: Any, where: str = "value") -> str:
    """The template's `tojson` filter: `json.dumps` with non-ASCII kept and the default separators.

    transformers replaces Jinja's own `tojson` (which is `htmlsafe_json_dumps`: it writes `<`, `>`, `&` and `'`
    as `\\u003c`, `\\u003e`, `\\u0026`, `\\u0027` and sorts keys) with a plain
    `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`. That is what the model saw
    in training, so that is what we write: keys in the order given, `", "` and `": "` between items, and
    `<`, `'`, `é`, `😀` left as they are.

    >>> tojson({"name": "f", "x": [1, 2.5, None, True], "s": "<é>"})
    '{"name": "f", "x": [1, 2.5, null, true], "s": "<é>"}'

    Decision: only plain JSON values are accepted. `json.dumps` would turn `float("nan")` into the invalid token
    `NaN` and the key `1` into `"1"` (so `{1: .., "1": ..}` would print a duplicate key); we raise instead.
    """
    _check_json(value, where)
    return json.dumps(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False)


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    if depth > 200:  # also catches a list that contains itself
        raise ChatTemplateError(f"{where} is nested more than 200 levels deep (or contains itself)")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ChatTemplateError(f"{where} is {value!r}, which has no JSON form")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ChatTemplateError(f"{where} has the key {key!r}; JSON object keys must be strings")
            _check_json(item, f"{where}[{key!r}]", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    raise ChatTemplateError(f"{where} is a {type(value).__name__}, which is not a JSON value")


# ---------------------------------------------------------------------------------------------------------------
# Checking the input
# ---------------------------------------------------------------------------------------------------------------


def _text(message: dict) -> str:
    """A message's text as the template reads it: `content` if it is a string, else ''.

    >>> _text({"role": "user", "content": "hi"}), _text({"role": "assistant", "content": None})
    ('hi', '')
    """
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _check_messages(messages: Any) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        # The template reads messages[0].role first and fails on an empty list.
        raise ChatTemplateError("messages is empty; the chat template needs at least one message")
    for i, message in enumerate(messages):
        _check_message(i, message)
    return list(messages)


def _check_message(i: int, message: Any) -> None:
    if not isinstance(message, dict):
        raise ChatTemplateError(
            f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    # Decision: the template silently drops a message with any other role (or none); we refuse.
    if role not in ROLES:
        raise ChatTemplateError(
            f"messages[{i}] has role {role!r}; the Qwen3 chat template only renders {', '.join(ROLES)} "
            "(it would silently drop this message)"
        )
    # Decision: content may be a string, None or missing (both render as '', which is how an assistant turn that
    # only calls tools is usually written). Anything else -- above all a list of multimodal content parts -- the
    # template would render as '' and lose; we refuse instead.
    content = message.get("content")
    if i == 0 and role == "system" and not isinstance(content, str):
        # The template concatenates messages[0].content with strings, which fails for None or a list.
        raise ChatTemplateError(
            f"messages[0] is a system message whose content is {type(content).__name__}; "
            "the first system message must have string content"
        )
    if content is not None and not isinstance(content, str):
        raise ChatTemplateError(
            f"messages[{i}] ({role}) has content of type {type(content).__name__}; content must be a string "
            "or None (the template would render it as an empty string)"
        )
    # Other keys ('name', 'tool_call_id', ...) are ignored, as the template ignores them. So are 'reasoning_content'
    # and 'tool_calls' on non-assistant messages: the template never reads them there. (transformers >= 5 also
    # copies a 'thinking' or 'reasoning' key into 'reasoning_content' before rendering; that is transformers'
    # preprocessing, not the template, so we do not.)
    if role == "assistant":
        reasoning = message.get("reasoning_content")
        # Decision: a non-string reasoning_content is ignored by the template (it then looks for <think> in the
        # content instead); that is almost surely a mistake, so we refuse.
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatTemplateError(
                f"messages[{i}] (assistant) has reasoning_content of type {type(reasoning).__name__}; "
                "it must be a string or None"
            )
        _check_tool_calls(i, message.get("tool_calls"))


def _check_tool_calls(i: int, tool_calls: Any) -> None:
    if tool_calls is None or (isinstance(tool_calls, (list, tuple)) and len(tool_calls) == 0):
        return  # the template tests `if message.tool_calls`: None and [] mean "no calls"
    if not isinstance(tool_calls, (list, tuple)):
        raise ChatTemplateError(
            f"messages[{i}] (assistant) has tool_calls of type {type(tool_calls).__name__}; it must be a list"
        )
    for j, call in enumerate(tool_calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(call, dict):
            raise ChatTemplateError(f"{where} must be a dict, got {type(call).__name__}")
        call = _function_of(call, where)
        name = call.get("name")
        # Decision: the template prints the name raw between quotes; a missing name would print "" and a name
        # with a quote, backslash or control character would make the call invalid JSON. We refuse both.
        if not isinstance(name, str) or not name:
            raise ChatTemplateError(f"{where} has name {name!r}; a tool call needs a non-empty string name")
        if json.dumps(name, ensure_ascii=False)[1:-1] != name:
            raise ChatTemplateError(
                f"{where} has name {name!r}, which needs JSON escaping; the template prints names raw"
            )
        # The template pipes a missing value into tojson, which fails; it would print `null`, a list or a
        # non-JSON string, but then the model sees a call that its own format (and `parse_tool_calls`) says is
        # malformed. Decision: the reading side's rule, as a ChatTemplateError.
        tool_call_arguments(call, f"{where} ({name})", ChatTemplateError)
        if isinstance(call["arguments"], dict):  # a string is printed as it is; a dict through tojson
            _check_json(call["arguments"], f"{where}.arguments")


def _function_of(call: dict, where: str) -> dict:
    """OpenAI-style calls wrap the call in `function`; the template unwraps it when that key is truthy.

    >>> _function_of({"type": "function", "function": {"name": "f", "arguments": {}}}, "call")
    {'name': 'f', 'arguments': {}}
    >>> _function_of({"name": "f", "arguments": {}}, "call")
    {'name': 'f', 'arguments': {}}
    """
    function = call.get("function")
    if not function:
        return call
    if not isinstance(function, dict):
        raise ChatTemplateError(f"{where}.function must be a dict, got {type(function).__name__}")
    return function


def _check_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(f"tools must be a list of dicts (JSON schemas), got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        # Decision: the template would print any JSON value as a "tool"; only dicts (JSON schemas) make sense.
        if not isinstance(tool, dict):
            raise ChatTemplateError(f"tools[{i}] must be a dict (a JSON schema), got {type(tool).__name__}")
        _check_json(tool, f"tools[{i}]")
    return list(tools)


def _check_flag(name: str, value: Any) -> None:
    # Decision: the template tests `enable_thinking is false`, which is True only for the bool False, so
    # enable_thinking=0 would quietly keep thinking on. We accept only real bools for both flags.
    if not isinstance(value, bool):
        raise ChatTemplateError(f"{name} must be True or False, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# The pieces of the prompt
# ---------------------------------------------------------------------------------------------------------------


def _as_is(text: str) -> str:
    return text


def render_system(messages: list[dict], tools: list[dict], data: Callable[[str], str] = _as_is) -> str:
    """The opening system turn: the first system message, plus the `# Tools` block when there are tools.

    `data`, here and in the other `render_*` functions, is applied to every piece of text that came from the input
    (a message's text, a tool call's name and arguments, a tool schema), never to the template's own text. It
    changes nothing by default; `render_segments` passes a function that marks those pieces.

    >>> render_system([{"role": "system", "content": "Be brief."}], [])
    '<|im_start|>system\\nBe brief.<|im_end|>\\n'
    >>> render_system([{"role": "user", "content": "hi"}], [])
    ''
    """
    first = messages[0]
    system = first["content"] if first["role"] == "system" else None
    if not tools:
        return "" if system is None else f"<|im_start|>system\n{data(system)}<|im_end|>\n"
    text = "<|im_start|>system\n"
    if system is not None:
        text += data(system) + "\n\n"
    text += TOOLS_HEADER
    for tool in tools:
        text += "\n" + data(tojson(tool))
    return text + TOOLS_FOOTER


def is_tool_result(message: dict) -> bool:
    """A user message that only carries a wrapped tool result (how some pipelines send tool output).

    >>> is_tool_result({"role": "user", "content": "<tool_response>\\n42\\n</tool_response>"})
    True
    """
    content = message.get("content")
    return (
        isinstance(content, str)
        and content.startswith("<tool_response>")
        and content.endswith("</tool_response>")
    )


def last_query_index(messages: list[dict]) -> int:
    """Index of the last real user query: a user message with string content that is not a tool result.

    With none, the template falls back to the last index, so no assistant turn counts as "after the query".

    >>> last_query_index([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
    ...                   {"role": "user", "content": "<tool_response>1</tool_response>"}])
    0
    """
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if (
            message["role"] == "user"
            and isinstance(message.get("content"), str)
            and not is_tool_result(message)
        ):
            return index
    return len(messages) - 1


def split_reasoning(message: dict) -> tuple[str, str]:
    """An assistant message's (reasoning, content).

    `reasoning_content` wins when it is a string. Otherwise, if the content holds `</think>`, the reasoning is what
    sits between `<think>` and the FIRST `</think>`, and the content is what follows the LAST `</think>`, with
    newlines trimmed next to the tags. These are the template's exact string operations (Python's str methods).

    >>> split_reasoning({"role": "assistant", "content": "<think>\\nhmm\\n</think>\\n\\n42"})
    ('hmm', '42')
    >>> split_reasoning({"role": "assistant", "content": "42", "reasoning_content": "\\nhmm"})
    ('\\nhmm', '42')
    """
    content = _text(message)
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def render_tool_call(call: dict, first: bool, content: str, data: Callable[[str], str] = _as_is) -> str:
    """One `<tool_call>` block. It starts on a new line unless it is the first call of a turn with no text.

    >>> render_tool_call({"name": "f", "arguments": {"x": 1}}, first=True, content="")
    '<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>'
    >>> render_tool_call({"function": {"name": "f", "arguments": '{"x":1}'}}, first=False, content="")
    '\\n<tool_call>\\n{"name": "f", "arguments": {"x":1}}\\n</tool_call>'
    """
    call = _function_of(call, "tool call")
    arguments = call["arguments"]
    # A string is printed raw (its own spacing kept); a dict goes through tojson.
    arguments = arguments if isinstance(arguments, str) else tojson(arguments, "arguments")
    newline = "\n" if (not first or content) else ""
    name, arguments = data(call["name"]), data(arguments)
    return f'{newline}<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def render_assistant(
    message: dict, after_query: bool, is_last: bool, data: Callable[[str], str] = _as_is
) -> str:
    """An assistant turn: reasoning (only after the last user query), content, tool calls.

    After the last query the turn gets a think block when it is the final message (even an empty one) or when it
    has reasoning; earlier turns are written without their reasoning.

    >>> render_assistant({"role": "assistant", "content": "<think>x</think>42"}, after_query=True, is_last=True)
    '<|im_start|>assistant\\n<think>\\nx\\n</think>\\n\\n42<|im_end|>\\n'
    >>> render_assistant({"role": "assistant", "content": "<think>x</think>42"}, after_query=False, is_last=True)
    '<|im_start|>assistant\\n42<|im_end|>\\n'
    """
    reasoning, content = split_reasoning(message)
    if after_query and (is_last or reasoning):
        thought, answer = reasoning.strip("\n"), content.lstrip("\n")
        text = f"<|im_start|>assistant\n<think>\n{data(thought)}\n</think>\n\n{data(answer)}"
    else:
        text = f"<|im_start|>assistant\n{data(content)}"
    # Note: the newline rule below tests `content` before the lstrip above, exactly as the template does.
    for j, call in enumerate(message.get("tool_calls") or []):
        text += render_tool_call(call, first=j == 0, content=content, data=data)
    return text + "<|im_end|>\n"


def render_tool_response(messages: list[dict], i: int, data: Callable[[str], str] = _as_is) -> str:
    """A tool result. A run of consecutive tool messages becomes ONE user turn holding several responses.

    >>> msgs = [{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    >>> render_tool_response(msgs, 0) + render_tool_response(msgs, 1)
    '<|im_start|>user\\n<tool_response>\\n1\\n</tool_response>\\n<tool_response>\\n2\\n</tool_response><|im_end|>\\n'
    """
    opens_run = i == 0 or messages[i - 1]["role"] != "tool"
    closes_run = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
    text = "<|im_start|>user" if opens_run else ""
    text += f"\n<tool_response>\n{data(_text(messages[i]))}\n</tool_response>"
    return text + ("<|im_end|>\n" if closes_run else "")


# ---------------------------------------------------------------------------------------------------------------
# The whole prompt
# ---------------------------------------------------------------------------------------------------------------


def apply_chat_template(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> str:
    """Render a conversation into the Qwen3 prompt string (byte-identical to the official template).

    `enable_thinking=True` behaves like leaving the template's variable unset (the model decides to think);
    `False` pre-fills an empty think block after the generation prompt.

    >>> apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, enable_thinking=False)
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
    """
    return _render(messages, tools, add_generation_prompt, enable_thinking, _as_is)


def _render(messages, tools, add_generation_prompt, enable_thinking, data: Callable[[str], str]) -> str:
    messages = _check_messages(messages)
    tools = _check_tools(tools)
    _check_flag("add_generation_prompt", add_generation_prompt)
    _check_flag("enable_thinking", enable_thinking)

    parts = [render_system(messages, tools, data)]
    query = last_query_index(messages)
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "user" or (role == "system" and i > 0):  # the first system message is already written
            parts.append(f"<|im_start|>{role}\n{data(_text(message))}<|im_end|>\n")
        elif role == "assistant":
            parts.append(render_assistant(message, after_query=i > query, is_last=i == last, data=data))
        elif role == "tool":
            parts.append(render_tool_response(messages, i, data))
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if not enable_thinking:
            parts.append(EMPTY_THINK)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Whose text is it? (for prompt-injection-safe tokenization)
# ---------------------------------------------------------------------------------------------------------------

# Unicode "noncharacters": reserved for a program's internal use, never assigned. Two of them that do not occur in
# the prompt mark where each piece of input text starts and ends.
_NONCHARACTERS = [chr(c) for c in range(0xFDD0, 0xFDF0)]


def render_segments(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> list[tuple[str, bool]]:
    """`apply_chat_template`'s prompt cut into `(text, from_template)` pieces, in order.

    `from_template` is True for the template's own text and False for text that came from the input: message
    text, reasoning, tool-call names and arguments, tool schemas. Joined, the pieces are exactly the prompt. The
    tokenizer needs the difference: only the template's `<|im_start|>`, `<think>`, `<tool_call>`, ... may become
    control tokens; the same characters typed by a user are just text (see `Tokenizer.apply_chat_template`).

    >>> render_segments([{"role": "user", "content": "Hi <|im_end|>"}])
    [('<|im_start|>user\\n', True), ('Hi <|im_end|>', False), ('<|im_end|>\\n', True)]

    The template still reads its input as the official one does (a user message wrapped in `<tool_response>`
    counts as a tool result, `</think>` in an assistant message separates its reasoning); the marking happens
    only where the input's text is written into the prompt.
    """
    prompt = _render(messages, tools, add_generation_prompt, enable_thinking, _as_is)
    free = [c for c in _NONCHARACTERS if c not in prompt]
    if len(free) < 2:
        raise ChatTemplateError(
            "the messages use every Unicode noncharacter U+FDD0..U+FDEF; cannot mark them"
        )
    start, end = free[:2]

    def mark(text: str) -> str:
        _check_unicode(text)
        return f"{start}{text}{end}" if text else text

    marked = _render(messages, tools, add_generation_prompt, enable_thinking, mark)
    # split() with a group: [template, input, template, input, ..., template]
    pieces = re.split(f"{start}(.*?){end}", marked, flags=re.DOTALL)
    segments = [(text, k % 2 == 0) for k, text in enumerate(pieces) if text]
    assert "".join(text for text, _ in segments) == prompt, "marking changed the prompt"
    return segments


def _check_unicode(text: str) -> None:
    """Refuse a lone surrogate (what undecodable bytes become under Python's surrogateescape), pointing into the
    text it was found in rather than into the whole prompt."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        before = text[max(0, e.start - 20) : e.start]
        raise ChatTemplateError(
            f"message text has a lone surrogate {text[e.start]!r} at index {e.start} (after {before!r}): "
            "not valid Unicode, often bytes that were not UTF-8"
        ) from None
