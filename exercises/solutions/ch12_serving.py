"""Chapter 12 solutions: thin adapters over tinyqwen's own code (solutions mode grades tinyqwen itself).

The server side (`split_deltas`, `parse_tool_calls`) runs tinyqwen.serve's ReplyParser on the pieces; the client
side (`parse_sse`, `assemble`, `follow_up`) is what tinyqwen's notebook and tests do as a client, written once here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from tinyqwen import serve
from tinyqwen.chat_parsing import parse_tool_calls as _parse_tool_calls
from tinyqwen.serve import _Channel

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


def parse_sse(text: str) -> list:
    return serve.parse_sse(text)


def split_deltas(pieces: Sequence[str], final: bool = True) -> list[tuple[str, str]]:
    # tinyqwen.serve.ReplyParser works on ids; on decoded pieces its two channels do the same job
    channels = {"reasoning_content": _Channel(strip=True), "content": _Channel(strip=True)}
    mode, out = "content", []
    for piece in pieces:
        if piece == "<think>" and mode == "content":
            mode = "reasoning_content"
        elif piece == "</think>" and mode == "reasoning_content":
            out += [(mode, t) for t in [channels[mode].close()] if t]
            mode = "content"
        elif piece not in END_OF_TURN:
            out += [(mode, t) for t in [channels[mode].push(piece)] if t]
    if final:
        out += [(m, t) for m in ("reasoning_content", "content") for t in [channels[m].close()] if t]
    return out


def parse_tool_calls(content: str) -> tuple[str, list[dict]]:
    rest, calls = _parse_tool_calls(content)
    return rest, [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for i, c in enumerate(calls)
    ]  # fmt: skip


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
