"""`tinyqwen serve` against vLLM: its qwen3 reasoning-parser cases, both tool-call forms, null parts, bad input.

vLLM's cases (tests/data/vllm_qwen3_reasoning_cases.json, credited there: vLLM's
tests/reasoning/test_qwen3_reasoning_parser.py, Apache-2.0) run twice: token by token through
`tinyqwen.serve.ReplyParser`, and as whole replies of the server (a `ScriptedModel` writes each case's output), the
streamed ones streamed and the others not. All 30 are equal; the deliberate differences from vLLM that they do not
reach are written in tinyqwen/serve/reply_parser.py's docstring and checked at the end of the tool-call section.

Bad input is refused before any work: a JSON body sent as text/plain (415), a body over the size limit (413), a
prompt whose length in bytes alone proves it cannot fit the context (400, in milliseconds, not after seconds of
tokenizing), a tool whose `parameters` is not an object, `stream_options` that are not booleans or come without
`stream: true`, and `n` > 1 (400 naming n). Each answer is OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve tests need the `serve` extra")

from tinyqwen.chat_parsing import ToolCall, parse_tool_calls  # noqa: E402
from tinyqwen.serve import ReplyParser, create_app, parse_sse  # noqa: E402
from tinyqwen.testing import ScriptedModel, asgi_call, asgi_request, run_sync, scripted_reply  # noqa: E402
from tinyqwen.tokenizer import Tokenizer  # noqa: E402

DATA = json.loads(
    (Path(__file__).parent / "data" / "vllm_qwen3_reasoning_cases.json").read_text(encoding="utf-8")
)
CASES = {case["name"]: case for case in DATA["cases"]}
MODEL = "tiny-qwen3"
EOS = (151645, 151643)
TOOL_CALL = 151657
BASH = {"type": "function", "function": {"name": "bash", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}}}}}  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.qwen3()


def case_ids(tok, case) -> list[int]:
    """The case's output as token ids: each delta tokenized on its own (special tokens as tokens), as vLLM's
    harness tokenizes each delta."""
    return [i for delta in case["deltas"] for i in tok.encode(delta, allowed_special="all")]


def parts(reasoning: str, content: str) -> tuple[str | None, str | None]:
    return reasoning or None, content or None


# ------------------------------------------------------------------------------------------ vLLM's cases


def test_the_data_holds_vllms_30_cases():
    assert len(CASES) == len(DATA["cases"]) == 30
    assert sum(case["stream"] for case in CASES.values()) == 16
    assert "Apache License 2.0" in DATA["source"] and "test_qwen3_reasoning_parser.py" in DATA["source"]


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_reasoning_case_token_by_token(tok, name):
    case = CASES[name]
    parser = ReplyParser(tok, EOS, thinking=case["thinking"])
    ids = case_ids(tok, case)
    if "reasoning_ends_at" in case:  # the two regression cases: reasoning is over at the <tool_call> token
        at = ids.index(tok.token_to_id(case["reasoning_ends_at"]))
        for i in ids[:at]:
            parser.push(i)
        assert parser.mode == "reasoning"
        parser.push(ids[at])
        assert parser.mode != "reasoning" and parser.reply.reasoning == "thinkingthinking"
        return
    deltas = [d for i in ids for d in parser.push(i)] + parser.finish()
    if case["stream"]:  # what a client assembles from the deltas
        got = parts(*("".join(t for k, t in deltas if k == kind) for kind in ("reasoning", "content")))
    else:  # the whole reply: None where there is no text, as vLLM's parser returns it
        got = (parser.reply.reasoning, parser.reply.content)
    assert got == (case["reasoning"], case["content"])


@pytest.fixture(scope="module")
def case_app(tiny_qwen3_model, tok):
    """The server with a model that writes each case's output (then <|im_end|>) when asked for it by name."""

    def replies(prompt: str) -> str | None:
        for name, case in CASES.items():
            if f"Case {name}." in prompt:
                return "".join(case["deltas"]) + "<|im_end|>"
        return None

    app = create_app(ScriptedModel(tiny_qwen3_model, scripted_reply(tok, replies)), tok, MODEL)
    yield app
    app.state.service.engine.stop()


def chat(app, body: dict) -> tuple[int, dict | list]:
    status, _, raw = asgi_call(app, "POST", "/v1/chat/completions", {"model": MODEL, **body})
    return status, (parse_sse(raw.decode()) if body.get("stream") else json.loads(raw))


def streamed_parts(events) -> tuple[str | None, str | None]:
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    return parts(*("".join(d.get(k) or "" for d in deltas) for k in ("reasoning_content", "content")))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "reasoning_ends_at" not in c])
def test_vllm_reasoning_case_through_the_server(case_app, name):
    case = CASES[name]
    body = {"messages": [{"role": "user", "content": f"Case {name}."}], "temperature": 0, "max_tokens": 60,
            "stream": case["stream"], "chat_template_kwargs": {"enable_thinking": case["thinking"]}}  # fmt: skip
    status, reply = chat(case_app, body)
    assert status == 200, reply
    if case["stream"]:
        assert streamed_parts(reply) == (case["reasoning"], case["content"])
        assert reply[-2]["choices"][0]["finish_reason"] == "stop"
    else:
        message = reply["choices"][0]["message"]  # JSON null where vLLM gives None
        assert (message["reasoning_content"], message["content"]) == (case["reasoning"], case["content"])


# ------------------------------------------------------------------------------------------ tool calls, both forms

JSON_CALL = '<tool_call>\n{"name": "bash", "arguments": {"command": "ls", "timeout": 5}}\n</tool_call>'
XML_CALL = ("<tool_call>\n<function=bash>\n<parameter=command>\nls\n</parameter>\n<parameter=timeout>\n5\n"
            "</parameter>\n</function>\n</tool_call>")  # fmt: skip


def test_parse_tool_calls_reads_qwen35s_function_form():
    # the schema types the values: "timeout" is an integer, "command" a string ("5" would stay text there)
    schemas = {"bash": BASH["function"]["parameters"]}
    assert parse_tool_calls(XML_CALL, schemas) == ("", [ToolCall("bash", {"command": "ls", "timeout": 5})])
    assert parse_tool_calls(XML_CALL) == ("", [ToolCall("bash", {"command": "ls", "timeout": "5"})])
    multiline = "<tool_call><function=w><parameter=text>\na\n\nb\n</parameter></function></tool_call>"
    assert parse_tool_calls(multiline)[1] == [ToolCall("w", {"text": "a\n\nb"})]  # one newline off each end
    from tinyqwen.errors import ToolCallParseError

    for broken in ["<tool_call><function=w><parameter=x>1</parameter></tool_call>",  # no </function>
                   "<tool_call><function=w>stray<parameter=x>1</parameter></function></tool_call>",
                   "<tool_call><function=w><parameter=x>1</parameter><parameter=x>2</parameter></function>"
                   "</tool_call>"]:  # fmt: skip
        with pytest.raises(ToolCallParseError, match="tool call block 1"):
            parse_tool_calls(broken)


@pytest.mark.parametrize("form", ["json", "xml"])
@pytest.mark.parametrize("where", ["after </think>", "inside the thinking"])
def test_both_call_forms_become_tool_calls_and_end_the_reasoning(tok, form, where):
    call = JSON_CALL if form == "json" else XML_CALL
    text = (
        "<think>\nI should list the files.\n" + ("</think>\n\n" if where == "after </think>" else "") + call
    )
    parser = ReplyParser(tok, EOS, tools=[BASH])
    deltas = [d for i in tok.encode(text + "<|im_end|>", allowed_special="all") for d in parser.push(i)]
    deltas += parser.finish()
    reply = parser.reply
    assert reply.reasoning == "\nI should list the files.\n" and reply.content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls] == [
        ("bash", {"command": "ls", "timeout": 5})
    ]
    assert "".join(t for k, t in deltas if k == "reasoning") == reply.reasoning
    assert not [d for d in deltas if d[0] == "content"]


@pytest.fixture(scope="module")
def tool_app(tiny_qwen3_model, tok):
    """The server with a model that calls bash in Qwen3.5's form from inside its thinking, or answers with text
    around a call."""

    def replies(prompt: str) -> str | None:
        if "list files" in prompt:
            return "<think>\nI should list the files.\n" + XML_CALL + "<|im_end|>"
        if "say and call" in prompt:
            return "<think>\n\n</think>\n\nLet me look.\n" + JSON_CALL + "\nDone.<|im_end|>"
        if "no tools" in prompt:
            return "<think>\n\n</think>\n\n<|im_end|>"
        return None

    app = create_app(ScriptedModel(tiny_qwen3_model, scripted_reply(tok, replies)), tok, MODEL)
    yield app
    app.state.service.engine.stop()


def test_the_server_sends_qwen35_calls_as_tool_calls_streaming_and_not(tool_app):
    body = {
        "messages": [{"role": "user", "content": "Please list files."}],
        "tools": [BASH],
        "temperature": 0,
    }
    status, reply = chat(tool_app, body)
    assert status == 200
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == "\nI should list the files.\n"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "bash" and json.loads(call["function"]["arguments"]) == {
        "command": "ls",
        "timeout": 5,
    }
    status, events = chat(tool_app, {**body, "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert streamed_parts(events) == ("\nI should list the files.\n", None)
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (0, "bash", call["function"]["arguments"])
    ]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_around_a_call_is_kept_as_generated(tool_app):
    body = {
        "messages": [{"role": "user", "content": "Please say and call."}],
        "tools": [BASH],
        "temperature": 0,
    }
    _, reply = chat(tool_app, body)
    message = reply["choices"][0]["message"]
    # before the call as generated ("\n\n" after </think> included); after it, text that says something is kept
    assert message["content"] == "\n\nLet me look.\n\nDone." and message["reasoning_content"] == "\n\n"
    _, events = chat(tool_app, {**body, "stream": True})
    assert streamed_parts(events) == ("\n\n", "\n\nLet me look.\n\nDone.")
    # an answer of newlines only and no call: sent as generated
    _, reply = chat(tool_app, {**body, "messages": [{"role": "user", "content": "no tools"}]})
    assert reply["choices"][0]["message"]["content"] == "\n\n"


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def app(tiny_qwen3_model, tok):
    app = create_app(tiny_qwen3_model, tok, MODEL)
    yield app
    app.state.service.engine.stop()


def send(app, body: dict | bytes, content_type: str | None = "application/json", path="/v1/chat/completions"):
    """(status, error dict) for one request with the given Content-Type (None: no header)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def go():
        return await asgi_request(app, "POST", path, data, headers=_headers(content_type, len(data)))

    status, headers, raw = run_sync(go())
    return status, headers, json.loads(raw)


def _headers(content_type: str | None, length: int) -> list[tuple[bytes, bytes]]:
    out = [(b"content-length", str(length).encode())]
    return out if content_type is None else [*out, (b"content-type", content_type.encode())]


def error_of(status: int, headers: dict, reply: dict) -> dict:
    assert headers["content-type"] == "application/json"
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


HI = [{"role": "user", "content": "hi"}]


def test_a_json_body_sent_as_text_plain_is_415(app):
    status, headers, reply = send(app, {"model": MODEL, "messages": HI, "max_tokens": 1}, "text/plain")
    assert (
        status == 415
        and "Content-Type must be application/json" in error_of(status, headers, reply)["message"]
    )
    for fine in ["application/json; charset=utf-8", "application/vnd.api+json", None]:
        status, _, reply = send(app, {"model": MODEL, "messages": HI, "max_tokens": 1}, fine)
        assert status == 200, (fine, reply)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "not an object"}}]},
            "tools[0].function.parameters must be a JSON Schema object",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "parameters"),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "'stream_options.include_usage' must be",
        ),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "'stream_options.include_usage' must be"),
        (
            {"stream_options": {"include_usage": True}},
            "'stream_options' is only allowed when 'stream' is true",
        ),
        ({"stream": False, "stream_options": {"include_usage": True}}, "only allowed when 'stream' is true"),
        ({"n": 2}, "only n=1 is supported, got n=2"),
        ({"n": 0}, "only n=1 is supported, got n=0"),
        ({"n": True}, "only n=1 is supported, got n=true"),
    ],
    ids=lambda v: None if isinstance(v, dict) else v[:30],
)
def test_bad_fields_are_400_naming_the_field(app, extra, needle):
    status, headers, reply = send(app, {"model": MODEL, "messages": HI, "max_tokens": 1, **extra})
    error = error_of(status, headers, reply)
    assert status == 400 and needle in error["message"], error
    assert error["param"] == next(k for k in ("tools", "stream_options", "n") if k in extra)


def test_good_stream_options_and_tools_still_work(app):
    body = {
        "model": MODEL,
        "messages": HI,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, _, raw = asgi_call(app, "POST", "/v1/chat/completions", body)
    events = parse_sse(raw.decode())
    assert status == 200 and events[-2]["usage"]["completion_tokens"] == 2
    for options in [
        None,
        {},
    ]:  # null, or an empty object, without stream: nothing asked, nothing refused (vLLM)
        body = {"model": MODEL, "messages": HI, "max_tokens": 1, "stream_options": options, "tools": [BASH]}
        assert asgi_call(app, "POST", "/v1/chat/completions", body)[0] == 200


@pytest.mark.parametrize("size", [500_000, 1_000_000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_huge_one_word_prompt_is_refused_before_tokenizing(app, size, path):
    word = (
        "a" * size
    )  # one "word": tokenizing it takes seconds; its length alone says it cannot fit 1024 tokens
    body = {"model": MODEL, "max_tokens": 1}
    body.update({"messages": [{"role": "user", "content": word}]} if "chat" in path else {"prompt": word})
    data = json.dumps(body).encode()
    started = time.perf_counter()
    status, headers, reply = send(app, data, path=path)
    elapsed = time.perf_counter() - started
    error = error_of(status, headers, reply)
    assert status == 400 and "maximum context length is 1024 tokens" in error["message"]
    assert f"{size:,} bytes of text" in error["message"] and error["param"] in ("messages", "prompt")
    assert elapsed < 1.0, f"{elapsed:.2f} s: the length check must come before tokenizing"  # generous: ~10 ms


def test_the_length_bound_never_refuses_a_prompt_that_fits(app, tok):
    # 128-byte tokens (runs of spaces) are the longest: 8 x 128 spaces is 8 tokens, far below the bound
    spaces = " " * (128 * 8)
    assert len(tok.encode(spaces)) <= 9
    status, _, reply = send(
        app, {"model": MODEL, "messages": [{"role": "user", "content": spaces}], "max_tokens": 1}
    )
    assert status == 200, reply
    # just over: 1024 tokens' worth of bytes at 128 a token is refused by the bound, with the numbers
    status, _, reply = send(app, {"model": MODEL, "prompt": " " * (128 * 1024), "max_tokens": 1},
                            path="/v1/completions")  # fmt: skip
    assert (
        status == 400 and "at least 1,024 tokens (a token is at most 128 bytes)" in reply["error"]["message"]
    )


def test_a_body_over_the_size_limit_is_413(app):
    app.state.max_body_bytes = 10_000
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 20_000}]}
        status, headers, reply = send(app, body)
        error = error_of(status, headers, reply)
        assert status == 413 and "20,0" in error["message"] and "limit of 10,000 bytes" in error["message"], (
            error
        )
        data = json.dumps(body).encode()  # no Content-Length: counted while it arrives

        async def go():
            return await asgi_request(app, "POST", "/v1/chat/completions", data,
                                      headers=[(b"content-type", b"application/json")])  # fmt: skip

        status, _, raw = run_sync(go())
        assert status == 413 and "at least" in json.loads(raw)["error"]["message"]
        status, _, reply = send(app, {"model": MODEL, "messages": HI, "max_tokens": 1})
        assert status == 200, reply
    finally:
        del app.state.max_body_bytes


def test_the_openai_client_gets_its_own_errors_for_bad_input(app):
    """The official client, over a real socket, for the refusals a client library can produce."""
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    import socket
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30
        )
        with pytest.raises(openai.BadRequestError, match="only n=1 is supported"):
            client.chat.completions.create(model=MODEL, messages=HI, n=2)
        with pytest.raises(openai.BadRequestError, match="only allowed when 'stream' is true"):
            client.chat.completions.create(model=MODEL, messages=HI, stream_options={"include_usage": True})
        bad_tool = {"type": "function", "function": {"name": "f", "parameters": "none"}}
        with pytest.raises(openai.BadRequestError, match="parameters must be a JSON Schema object"):
            client.chat.completions.create(model=MODEL, messages=HI, tools=[bad_tool])
        started = time.perf_counter()
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a" * 500_000}])
        assert time.perf_counter() - started < 2.0  # the request itself is 500 KB over a socket
        r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0)
        assert (
            r.choices[0].finish_reason == "length" and r.choices[0].message.content is None
        )  # all reasoning
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_concurrent_bad_requests_do_not_hold_up_good_ones(app):
    """A burst of huge prompts answered 400 while a good request is served: the checks cost no tokenizing."""

    async def burst():
        huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "b" * 400_000}]}).encode()
        good = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2, "temperature": 0}).encode()
        jobs = [asgi_request(app, "POST", "/v1/chat/completions", huge) for _ in range(8)]
        jobs.append(asgi_request(app, "POST", "/v1/chat/completions", good))
        return await asyncio.gather(*jobs)

    started = time.perf_counter()
    results = run_sync(burst())
    assert [r[0] for r in results] == [400] * 8 + [200]
    assert time.perf_counter() - started < 5.0
