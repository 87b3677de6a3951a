"""Chapter 12 exercises: serving — the wire format, the reasoning split, tool calls, a client, and a scheduler.

Fill in each function, in order (notebooks/12-serving.ipynb builds them in the same order), then run
`pytest exercises/test_ch12_serving.py`. The last checkpoint points YOUR client code at tinyqwen's real server,
running a tiny Qwen3 checkpoint, and checks what comes back against transformers and the official chat template.

Write plain Python (the `json` module is all you need); do not import tinyqwen or openai here.
"""

from __future__ import annotations

import json  # noqa: F401  (you will want it)
from collections.abc import Callable, Sequence

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")  # Qwen3's eos tokens: they end a reply and are never text


def parse_sse(text: str) -> list:
    """The events of a server-sent-events body, each event's data JSON-decoded; the final "[DONE]" stays a string.

    The rules (the WHATWG "server-sent events" format, the part OpenAI's streams use):
    - Lines end with "\\n", "\\r\\n" or "\\r". A blank line ends an event.
    - A line "data: VALUE" (or "data:VALUE": ONE space after the colon is dropped, no more) adds VALUE to the
      event's data; several data lines in one event are joined with "\\n".
    - A line starting with ":" is a comment (servers send ": ping" to keep a connection open); other fields
      ("event:", "id:", "retry:") are not data. An event without data lines is not an event.
    - Each event's data is JSON, except the last one of an OpenAI stream: the text "[DONE]".
    - Text after the last blank line is an unfinished event: drop it (the spec says so).

    >>> parse_sse('data: {"a": 1}\\n\\n: ping\\n\\ndata: [DONE]\\n\\n')
    [{'a': 1}, '[DONE]']
    """
    raise NotImplementedError


def split_deltas(pieces: Sequence[str], final: bool = True) -> list[tuple[str, str]]:
    """A Qwen3 reply as streamed deltas: ("reasoning_content", text) for the thinking, ("content", text) for the
    answer — the reasoning split of vLLM's qwen3 parser, done the way a streaming server must do it.

    `pieces` are the reply's tokens, each decoded on its own, e.g.
        ["<think>", "\\n", "Hmm", ".", "\\n", "</think>", "\\n\\n", "Hi", "!", "<|im_end|>"]
    - The piece "<think>" opens the reasoning; the FIRST "</think>" after it closes it (a server cannot wait to see
      whether a later one comes: a later "</think>" is just text of the answer). Pieces outside a think block are
      the answer. A reply cut off inside its think block is all reasoning.
    - The "<think>" and "</think>" that open and close the reasoning, and the END_OF_TURN pieces, are not text.
    - Each part is stripped of newlines ("\\n") at both ends, as the Qwen3 model card does.
    - Return one delta per piece that adds text (skip empty ones), in order, so that joining a field's deltas
      gives that part.
    - `final=False`: the reply is not over; more pieces may come. Then never send text that could still change:
      newlines at the end of a part may turn out to be its last characters (and so be stripped), so hold them back
      until a piece that is not a newline follows. What you return for a prefix of the pieces must be a prefix of
      what you return for all of them.

    >>> split_deltas(["<think>", "\\n", "Hmm", ".", "\\n", "</think>", "\\n\\n", "Hi", "!", "<|im_end|>"])
    [('reasoning_content', 'Hmm'), ('reasoning_content', '.'), ('content', 'Hi'), ('content', '!')]
    >>> split_deltas(["<think>", "\\n", "Hmm", "\\n"], final=False)  # the last newline may be the reasoning's end
    [('reasoning_content', 'Hmm')]
    """
    raise NotImplementedError


def parse_tool_calls(content: str) -> tuple[str, list[dict]]:
    """The answer with its `<tool_call>{json}</tool_call>` blocks taken out, and the calls in OpenAI's format.

    Each block holds {"name": ..., "arguments": {...}}. Return (the text outside the blocks, joined and stripped of
    newlines at both ends, [one dict per call, in order]) where a call is
        {"id": "call_0", "type": "function", "function": {"name": NAME, "arguments": ARGUMENTS AS A JSON STRING}}
    with ids "call_0", "call_1", ... OpenAI sends arguments as a JSON *string*, not an object.

    >>> parse_tool_calls('Let me check.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    ('Let me check.', [{'id': 'call_0', 'type': 'function', 'function': {'name': 'f', 'arguments': '{"x": 1}'}}])
    """
    raise NotImplementedError


def assemble(chunks: Sequence[dict]) -> tuple[dict, str | None]:
    """Put a streamed chat completion back together, as a client does: (message, finish_reason).

    `chunks` are the JSON events of a stream ("chat.completion.chunk" objects, without the final "[DONE]"). Each
    has "choices": [{"index": 0, "delta": {...}, "finish_reason": None or a string}] (a usage chunk at the end has
    "choices": []). A delta may hold "role", "content", "reasoning_content" and "tool_calls": a list of
    {"index": i, "id"?, "type"?, "function": {"name"?, "arguments"?}} where the call at index i is built up over
    chunks: the first piece brings its id, type and name; "arguments" strings are CONCATENATED.

    The message is {"role": "assistant", "content": str, "reasoning_content": str or None,
    "tool_calls": [{"id", "type", "function": {"name", "arguments"}}] or None}: content "" when there was none,
    reasoning_content None when there was none, tool_calls in index order.

    >>> assemble([{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    ...           {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
    ...           {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}])
    ({'role': 'assistant', 'content': 'Hi', 'reasoning_content': None, 'tool_calls': None}, 'stop')
    """
    raise NotImplementedError


def follow_up(messages: Sequence[dict], reply: dict, tools: dict[str, Callable]) -> list[dict]:
    """The conversation for the next request of a tool-call round trip.

    `reply` is the assistant message that asked for tools (as `assemble` returns it). Return a NEW list: the
    `messages`, then the assistant message {"role": "assistant", "content": reply's content (or ""),
    "tool_calls": reply's tool_calls}, then for each call, in order, the result of running it:
        {"role": "tool", "tool_call_id": the call's id, "content": json.dumps(tools[name](**arguments))}
    where arguments is the call's JSON string decoded. Do not change `messages`.

    >>> call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    >>> follow_up([], {"role": "assistant", "content": "", "tool_calls": [call]}, {"add": lambda a, b: a + b})[1]
    {'role': 'tool', 'tool_call_id': 'call_0', 'content': '3'}
    """
    raise NotImplementedError


class Request:
    """One request inside a continuous-batching scheduler (plain data; the scheduler changes `prefilled`, `output`).

    prompt      its prompt ids
    max_tokens  the most new ids it may get
    prefilled   how many prompt ids the model has seen so far (0 while it waits)
    output      the ids generated so far
    """

    def __init__(self, prompt: list[int], max_tokens: int):
        self.prompt, self.max_tokens = list(prompt), max_tokens
        self.prefilled, self.output = 0, []

    def __repr__(self) -> str:
        return f"Request(prompt={self.prompt}, prefilled={self.prefilled}, output={self.output})"


def scheduler_step(model, running: list, waiting: list, max_batch: int, prefill_budget: int) -> list:
    """ONE step of a continuous-batching scheduler (the section "Serving many users: continuous batching").
    Changes `running` and `waiting` in place; returns the requests that finished in this step, in the order they
    finished.

    The model (a stand-in: each method says what the real server's model call does):
    - `model.prefill(request, ids) -> int | None`: feed the next prompt ids of ONE request (they land in its KV
      row). Returns the request's first generated id when these ids complete its prompt, else None.
    - `model.decode(requests, ids) -> list[int]`: ONE batched decode for several requests at once: feeds each
      request its last generated id (`request.output[-1]`), returns each one's next id.
    - `model.release(request)`: frees the request's KV memory; call it the moment the request finishes.
    - `model.eos`: the set of end-of-reply ids.

    One step, in this order:
    1. Prefill, at most `prefill_budget` prompt ids in all. First the running request whose prompt is not complete
       (there is at most one, and it was admitted first), then the oldest waiting requests, in order: a waiting
       request is admitted (moved from the front of `waiting` to the end of `running`) only while fewer than
       `max_batch` requests are running. Each gets min(what is left of the budget, what is left of its prompt)
       ids in one `model.prefill` call (then add that count to its `prefilled`); stop when the budget is spent or
       no request can be admitted. A returned first id goes on the request's `output`.
    2. A request is finished when its last output id is in `model.eos` or it has `max_tokens` ids: take it out of
       `running`, `model.release` it, add it to the returned list. (Check right after its first id, too.)
    3. Decode: ONE `model.decode` call with every running request whose prompt is complete, in `running`'s order
       (the ones that just got their first id in step 1 included); append each returned id to its request's
       `output`, then apply rule 2 again. No call at all when no request is ready.

    >>> class Echo:  # writes back each request's prompt, reversed; 0 ends a reply
    ...     eos = {0}
    ...     def prefill(self, request, ids):
    ...         return request.prompt[-1] if request.prefilled + len(ids) == len(request.prompt) else None
    ...     def decode(self, requests, ids):
    ...         return [r.prompt[-1 - len(r.output)] for r in requests]
    ...     def release(self, request):
    ...         pass
    >>> running, waiting = [], [Request([0, 5, 6], 10), Request([7, 8], 10)]
    >>> scheduler_step(Echo(), running, waiting, max_batch=4, prefill_budget=4), running
    ([], [Request(prompt=[0, 5, 6], prefilled=3, output=[6, 5]), Request(prompt=[7, 8], prefilled=1, output=[])])
    """
    raise NotImplementedError
