"""Chapter 12 solutions: the wire format, the reasoning split, tool calls and a client, written out in plain
Python (tinyqwen/serve/ is the library's server side, which works on ids and also handles stop strings)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


def parse_sse(text: str) -> list:
    events: list = []
    data: list[str] | None = None  # the data lines of the event being read; None: no data line yet
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":  # a blank line ends an event (one without data lines is no event)
            if data is not None:
                joined = "\n".join(data)
                events.append(joined if joined == "[DONE]" else json.loads(joined))
            data = None
        elif line.startswith("data:"):
            value = line[5:]
            data = [
                *(data or []),
                value[1:] if value.startswith(" ") else value,
            ]  # ONE space dropped, no more
        # ": ping" comments and other fields ("event:", "id:") carry no data
    return events  # text after the last blank line is an unfinished event: dropped


def split_deltas(pieces: Sequence[str], final: bool = True) -> list[tuple[str, str]]:
    # per part: has a non-newline arrived yet, and the newlines held back (they may be the part's last characters)
    started = {"reasoning_content": False, "content": False}
    held = {"reasoning_content": "", "content": ""}
    out: list[tuple[str, str]] = []

    def send(part: str, text: str) -> None:
        if not started[part]:
            text = text.lstrip("\n")  # newlines at the start of a part are stripped
            started[part] = bool(text)
        text = held[part] + text
        body = text.rstrip("\n")
        held[part] = text[len(body) :]  # released only when something that is not a newline follows
        if body:
            out.append((part, body))

    part = "content"
    for piece in pieces:
        if piece == "<think>" and part == "content":
            part = "reasoning_content"
        elif piece == "</think>" and part == "reasoning_content":
            held[part] = ""  # the end of the reasoning: its trailing newlines are stripped
            part = "content"  # a later "</think>" is plain text of the answer
        elif piece not in END_OF_TURN:
            send(part, piece)
    return out  # with final=True the held newlines are trailing ones: stripped, never sent


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(content: str) -> tuple[str, list[dict]]:
    calls = []
    for i, body in enumerate(_TOOL_CALL.findall(content)):
        call = json.loads(body.strip())
        arguments = (
            call["arguments"]
            if isinstance(call["arguments"], str)
            else json.dumps(call["arguments"], ensure_ascii=False)
        )
        # OpenAI's format: the arguments travel as a JSON *string*
        calls.append(
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
    return _TOOL_CALL.sub("", content).strip("\n"), calls


def assemble(chunks: Sequence[dict]) -> tuple[dict, str | None]:
    content, reasoning, calls, finish = "", None, {}, None
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            if delta.get("reasoning_content"):
                reasoning = (reasoning or "") + delta["reasoning_content"]
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"id": None, "type": "function",
                                                         "function": {"name": "", "arguments": ""}})  # fmt: skip
                call["id"] = piece.get("id") or call["id"]
                call["type"] = piece.get("type") or call["type"]
                function = piece.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    tool_calls = [calls[i] for i in sorted(calls)] or None
    message = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": tool_calls,
    }
    return message, finish


def follow_up(messages: Sequence[dict], reply: dict, tools: dict[str, Callable]) -> list[dict]:
    out = [
        *messages,
        {"role": "assistant", "content": reply.get("content") or "", "tool_calls": reply["tool_calls"]},
    ]
    for call in reply["tool_calls"]:
        function = call["function"]
        result = tools[function["name"]](**json.loads(function["arguments"]))
        out.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
    return out


# the scheduler: tinyqwen.serve.engine.Engine.step does these three things with the real model and its KV pool;
# written here against the exercise's stand-in model, in the same order
class Request:
    """The exercise's request (the same plain data as in exercises/ch12_serving.py)."""

    def __init__(self, prompt: list[int], max_tokens: int):
        self.prompt, self.max_tokens = list(prompt), max_tokens
        self.prefilled, self.output = 0, []

    def __repr__(self) -> str:
        return f"Request(prompt={self.prompt}, prefilled={self.prefilled}, output={self.output})"


def scheduler_step(model, running: list, waiting: list, max_batch: int, prefill_budget: int) -> list:
    finished: list = []

    def finish_if_done(request) -> bool:
        if request.output and (request.output[-1] in model.eos or len(request.output) >= request.max_tokens):
            running.remove(request)
            model.release(request)
            finished.append(request)
            return True
        return False

    budget = prefill_budget
    while budget > 0:
        pending = [r for r in running if r.prefilled < len(r.prompt)]
        if pending:
            request = pending[0]
        elif waiting and len(running) < max_batch:
            request = waiting.pop(0)
            running.append(request)
        else:
            break
        take = min(budget, len(request.prompt) - request.prefilled)
        first = model.prefill(request, request.prompt[request.prefilled : request.prefilled + take])
        request.prefilled += take
        budget -= take
        if first is not None:
            request.output.append(first)
            finish_if_done(request)
    ready = [r for r in running if r.prefilled == len(r.prompt)]
    if ready:
        for request, token in zip(ready, model.decode(ready, [r.output[-1] for r in ready]), strict=True):
            request.output.append(token)
        for request in ready:
            finish_if_done(request)
    return finished
