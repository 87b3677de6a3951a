"""Chapter 12 checkpoints: serving — and, last, your client against tinyqwen's real server.

Expected values: the server-sent-events cases are derived by hand from the WHATWG rules (written next to each
case); replies, their split and their tool calls come from exercises/references/ch12_serving.json (made by
make_ch12_serving.py: the official tokenizer and the official chat template through transformers); the streamed
chunks of `assemble` are written by hand in OpenAI's format (and checked against the official `openai` package's
types when it is installed); the last checkpoint compares with transformers' greedy generation stored for
chapter 9 and the official template's rendering of the round trip.
"""

from __future__ import annotations

import copy
import functools
import json

from exercises.grading import Mistake, call, expect, expect_equal, notebook, reference_file

reread = functools.partial(notebook, 12)
REF = reference_file("ch12_serving.json")
EOT = ("<|im_end|>", "<|endoftext|>")


# ------------------------------------------------------------------------------------------ server-sent events

SSE_JSON_HINT = (
    "Only the text after 'data:' is JSON; the final 'data: [DONE]' is not JSON at all, and comment lines "
    "(': ping') or other fields ('event:', 'id:') are not data."
)


def check_sse(course, text: str, want: list, what: str, mistakes=()) -> None:
    section = reread("Server-sent events")
    got = call(course.ch12.parse_sse, text, what="parse_sse", reread=section, inputs=repr(text),
               hints={json.JSONDecodeError: SSE_JSON_HINT})  # fmt: skip
    expect_equal(got, want, what=what, inputs=repr(text), reread=section, mistakes=mistakes)


def test_sse_events(course):
    """An SSE stream by hand"""
    # by hand: three events, each one data line; the third is the stream's end marker
    text = 'data: {"id": 1, "text": "Hel"}\n\ndata: {"id": 2, "text": "lo"}\n\ndata: [DONE]\n\n'
    check_sse(course, text, [{"id": 1, "text": "Hel"}, {"id": 2, "text": "lo"}, "[DONE]"], "parse_sse on a stream",
              [Mistake("'[DONE]' was dropped", [{"id": 1, "text": "Hel"}, {"id": 2, "text": "lo"}],
                       "Keep the last event as the string '[DONE]': it tells the client the stream is over.")])  # fmt: skip


def test_sse_details(course):
    """Comments, CRLF, several data lines"""
    # by hand, line by line: a comment (no event); an event with "event:" and "id:" fields (not data) and a
    # data line without a space; CRLF line endings; one event whose data spans two lines, joined with "\n"; an
    # "id:"-only block (no data: no event); the end marker; then an unfinished event (no blank line): dropped
    text = (': ping\n\nevent: message\nid: 7\ndata:{"a": 1}\n\ndata: {"b": 2}\r\n\r\ndata: {"c":\ndata: [3]}\n\n'
            'id: 8\n\ndata: [DONE]\n\ndata: {"late": true}')  # fmt: skip
    want = [{"a": 1}, {"b": 2}, {"c": [3]}, "[DONE]"]
    check_sse(course, text, want, "parse_sse on comments, fields, CRLF and multi-line data", [
        Mistake("a 'data:' line without a space after the colon was skipped", want[1:],
                "The space after 'data:' is optional: drop one if it is there, and keep the line either way."),
        Mistake("the unfinished event at the end was kept", [*want, {"late": True}],
                "Only a blank line completes an event; text after the last one is dropped."),
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------ the reasoning split


def joined(deltas) -> tuple[str, str]:
    if not isinstance(deltas, list) or not all(isinstance(d, tuple) and len(d) == 2 for d in deltas):
        return ("?", "?")
    return (
        "".join(t for k, t in deltas if k == "reasoning_content"),
        "".join(t for k, t in deltas if k == "content"),
    )


def wrong_split(
    pieces, *, last=False, strip=True, cut_off_is_content=False, keep_eot=False
) -> tuple[str, str]:
    """What classic wrong splits give (for the hints): at the LAST </think>, no newline stripping, ..."""
    tags = [i for i, p in enumerate(pieces) if p == "</think>"]
    body = [p for p in pieces if keep_eot or p not in EOT]
    tags = [i for i, p in enumerate(body) if p == "</think>"]
    if "<think>" in body and (tags or not cut_off_is_content):
        start = body.index("<think>") + 1
        end = (tags[-1] if last else tags[0]) if tags else len(body)
        reasoning, content = "".join(body[start:end]), "".join(body[end + 1 :])
    else:
        reasoning, content = "", "".join(body)
    return (reasoning.strip("\n"), content.strip("\n")) if strip else (reasoning, content)


def test_reasoning_split(course):
    """The reasoning split"""
    section = reread("The reasoning split")
    for case in REF["split"]:
        pieces = list(case["pieces"])
        got = call(course.ch12.split_deltas, pieces, True, what="split_deltas", reread=section)
        expect(isinstance(got, list), what="split_deltas", reread=section,
               problem=f"split_deltas must return a list of (field, text) tuples, got {type(got).__name__}")  # fmt: skip
        kinds = [d[0] for d in got if isinstance(d, tuple) and d]
        expect(set(kinds) <= {"reasoning_content", "content"}, what="split_deltas", reread=section,
               problem=f"the fields are 'reasoning_content' and 'content', got {sorted(set(kinds))}")  # fmt: skip
        expect(all(t for _, t in got), what="split_deltas", reread=section,
               problem="an empty delta was returned: skip pieces that add no text")  # fmt: skip
        expect_equal(joined(got), (case["reasoning"], case["content"]),
                     what=f"(reasoning, answer) of the reply '{case['name']}', joined from your deltas",
                     inputs=f"pieces {pieces}", reread=section, mistakes=[
            Mistake("the split is at the LAST </think> (the model card's rule, which needs the whole reply)",
                    wrong_split(pieces, last=True), "A streaming server has already sent the text after the "
                    "first </think> as the answer: close the reasoning at the first one."),
            Mistake("newlines at the ends of each part were kept", wrong_split(pieces, strip=False),
                    "Strip '\\n' from both ends of the reasoning and of the answer."),
            Mistake("a reply cut off while thinking went to the answer", wrong_split(pieces, cut_off_is_content=True),
                    "Everything after <think> is reasoning until </think>, even when </think> never comes."),
            Mistake("the end-of-turn token was kept as text", wrong_split(pieces, keep_eot=True),
                    "<|im_end|> and <|endoftext|> end the reply; they are not text."),
        ])  # fmt: skip
        order = [k for k, _ in got]
        expect(order == sorted(order, reverse=True) or "</think>" in "".join(case["content"]), what="split_deltas",
               reread=section, problem=f"'{case['name']}': an answer delta came before a reasoning delta")  # fmt: skip


def test_deltas_never_take_back_text(course):
    """Deltas never take back text"""
    section = reread("Deltas never take back text")
    for case in REF["split"]:
        pieces = list(case["pieces"])
        final = joined(call(course.ch12.split_deltas, pieces, True, what="split_deltas", reread=section))
        for k in range(len(pieces) + 1):
            part = joined(call(course.ch12.split_deltas, pieces[:k], False, what="split_deltas(..., final=False)",
                               reread=section))  # fmt: skip
            ok = final[0].startswith(part[0]) and final[1].startswith(part[1])
            expect(ok, what=f"streaming '{case['name']}': what was sent after {k} pieces", reread=section,
                   inputs=f"pieces[:{k}] = {pieces[:k]}, final=False",
                   problem=f"sent (reasoning, answer) = {part!r}, but the whole reply is {final!r}: text already "
                   "sent is not a prefix of the reply. Hold back newlines at the end of a part until a "
                   "non-newline piece follows: they may be the last characters, which are stripped.")  # fmt: skip


# ------------------------------------------------------------------------------------------ tool calls


def test_tool_calls(course):
    """Tool calls in OpenAI's format"""
    section = reread("Tool calls in OpenAI's format")
    for case in REF["tools"]:
        answer, calls = call(course.ch12.parse_tool_calls, case["content"], what="parse_tool_calls",
                             reread=section, inputs=repr(case["content"]))  # fmt: skip
        expect_equal(answer, case["answer"], what=f"the text outside the tool calls ('{case['name']}')",
                     inputs=repr(case["content"]), reread=section, mistakes=[
            Mistake("the <tool_call> blocks were left in the text", case["content"]),
            Mistake("the newlines around the blocks were kept", case["content"].split("<tool_call>")[0],
                    "Strip '\\n' from both ends of what remains.")])  # fmt: skip
        expect(isinstance(calls, list) and len(calls) == len(case["calls"]), what="parse_tool_calls",
               reread=section, problem=f"'{case['name']}': expected {len(case['calls'])} call(s), got "
               f"{len(calls) if isinstance(calls, list) else type(calls).__name__}")  # fmt: skip
        for i, (got, want) in enumerate(zip(calls, case["calls"], strict=True)):
            where = f"call {i} of '{case['name']}'"
            function = got.get("function") if isinstance(got, dict) else None
            expect(isinstance(function, dict) and got.get("type") == "function", what=where, reread=section,
                   problem=f'a call is {{"id", "type": "function", "function": {{"name", "arguments"}}}}, got {got!r}')  # fmt: skip
            expect(isinstance(function.get("arguments"), str), what=where, reread=section,
                   problem="arguments must be a JSON *string* (json.dumps of the object), as OpenAI sends them, "
                   f"got {type(function.get('arguments')).__name__}")  # fmt: skip
            expect_equal([function.get("name"), json.loads(function["arguments"])], [want["name"], want["arguments"]],
                         what=f"{where}: [name, decoded arguments]", reread=section)  # fmt: skip
        ids = [c.get("id") for c in calls]
        expect(ids == [f"call_{i}" for i in range(len(calls))], what="parse_tool_calls", reread=section,
               problem=f"call ids must be call_0, call_1, ...: got {ids}")  # fmt: skip


# ------------------------------------------------------------------------------------------ the client side


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip


def hand_made_streams() -> list[tuple[str, list[dict], dict, str]]:
    """(name, chunks, message, finish_reason), all written by hand in OpenAI's streaming format."""
    usage = {
        **chunk({}),
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    thinking = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Two and"}),
                chunk({"reasoning_content": " two."}), chunk({"content": "It is"}), chunk({"content": " 4."}),
                chunk({}, "stop"), usage]  # fmt: skip
    calls = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Tools."}),
             chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": '}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
             chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                    "function": {"name": "get_time", "arguments": "{}"}}]}),
             chunk({}, "tool_calls")]  # fmt: skip
    return [
        ("reasoning, then an answer", thinking,
         {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two and two.", "tool_calls": None}, "stop"),
        ("two tool calls, the first one's arguments in two pieces", calls,
         {"role": "assistant", "content": "", "reasoning_content": "Tools.", "tool_calls": [
             {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
         "tool_calls"),
        ("an answer only, cut off by max_tokens", [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}),
                                                    chunk({}, "length")],
         {"role": "assistant", "content": "Hi", "reasoning_content": None, "tool_calls": None}, "length"),
    ]  # fmt: skip


def test_assemble(course):
    """Assembling a streamed reply"""
    section = reread("Assembling a streamed reply")
    try:  # the official client's own types accept the hand-made chunks (when the `openai` package is installed)
        from openai.types.chat import ChatCompletionChunk
    except ImportError:
        ChatCompletionChunk = None
    for name, chunks, message, finish in hand_made_streams():
        if ChatCompletionChunk is not None:
            for c in chunks:
                ChatCompletionChunk.model_validate(c)
        got = call(course.ch12.assemble, copy.deepcopy(chunks), what="assemble", reread=section)
        expect(isinstance(got, tuple) and len(got) == 2, what="assemble", reread=section,
               problem=f"assemble returns (message, finish_reason), got {type(got).__name__}")  # fmt: skip
        calls = message["tool_calls"] or []
        overwritten = [{**c, "function": {**c["function"], "arguments": '"Paris"}' if c["id"] == "call_a" else "{}"}}
                       for c in calls] or None  # fmt: skip
        expect_equal(got[0], message, what=f"the message of '{name}'", inputs=f"{len(chunks)} chunks",
                     reread=section, mistakes=[
            Mistake("each tool-call piece replaced the arguments instead of adding to them",
                    {**message, "tool_calls": overwritten},
                    "A call's 'arguments' arrive in pieces: concatenate them, per call index."),
            Mistake("reasoning_content is '' instead of None when there was none",
                    {**message, "reasoning_content": message["reasoning_content"] or ""}),
        ])  # fmt: skip
        expect_equal(got[1], finish, what=f"the finish_reason of '{name}'", reread=section)


def test_tool_round_trip(course):
    """A tool-call round trip"""
    from tinyqwen.tokenizer import Tokenizer

    section = reread("A tool-call round trip")
    ref = REF["follow_up"]
    messages, assistant, result = ref["messages"][:-2], ref["messages"][-2], ref["messages"][-1]
    before = copy.deepcopy(messages)
    reply = {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.",
             "tool_calls": copy.deepcopy(assistant["tool_calls"])}  # fmt: skip
    tools = {"get_weather": lambda city: {"city": city, "celsius": 21}}
    got = call(course.ch12.follow_up, messages, reply, tools, what="follow_up", reread=section)
    expect(messages == before, what="follow_up", reread=section,
           problem="follow_up changed the list it was given: build a new list")  # fmt: skip
    expect(isinstance(got, list) and len(got) == len(ref["messages"]), what="follow_up", reread=section,
           problem=f"expected {len(ref['messages'])} messages (the conversation, the assistant's call, one tool "
           f"result), got {len(got) if isinstance(got, list) else type(got).__name__}")  # fmt: skip
    expect_equal(got[-1], result, what="the tool message", reread=section, mistakes=[
        Mistake("the result was sent as an object, not as text", {**result, "content": json.loads(result["content"])},
                "A tool message's content is a string: json.dumps the result."),
        Mistake("the tool result was sent as a user message", {**result, "role": "user"},
                "Tool results go back with role 'tool' (the template wraps them in <tool_response>)."),
    ])  # fmt: skip
    # the next prompt, rendered by the chat template, must be the official template's (with the official ids)
    ids = Tokenizer.qwen3().apply_chat_template(
        got, tools=ref["tools"], add_generation_prompt=True, return_dict=False
    )
    expect_equal(ids, ref["ids"], what="the ids of the next request's prompt vs the official template + tokenizer",
                 reread=section)  # fmt: skip


# ------------------------------------------------------------------------------------------ the real server


@functools.cache
def served_tiny_qwen3():
    """tinyqwen's server (the ASGI app, called in-process) on chapter 9's tiny real-vocabulary Qwen3, whose greedy
    replies transformers stored. The model is scripted (tinyqwen.testing.ScriptedModel) only for the tool-call turn."""
    from exercises.test_ch09_chat_template_thinking import REF as CH09
    from exercises.test_ch09_chat_template_thinking import tiny_chat_dir
    from tinyqwen.model import load_model
    from tinyqwen.serve import create_app
    from tinyqwen.testing import ScriptedModel, scripted_reply
    from tinyqwen.tokenizer import Tokenizer

    tok = Tokenizer.qwen3()
    model = load_model(tiny_chat_dir(CH09["end_to_end"]["seed"]))
    tool_reply = REF["tools"][0]["text"]

    def replies(prompt: str) -> str | None:
        if "get_weather" not in prompt:
            return None  # the real model's own greedy choices
        if "<tool_response>" in prompt.rsplit("<|im_start|>user", 1)[-1]:
            return "<think>\n\n</think>\n\nIt is 21 °C in Paris.<|im_end|>"
        return tool_reply

    return create_app(ScriptedModel(model, scripted_reply(tok, replies)), tok, "tiny"), CH09["end_to_end"]


def test_your_client_against_the_real_server(course):
    """Your client against the real server"""
    from tinyqwen.testing import asgi_call

    section = reread("Your client against the real server")
    app, e = served_tiny_qwen3()
    ch12 = course.ch12

    def stream(body: dict, what: str):
        status, _, raw = asgi_call(
            app, "POST", "/v1/chat/completions", {**body, "model": "tiny", "stream": True}
        )
        expect(status == 200, what=what, problem=f"the server answered {status}: {raw[:200]!r}")
        events = call(ch12.parse_sse, raw.decode(), what=f"{what}: parse_sse on the server's stream", reread=section,
                      hints={json.JSONDecodeError: SSE_JSON_HINT})  # fmt: skip
        expect(isinstance(events, list) and events[-1:] == ["[DONE]"], what=f"{what}: parse_sse", reread=section,
               problem="the stream's events must end with '[DONE]'")  # fmt: skip
        return events, call(ch12.assemble, events[:-1], what="assemble", reread=section)

    # 1. greedy, thinking off: transformers' greedy reply to chapter 9's conversation, through HTTP and your client
    body = {"messages": e["messages"], "max_tokens": e["max_new_tokens"], "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}, "return_token_ids": True}  # fmt: skip
    events, (message, finish) = stream(body, "1/3 a streamed greedy reply")
    expect(events[-2]["choices"][0].get("token_ids") == e["new_ids"], what="1/3 the server's ids",
           problem="the server's ids differ from transformers' greedy ids: this is tinyqwen's bug, not yours")  # fmt: skip
    want = e["text"].strip("\n")
    expect_equal([message["content"], message["reasoning_content"], finish], [want, None, "length"],
                 what="1/3 [content, reasoning_content, finish_reason] assembled by your client vs transformers' "
                 "greedy reply", reread=section)  # fmt: skip

    # 2. a tool call, streamed
    ref = REF["follow_up"]
    conversation = ref["messages"][:-2]
    body = {"messages": conversation, "tools": ref["tools"], "temperature": 0}
    _, (message, finish) = stream(body, "2/3 a streamed tool call")
    calls = message.get("tool_calls") or []
    expect_equal([finish, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]],
                 ["tool_calls", [("get_weather", {"city": "Paris"})]], what="2/3 [finish_reason, calls] of the "
                 "streamed tool call, assembled by your client", reread=section)  # fmt: skip

    # 3. run the tool, send the result back: the server's prompt must be the official template's
    tools = {"get_weather": lambda city: {"city": city, "celsius": 21}}
    messages = call(ch12.follow_up, conversation, message, tools, what="follow_up", reread=section)
    status, _, raw = asgi_call(app, "POST", "/v1/chat/completions",
                               {"model": "tiny", "messages": messages, "tools": ref["tools"], "temperature": 0,
                                "return_token_ids": True})  # fmt: skip
    reply = json.loads(raw)
    expect(status == 200, what="3/3 the follow-up request", problem=f"the server answered {status}: {reply}")
    expect_equal(reply["prompt_token_ids"], ref["ids"], what="3/3 the follow-up prompt's ids vs the official template "
                 "+ tokenizer", reread=section)  # fmt: skip
    # the answer as generated, "\n\n" after </think> included: the server sends the text as vLLM does
    expect_equal(
        reply["choices"][0]["message"]["content"], "\n\nIt is 21 °C in Paris.", what="3/3 the final answer"
    )


# ------------------------------------------------------------------------------------------ continuous batching


class ScriptedBatchModel:
    """The scheduler's model: each request's next id is a fixed function of its own ids so far (its script), so
    the right output of every request is known alone. Every call is checked against what the KV row holds."""

    eos = frozenset({0})

    def __init__(self, course, max_batch: int, prefill_budget: int):
        self.course, self.max_batch, self.budget = course, max_batch, prefill_budget
        self.kv: dict[int, list[int]] = {}  # id(request) -> the ids its KV row holds
        self.released: list[int] = []
        self.step_log: list[tuple] = []  # this step's calls: ("prefill", request, n) / ("decode", [requests])
        self.admitted: list[int] = []

    @staticmethod
    def next_id(history: list[int]) -> int:
        h = 17
        for t in history[-3:]:
            h = (h * 31 + t) % 1009
        return h % 13  # 0 (eos) about one time in 13

    def fail(self, problem: str) -> None:
        expect(False, what="scheduler_step's calls to the model", problem=problem, reread=SCHEDULER_SECTION)

    def prefill(self, request, ids):
        key = id(request)
        if key in self.released:
            self.fail(f"prefill was called for a request after its release: {request!r}")
        row = self.kv.setdefault(key, [])
        if not row:
            self.admitted.append(key)
        want = request.prompt[len(row) : len(row) + len(ids)]
        if list(ids) != want or not ids:
            self.fail(
                f"prefill fed {list(ids)!r}, but the request's next prompt ids are {want!r} (its KV row holds "
                f"{len(row)} of {len(request.prompt)}); feed prompt[prefilled : prefilled + n], n >= 1"
            )
        row.extend(ids)
        self.step_log.append(("prefill", key, len(ids)))
        return self.next_id(row) if len(row) == len(request.prompt) else None

    def decode(self, requests, ids):
        self.step_log.append(("decode", [id(r) for r in requests]))
        out = []
        for request, t in zip(requests, ids, strict=True):
            row = self.kv.get(id(request), [])
            if len(row) < len(request.prompt):
                self.fail(f"decode was given a request whose prompt is not complete yet: {request!r}")
            if not request.output or t != request.output[-1]:
                self.fail(
                    f"decode fed id {t!r}, but the request's last generated id is "
                    f"{request.output[-1] if request.output else None!r}"
                )
            row.append(t)
            out.append(self.next_id(row))
        return out

    def release(self, request):
        if id(request) in self.released:
            self.fail(f"a request was released twice: {request!r}")
        self.released.append(id(request))


SCHEDULER_SECTION = reread("Serving many users: continuous batching")


def alone(prompt: list[int], max_tokens: int) -> list[int]:
    history, out = list(prompt), []
    while len(out) < max_tokens:
        t = ScriptedBatchModel.next_id(history)
        out.append(t)
        history.append(t)
        if t in ScriptedBatchModel.eos:
            break
    return out


def run_scheduler(course, specs, max_batch: int, budget: int):
    """Drive the learner's scheduler_step to the end, checking every step's rules; returns the requests."""
    model = ScriptedBatchModel(course, max_batch, budget)
    requests = [course.ch12.Request(prompt, n) for prompt, n in specs]
    running, waiting = [], list(requests)
    inputs = f"{len(specs)} requests, max_batch={max_batch}, prefill_budget={budget}"
    for step in range(2000):
        if not running and not waiting:
            break
        model.step_log = []
        done = call(course.ch12.scheduler_step, model, running, waiting, max_batch, budget, what="scheduler_step",
                    reread=SCHEDULER_SECTION, inputs=inputs)  # fmt: skip
        what = f"scheduler step {step + 1} ({inputs})"
        prefills = [c for c in model.step_log if c[0] == "prefill"]
        decodes = [c for c in model.step_log if c[0] == "decode"]
        fed = sum(c[2] for c in prefills)
        expect(fed <= budget, what=what, reread=SCHEDULER_SECTION,
               problem=f"{fed} prompt ids were prefilled in one step, over the budget of {budget}: a long prompt "
                       "must be prefilled over several steps so the running replies keep flowing")  # fmt: skip
        expect(len(decodes) <= 1, what=what, reread=SCHEDULER_SECTION,
               problem=f"model.decode was called {len(decodes)} times in one step: the point of continuous batching "
                       "is ONE decode call for every running request (the weights are read once)")  # fmt: skip
        expect(len(running) <= max_batch, what=what, reread=SCHEDULER_SECTION,
               problem=f"{len(running)} requests are running, more than max_batch={max_batch}: admit a waiting "
                       "request only while fewer than max_batch run")  # fmt: skip
        expect(
            isinstance(done, list),
            what=what,
            reread=SCHEDULER_SECTION,
            problem=f"scheduler_step must return the list of finished requests, got {type(done).__name__}",
        )
        for r in done:
            expect(r not in running and id(r) in model.released, what=what, reread=SCHEDULER_SECTION,
                   problem=f"a finished request must leave `running` and be released in the step it finishes: "
                           f"{r!r}")  # fmt: skip
        for r in running:
            expect(not (r.output and (r.output[-1] in model.eos or len(r.output) >= r.max_tokens)), what=what,
                   reread=SCHEDULER_SECTION, problem=f"a finished request is still running: {r!r} (its last id "
                   "is eos, or it has max_tokens ids)")  # fmt: skip
        decoded = set(decodes[0][1]) if decodes else set()
        missing = [r for r in running if r.prefilled == len(r.prompt) and id(r) not in decoded]
        expect(not missing, what=what, reread=SCHEDULER_SECTION,
               problem=f"{len(missing)} running request(s) with a complete prompt were left out of this step's "
                       f"decode, e.g. {missing[0] if missing else None!r}: every ready request gets one id per "
                       "step")  # fmt: skip
        partial = [r for r in running if 0 < r.prefilled < len(r.prompt)]
        expect(len(partial) <= 1, what=what, reread=SCHEDULER_SECTION,
               problem=f"{len(partial)} requests are half prefilled: finish the one already started before "
                       "admitting another")  # fmt: skip
        if fed < budget:
            expect(
                not partial,
                what=what,
                reread=SCHEDULER_SECTION,
                problem=f"only {fed} of the {budget} prefill ids were used, yet a prompt is left half done",
            )
            left_in_decode = [r for r in done if id(r) in decoded]  # rows freed only after the prefill
            expect(not waiting or len(running) + len(left_in_decode) >= max_batch, what=what,
                   reread=SCHEDULER_SECTION,
                   problem=f"only {fed} of the {budget} prefill ids were used while a request waits and a row is "
                           "free: admit it")  # fmt: skip
    expect(
        not running and not waiting,
        what=f"scheduler_step ({inputs})",
        reread=SCHEDULER_SECTION,
        problem="2000 steps did not finish every request: is a request never admitted or never finished?",
    )
    expect(model.admitted == [id(r) for r in requests], what=f"scheduler_step ({inputs})", reread=SCHEDULER_SECTION,
           problem="requests were admitted out of order: the oldest waiting request (the front of `waiting`) "
                   "goes first")  # fmt: skip
    expect(
        sorted(model.released) == sorted(id(r) for r in requests),
        what=f"scheduler_step ({inputs})",
        reread=SCHEDULER_SECTION,
        problem="every finished request must be released (its KV memory freed)",
    )
    return requests


def test_scheduler_step(course):
    """A continuous-batching scheduler step"""
    specs = [([(7 * i + j) % 50 + 1 for j in range(1 + (5 * i) % 17)], 2 + (3 * i) % 9) for i in range(14)]
    for max_batch, budget in ((3, 5), (8, 64), (1, 1)):
        requests = run_scheduler(course, specs, max_batch, budget)
        for (prompt, n), r in zip(specs, requests, strict=True):
            expect_equal(r.output, alone(prompt, n), what=f"the output of the request with prompt {prompt} "
                         f"(max_batch={max_batch}, prefill_budget={budget})", reread=SCHEDULER_SECTION,
                         inputs="each request's output must be what it gets alone")  # fmt: skip
