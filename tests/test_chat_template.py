"""The Python chat template against the official Jinja template, byte for byte.

The reference is the official `chat_template` (current version, pinned by sha256) rendered with jinja2 exactly the
way transformers 5 renders it (`transformers/utils/chat_template_utils.py`): an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks, the loopcontrols extension, transformers' own `tojson` filter (plain `json.dumps`,
ensure_ascii=False) and `raise_exception` / `strftime_now` globals. It is checked against the 30 renders that
transformers itself produced (`tests/data/hf_transformers_vectors.json`), then used as the oracle for hand-written
cases and for random conversations (hypothesis).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyqwen.chat_template import apply_chat_template, tojson
from tinyqwen.errors import ChatTemplateError

jinja2 = pytest.importorskip("jinja2")
from jinja2.ext import loopcontrols  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG_CANDIDATES = (
    REPO / "tinyqwen" / "data" / "tokenizer_config.json",
    REPO.parent / "shared" / "qwen3-tokenizer" / "tokenizer_config.json",
)
CONFIG_SHA256 = "d5d09f07b48c3086c508b30d1c9114bd1189145b74e982a265350c923acd8101"  # current official file
VECTORS = REPO / "tests" / "data" / "hf_transformers_vectors.json"
EXAMPLES = int(os.environ.get("TINYQWEN_HYPOTHESIS_EXAMPLES", "400"))
UNSET = object()  # "do not pass this variable to the template"


# ------------------------------------------------------------------------------------------ the reference


@functools.cache
def config_path() -> Path:
    for path in CONFIG_CANDIDATES:
        if path.is_file():
            return path
    pytest.fail(f"no official tokenizer_config.json at any of {[str(p) for p in CONFIG_CANDIDATES]}")


@functools.cache
def jinja_template():
    data = config_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == CONFIG_SHA256, (
        f"{config_path()} is not the current official file"
    )

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def transformers_tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = transformers_tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(json.loads(data)["chat_template"])


def reference(messages, tools=None, add_generation_prompt=UNSET, enable_thinking=UNSET) -> str:
    """Render with the official template; variables left UNSET are not passed at all."""
    variables = {"messages": messages}
    if tools is not None:
        variables["tools"] = tools
    if add_generation_prompt is not UNSET:
        variables["add_generation_prompt"] = add_generation_prompt
    if enable_thinking is not UNSET:
        variables["enable_thinking"] = enable_thinking
    return jinja_template().render(**variables)


def ours(messages, tools=None, add_generation_prompt=UNSET, enable_thinking=UNSET) -> str:
    kwargs = {}
    if add_generation_prompt is not UNSET:
        kwargs["add_generation_prompt"] = add_generation_prompt
    if enable_thinking is not UNSET:
        kwargs["enable_thinking"] = enable_thinking
    return apply_chat_template(messages, tools=tools, **kwargs)


def assert_same(messages, tools=None, add_generation_prompt=UNSET, enable_thinking=UNSET) -> str:
    before = copy.deepcopy((messages, tools))
    expected = reference(messages, tools, add_generation_prompt, enable_thinking)
    got = ours(messages, tools, add_generation_prompt, enable_thinking)
    assert got == expected
    assert (messages, tools) == before, "apply_chat_template must not modify its input"
    return got


# ------------------------------------------------------------------------------------------ tojson


def test_tojson_is_transformers_filter_not_jinja_default():
    value = {
        "b": 1,
        "a": [None, True, False, 1.5, -0.0, 1e20, 10**30],
        "s": "<a href='x'>&</a> \"q\" é 😀\n\t\u2028",
    }
    assert tojson(value) == json.dumps(value, ensure_ascii=False)
    # Hand-derived: keys in given order, ", " / ": " separators, <>&' and non-ASCII kept, " \n \t escaped.
    assert tojson({"k": "<'&é>", "n": [1, None]}) == '{"k": "<\'&é>", "n": [1, null]}'
    assert tojson({"q": 'a"b\\c\nd'}) == '{"q": "a\\"b\\\\c\\nd"}'
    # Jinja's built-in filter (what a plain jinja2.Environment would use) escapes HTML characters and sorts keys:
    builtin = jinja2.Environment().from_string("{{ v | tojson }}").render(v={"b": "<'&>", "a": 1})
    assert builtin == '{"a": 1, "b": "\\u003c\\u0027\\u0026\\u003e"}'
    # ... and the template, as transformers renders it, writes the plain form.
    tools = [{"name": "f", "description": "x < y & 'z' → é"}]
    text = assert_same([{"role": "user", "content": "hi"}], tools=tools)
    assert '{"name": "f", "description": "x < y & \'z\' → é"}' in text


@pytest.mark.parametrize(
    "value, problem",
    [
        (float("nan"), "nan"),
        ({"x": float("inf")}, "inf"),
        ({1: "a"}, "key 1"),
        ({"x": {1, 2}}, "set"),
        ({"x": b"raw"}, "bytes"),
    ],
)
def test_tojson_rejects_non_json(value, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        tojson(value)


def test_tojson_rejects_self_reference():
    loop = []
    loop.append(loop)
    with pytest.raises(ChatTemplateError, match="contains itself"):
        tojson(loop)


# ------------------------------------------------------------------------------------------ reference vectors


def vector_cases():
    return json.loads(VECTORS.read_text(encoding="utf-8"))["chat_template"]


@pytest.mark.parametrize(
    "case",
    vector_cases(),
    ids=lambda c: f"{c['name']}-gen{c['add_generation_prompt']}-think{c['enable_thinking']}",
)
def test_reference_vectors(case):
    flags = {"add_generation_prompt": case["add_generation_prompt"]}
    if case["enable_thinking"] is not None:  # null = not passed
        flags["enable_thinking"] = case["enable_thinking"]
    # The jinja2 reference reproduces transformers' own render ...
    assert reference(case["messages"], case["tools"], **flags) == case["text"]
    # ... and so does the Python template.
    assert apply_chat_template(case["messages"], tools=case["tools"], **flags) == case["text"]


def test_reference_vectors_cover_the_flags():
    cases = vector_cases()
    assert len(cases) == 30
    assert {(c["add_generation_prompt"], c["enable_thinking"]) for c in cases} == {
        (g, t) for g in (True, False) for t in (None, True, False)
    }


# ------------------------------------------------------------------------------------------ hand-written cases

U = {"role": "user", "content": "What is 2+2?"}
SYS = {"role": "system", "content": "You are terse."}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_simple_turns_hand_derived():
    text = assert_same([SYS, U, {"role": "assistant", "content": "4"}], add_generation_prompt=False)
    assert (
        text
        == (
            "<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n"  # last turn after the query: empty think
        )
    )


def test_generation_prompt_and_empty_think_injection():
    on = assert_same([U], add_generation_prompt=True)
    assert on.endswith("<|im_start|>assistant\n")
    assert assert_same([U], add_generation_prompt=True, enable_thinking=True) == on
    off = assert_same([U], add_generation_prompt=True, enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"
    # Without the generation prompt, enable_thinking changes nothing.
    assert (
        assert_same([U], add_generation_prompt=False, enable_thinking=False)
        == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_tools_block_hand_derived():
    text = assert_same([SYS, U], tools=[WEATHER], add_generation_prompt=True)
    assert text.startswith(
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n"
    )
    # Without a system message the tools block still opens a system turn; an empty tool list means no tools.
    assert assert_same([U], tools=[WEATHER, {"name": "second"}]).startswith("<|im_start|>system\n# Tools\n")
    assert assert_same([U], tools=[]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"


def test_reasoning_kept_only_after_last_query():
    msgs = [
        U,
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "\nnew thought\n"},
    ]
    text = assert_same(msgs)
    assert "old thought" not in text
    assert "<|im_start|>assistant\n4<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nnew thought\n</think>\n\n6<|im_end|>\n")


def test_think_split_uses_first_and_last_close_tag():
    # reasoning = before the FIRST </think> (after the last <think> in it); content = after the LAST </think>.
    content = "\n<think>a<think>\n\nb\n\n</think>middle</think>\n\n\nend\n"
    msgs = [U, {"role": "assistant", "content": content}]
    assert assert_same(msgs).endswith("<|im_start|>assistant\n<think>\nb\n</think>\n\nend\n<|im_end|>\n")
    # reasoning_content wins over <think> in the content, which is then printed as is.
    msgs = [U, {"role": "assistant", "content": "<think>x</think>y", "reasoning_content": "r"}]
    assert assert_same(msgs).endswith("<think>\nr\n</think>\n\n<think>x</think>y<|im_end|>\n")


def test_intermediate_assistant_without_reasoning_gets_no_think_block():
    msgs = [
        U,
        {"role": "assistant", "content": "calling", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "done"},
    ]
    text = assert_same(msgs)
    assert "<|im_start|>assistant\ncalling\n<tool_call>" in text  # not last, no reasoning: plain
    assert text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\ndone<|im_end|>\n"
    )  # last: empty think


def test_tool_calls_dict_and_string_arguments_hand_derived():
    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}},
        {"name": "search", "arguments": '{"q":"a  b"}'},  # a string is printed raw, spacing kept
        {"function": {}, "name": "noop", "arguments": {}},  # falsy `function`: the call itself is used
    ]
    msgs = [U, {"role": "assistant", "content": None, "tool_calls": calls}]
    text = assert_same(msgs, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q":"a  b"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call><|im_end|>\n<|im_start|>assistant\n'
    )


def test_tool_call_newline_tests_content_before_lstrip():
    # content "\n\n" with a reasoning_content: printed lstripped (empty) but still truthy -> "\n" before the call.
    msgs = [
        U,
        {
            "role": "assistant",
            "content": "\n\n",
            "reasoning_content": "r",
            "tool_calls": [{"name": "f", "arguments": {}}],
        },
    ]
    assert assert_same(msgs).endswith(
        '<|im_start|>assistant\n<think>\nr\n</think>\n\n\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
    )
    # With no text at all, the first call follows the think block directly.
    msgs[1]["content"] = ""
    assert '<|im_start|>assistant\n<think>\nr\n</think>\n\n<tool_call>\n{"name": "f"' in assert_same(msgs)


def test_consecutive_tool_messages_grouped():
    msgs = [
        U,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}],
        },
        {"role": "tool", "content": "1", "tool_call_id": "x"},
        {"role": "tool", "content": None},
        {"role": "tool", "content": "3"},
        {"role": "user", "content": "thanks"},
        {"role": "tool", "content": "lonely"},
    ]
    text = assert_same(msgs)
    assert (
        "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n\n</tool_response>"
        "\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>user\nthanks<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nlonely\n</tool_response><|im_end|>\n"
    ) in text


def test_tool_message_first():
    assert (
        assert_same([{"role": "tool", "content": "x"}])
        == "<|im_start|>user\n<tool_response>\nx\n</tool_response><|im_end|>\n"
    )


def test_wrapped_tool_response_is_not_a_query():
    msgs = [
        U,
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "<tool_response>\n42\n</tool_response>"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    text = assert_same(msgs)
    assert (
        "<think>\nr1\n</think>" in text and "<think>\nr2\n</think>" in text
    )  # both after the real query (index 0)


def test_no_real_query_means_no_think_blocks():
    msgs = [SYS, {"role": "assistant", "content": "<think>r</think>hello"}]
    assert (
        assert_same(msgs)
        == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )


def test_system_mid_conversation_and_double_system():
    msgs = [SYS, {"role": "system", "content": "Second."}, U, {"role": "system", "content": None}]
    text = assert_same(msgs, tools=[WEATHER])
    assert text.count("<|im_start|>system\n") == 3
    assert text.endswith("<|im_start|>system\n<|im_end|>\n")


def test_missing_or_none_content_renders_empty():
    msgs = [{"role": "user"}, {"role": "assistant", "content": None}, {"role": "user", "content": None}]
    assert (
        assert_same(msgs)
        == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
    )


def test_tuples_are_accepted_like_lists():
    msgs = (
        U,
        {"role": "assistant", "content": "", "tool_calls": ({"name": "f", "arguments": {"t": (1, 2)}},)},
    )
    assert assert_same(msgs, tools=({"name": "f"},)).endswith(
        '{"name": "f", "arguments": {"t": [1, 2]}}\n</tool_call><|im_end|>\n'
    )


# ------------------------------------------------------------------------------------------ rejected input

A = "assistant"


def call(**kw):
    return [U, {"role": A, "content": "", "tool_calls": [kw]}]


# (messages, tools, flags, error pattern, what the template itself does: "raises" or "mangles")
REJECTED = [
    ([], None, {}, "empty", "raises"),
    ([{"role": "system", "content": None}, U], None, {}, "first system message", "raises"),
    ([{"role": "system"}, U], [WEATHER], {}, "first system message", "raises"),
    ([{"role": "system", "content": ["x"]}, U], [WEATHER], {}, "first system message", "raises"),
    (call(name="f"), None, {}, "no 'arguments'", "raises"),
    (
        [U, {"role": A, "content": "", "tool_calls": ["f"]}],
        None,
        {},
        r"tool_calls\[0\] must be a dict",
        "raises",
    ),
    ([U, {"role": A, "content": "", "tool_calls": {"name": "f"}}], None, {}, "must be a list", "raises"),
    (call(function="f", name="f", arguments={}), None, {}, "function must be a dict", "raises"),
    ([{"role": "bot", "content": "x"}, U], None, {}, r"messages\[0\] has role 'bot'", "mangles"),
    ([{"content": "x"}, U], None, {}, r"messages\[0\] has role None", "mangles"),
    (["hello"], None, {}, r"messages\[0\] must be a dict", "mangles"),
    (
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        None,
        {},
        "content of type list",
        "mangles",
    ),
    ([{"role": "tool", "content": {"temp": 20}}], None, {}, "content of type dict", "mangles"),
    (
        [U, {"role": A, "content": "x", "reasoning_content": ["r"]}],
        None,
        {},
        "reasoning_content of type list",
        "mangles",
    ),
    (call(arguments={}), None, {}, "name None", "mangles"),
    (call(name=7, arguments={}), None, {}, "name 7", "mangles"),
    (call(name="", arguments={}), None, {}, "name ''", "mangles"),
    (call(name='say"hi', arguments={}), None, {}, "needs JSON escaping", "mangles"),
    (call(name="f", arguments=None), None, {}, "must be a JSON object, got null", "mangles"),
    (
        call(name="f", arguments=[1]),
        None,
        {},
        r"\(f\): 'arguments' must be a JSON object, got an array",
        "mangles",
    ),
    (call(name="f", arguments="not json"), None, {}, "not JSON", "mangles"),
    (call(name="f", arguments="[1, 2]"), None, {}, "must be a JSON object, got an array", "mangles"),
    (call(name="f", arguments={"x": float("nan")}), None, {}, "nan", "mangles"),
    ([U], "get_weather", {}, "tools must be a list", "mangles"),
    ([U], [WEATHER, "f"], {}, r"tools\[1\] must be a dict", "mangles"),
    ([U], None, {"enable_thinking": 0}, "enable_thinking must be True or False", "mangles"),
    ([U], None, {"add_generation_prompt": "yes"}, "add_generation_prompt must be True or False", "mangles"),
]


@pytest.mark.parametrize("messages, tools, flags, pattern, template", REJECTED, ids=[r[3] for r in REJECTED])
def test_rejected_input(messages, tools, flags, pattern, template):
    with pytest.raises(ChatTemplateError, match=pattern):
        apply_chat_template(messages, tools=tools, **flags)
    if template == "raises":
        with pytest.raises(Exception):  # noqa: B017 -- jinja raises TypeError / UndefinedError here
            reference(messages, tools, **flags)
    else:
        reference(messages, tools, **flags)  # the template renders something: we chose to refuse it


def test_rejected_messages_are_named():
    msgs = [U, {"role": A, "content": "ok"}, {"role": "user", "content": ["part"]}]
    with pytest.raises(ChatTemplateError, match=r"messages\[2\] \(user\)"):
        apply_chat_template(msgs)
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]\.tool_calls\[1\]"):
        apply_chat_template(
            [U, {"role": A, "content": "", "tool_calls": [{"name": "f", "arguments": {}}, {"name": "g"}]}]
        )
    with pytest.raises(ChatTemplateError, match="messages must be a list"):
        apply_chat_template("hello")


# ------------------------------------------------------------------------------------------ random conversations

# Text made of fragments that the template cares about, plus arbitrary unicode: this is where mismatches hide.
FRAGMENTS = st.sampled_from(
    [
        "<think>",
        "</think>",
        "\n",
        "\n\n",
        " ",
        "<tool_response>",
        "</tool_response>",
        "<tool_call>",
        "</tool_call>",
        "<|im_end|>",
        '"',
        "\\",
        "{",
        "}",
        "é",
        "😀",
        "\t",
        "\r\n",
        "\u2028",
        "answer",
        "42",
    ]
)
TEXT = st.lists(st.one_of(FRAGMENTS, st.text(max_size=6)), max_size=8).map("".join)
NAME = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters='"\\'),
    min_size=1,
    max_size=10,
)
KEY = st.one_of(st.sampled_from(["city", "q", "a b", "<x>", "é", ""]), st.text(max_size=5))
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
    max_leaves=8,
)
OBJECT = st.dictionaries(KEY, JSON, max_size=4)


@st.composite
def string_arguments(draw):
    obj = draw(OBJECT)
    style = draw(st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 2}, {"ensure_ascii": False}]))
    return json.dumps(obj, **style)


@st.composite
def tool_call(draw):
    inner = {"name": draw(NAME), "arguments": draw(st.one_of(OBJECT, string_arguments()))}
    shape = draw(st.sampled_from(["flat", "openai", "falsy-function"]))
    if shape == "openai":
        return {"id": draw(TEXT), "type": "function", "function": inner}
    if shape == "falsy-function":
        return {"function": draw(st.sampled_from([None, {}, ""])), **inner}
    return inner


def maybe(draw, key, strategy, message):
    choice = draw(st.sampled_from(["absent", "none", "value"]))
    if choice == "none":
        message[key] = None
    elif choice == "value":
        message[key] = draw(strategy)


@st.composite
def message(draw):
    role = draw(st.sampled_from(["user", "user", "assistant", "assistant", "tool", "tool", "system"]))
    msg = {"role": role}
    if role == "user":
        content = draw(
            st.one_of(TEXT, TEXT.map(lambda t: f"<tool_response>{t}</tool_response>"), st.none(), st.just(""))
        )
        msg["content"] = content
    elif role == "assistant":
        maybe(draw, "content", st.one_of(TEXT, TEXT.map(lambda t: f"<think>{t}</think>" + draw(TEXT))), msg)
        maybe(draw, "reasoning_content", TEXT, msg)
        maybe(draw, "tool_calls", st.lists(tool_call(), max_size=3), msg)
    else:
        maybe(draw, "content", TEXT, msg)
    return msg


@st.composite
def conversation(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(TEXT)})
    msgs += draw(st.lists(message(), min_size=0 if msgs else 1, max_size=8))
    tools = draw(st.one_of(st.none(), st.just([]), st.lists(OBJECT, min_size=1, max_size=3)))
    generation = draw(st.sampled_from([UNSET, True, False]))
    thinking = draw(st.sampled_from([UNSET, True, False]))
    if msgs[0]["role"] == "system" and not isinstance(msgs[0].get("content"), str):
        msgs[0]["content"] = draw(TEXT)  # the template itself raises otherwise (tested above)
    return msgs, tools, generation, thinking


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation())
def test_random_conversations_match_jinja(case):
    messages, tools, generation, thinking = case
    assert_same(messages, tools, generation, thinking)


# Anything goes: wrong types, missing keys, unknown roles. Either we render exactly what Jinja renders, or we
# raise ChatTemplateError -- and we must raise whenever Jinja does.
WILD_VALUE = st.one_of(
    TEXT, st.none(), st.integers(), st.lists(TEXT, max_size=2), st.dictionaries(KEY, TEXT, max_size=2)
)
WILD_CALL = st.one_of(
    tool_call(),
    TEXT,
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(NAME, WILD_VALUE),
            "arguments": st.one_of(OBJECT, WILD_VALUE),
            "function": st.one_of(st.none(), TEXT, st.just({})),
        },
    ),
)
WILD_MESSAGE = st.one_of(
    message(),
    TEXT,
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.one_of(
                st.sampled_from(["user", "assistant", "tool", "system", "bot", "User"]), WILD_VALUE
            ),
            "content": WILD_VALUE,
            "reasoning_content": WILD_VALUE,
            "tool_calls": st.one_of(st.lists(WILD_CALL, max_size=2), WILD_VALUE),
        },
    ),
)
WILD_FLAG = st.sampled_from([UNSET, True, False, None, 0, 1, "yes", ""])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(WILD_MESSAGE, max_size=6),
    st.one_of(st.none(), st.lists(st.one_of(OBJECT, WILD_VALUE), max_size=2), TEXT),
    WILD_FLAG,
    WILD_FLAG,
)
def test_wild_input_matches_or_raises(messages, tools, generation, thinking):
    try:
        expected = reference(messages, tools, generation, thinking)
    except Exception:
        expected = None
    try:
        got = ours(messages, tools, generation, thinking)
    except ChatTemplateError:
        return
    assert expected is not None, (
        "the template raises here, so apply_chat_template must raise ChatTemplateError"
    )
    assert got == expected


# ------------------------------------------------------------------------------------------ live transformers


CROSSCHECK_CASES = [
    ([SYS, U], [WEATHER], {"add_generation_prompt": True}),
    (
        [
            U,
            {
                "role": A,
                "content": "<think>\nplan\n</think>\n\nok",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Zürich <&>"}},
                    }
                ],
            },
            {"role": "tool", "content": "20°C"},
            {"role": "tool", "content": "sunny"},
            {"role": A, "content": "Warm.", "reasoning_content": "r"},
        ],
        [WEATHER],
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    ([U, {"role": A, "content": "<think>x</think>4"}, {"role": "user", "content": "again"}], None, {}),
]


@functools.cache
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    # The tokenizer files that sit next to the official tokenizer_config.json: tokenizer.json, or vocab + merges.
    folder = config_path().parent
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        pytest.fail(f"{folder} has tokenizer_config.json but neither tokenizer.json nor vocab.json")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_render(messages, tools, flags) -> str:
    return hf_tokenizer().apply_chat_template(messages, tools=tools, tokenize=False, **flags)


@pytest.mark.crosscheck
@pytest.mark.parametrize("messages, tools, flags", CROSSCHECK_CASES)
def test_crosscheck_transformers(messages, tools, flags):
    assert apply_chat_template(messages, tools=tools, **flags) == hf_render(messages, tools, flags)


@pytest.mark.crosscheck
@settings(max_examples=min(EXAMPLES, 200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation())
def test_crosscheck_transformers_random(case):
    messages, tools, generation, thinking = case
    flags = {
        k: v
        for k, v in (("add_generation_prompt", generation), ("enable_thinking", thinking))
        if v is not UNSET
    }
    assert apply_chat_template(messages, tools=tools, **flags) == hf_render(messages, tools, flags)
