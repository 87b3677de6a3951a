"""Serving: an OpenAI-compatible HTTP endpoint, the way vLLM and SGLang serve Qwen3.

    tinyqwen serve --model ./Qwen3-0.6B --port 8000        # then point any OpenAI client at http://127.0.0.1:8000/v1

    client ──HTTP──► Starlette app ──► request checked, prompt rendered (chat template, injection-safe) ──┐
      ▲                                                                                                    │
      │ JSON, or SSE "data: {...}\\n\\n" chunks                    one worker thread, one request at a time ◄┘
      └── ReplyParser: thinking → reasoning_content, answer → content, <tool_call> → tool_calls ◄── generate

Three endpoints: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` (raw text, no template).
What a Qwen3 server adds to a plain text server is the *reasoning split* (vLLM's `--reasoning-parser qwen3`): the
text the model writes between `<think>` and `</think>` goes to `message.reasoning_content` (when streaming,
`delta.reasoning_content`), the rest to `message.content`; and the *tool-call parser*: `<tool_call>{json}</tool_call>`
blocks become OpenAI `tool_calls` with `finish_reason: "tool_calls"`.

Decisions (each one what a client of vLLM would expect, unless it says otherwise):
- One request at a time: a single worker thread runs the NumPy model, requests wait in a FIFO queue. Outputs
  cannot interleave, and each reply's ids equal `tinyqwen.generate` on the same prompt and settings.
- A client that disconnects cancels its request: the worker checks before every new token and stops.
- Sampling: unset knobs take Qwen's preset for the turn's mode (thinking: the checkpoint's generation_config.json;
  non-thinking, through `enable_thinking=False` or `/no_think`: T 0.7, top-p 0.8, top-k 20), as `tinyqwen chat`
  does; vLLM takes generation_config.json for both. `top_k=-1` means off (vLLM's spelling), as does 0.
- `max_tokens` defaults to what fits in the context; a prompt that leaves no room, or prompt + max_tokens over the
  context, is a 400 error, as in vLLM.
- Reasoning and answer are each stripped of newlines at both ends (Qwen's model card `.strip("\\n")`); streamed
  deltas are the same text cut into pieces, so joining the deltas gives exactly the non-streamed message.
- Stop strings end the reply when they appear in its reasoning or answer text; the stop string is not returned.
- Every error is an OpenAI-style JSON body `{"error": {"message", "type", "param", "code"}}`, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tinyqwen.errors import TinyQwenError, ToolCallParseError
from tinyqwen.sampling import NON_THINKING, THINKING, SamplingParams
from tinyqwen.thinking import _last_open, thinking_mode

# ------------------------------------------------------------------------------------------ errors


class APIError(TinyQwenError):
    """An error to send back as OpenAI's JSON error body with an HTTP status.

    >>> APIError(404, "The model `x` does not exist.", code="model_not_found").body()["error"]["type"]
    'not_found_error'
    """

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             422: "invalid_request_error", 500: "internal_server_error", 503: "service_unavailable"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# ------------------------------------------------------------------------------------------ server-sent events


def sse(data: dict | str) -> str:
    """One server-sent event: a `data:` line and a blank line. The OpenAI stream ends with `data: [DONE]`.

    >>> sse({"a": 1}), sse("[DONE]")
    ('data: {"a": 1}\\n\\n', 'data: [DONE]\\n\\n')
    """
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def parse_sse(text: str) -> list[dict | str]:
    """The events of an SSE body: each event's data, JSON-decoded, and the final "[DONE]" as a string.

    The WHATWG rules a client follows: lines end with \\n, \\r\\n or \\r; a blank line ends an event; "data:"
    lines (one space after the colon dropped) are joined with newlines; ":" starts a comment; other fields are
    not data; an event still open when the text ends is dropped.

    >>> parse_sse('data: {"a": 1}\\n\\n: ping\\n\\ndata:[DONE]\\n\\n')
    [{'a': 1}, '[DONE]']
    """
    events: list[dict | str] = []
    data: list[str] | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if data is not None:
                joined = "\n".join(data)
                events.append(joined if joined == "[DONE]" else json.loads(joined))
            data = None
        elif line.startswith("data:"):
            value = line[5:]
            data = [*(data or []), value[1:] if value.startswith(" ") else value]
    return events


# ------------------------------------------------------------------------------------------ reading the reply


class _Channel:
    """One part of the reply (reasoning or answer) on its way out: stop strings, then newline trimming.

    Text that might be the start of a stop string, and newlines that might be the last characters of the part,
    are held back until the next piece shows what they are. `push` returns what can be sent now.

    >>> c = _Channel(stops=["END"], strip=True)
    >>> [c.push(t) for t in ["\\nHel", "lo\\n", "EN", "D more"]], c.stopped, c.close()
    (['Hel', 'lo', '', ''], True, '')
    """

    def __init__(self, stops: Sequence[str] = (), strip: bool = False):
        self.stops, self.strip = [s for s in stops if s], strip
        self.text, self.sent = "", 0  # everything received; how much of it has passed the stop check
        self.started, self.held = not strip, ""  # newline trimming: seen a non-newline yet; newlines held
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self.text) - self._partial_stop()
        ready, self.sent = self.text[self.sent : end], max(self.sent, end)
        return self._trim(ready)

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that a stop string starts with (it may still complete)."""
        for n in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def _trim(self, text: str) -> str:
        if not self.strip:
            return text
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        text = self.held + text
        body = text.rstrip("\n")
        self.held = text[len(body) :]
        return body

    def close(self) -> str:
        """End of the part: release held-back text that never became a stop string; trailing newlines go."""
        rest = "" if self.stopped else self._trim(self.text[self.sent :])
        self.sent, self.held = len(self.text), ""
        return rest


@dataclass
class ParsedReply:
    """What a finished reply amounts to (the non-streamed message is built from it)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    stopped_by: str | None = None  # "eos", "stop" (a stop string), or None (ran out of max_tokens)


class ReplyParser:
    """Turns generated ids, one at a time, into deltas: ("reasoning", text), ("content", text); at the end the
    tool calls. vLLM's qwen3 reasoning parser and hermes tool parser, folded into one small state machine:

        content ──<think>──► reasoning ──</think>──► content ──<tool_call>──► tool (held until the end)

    The same parser serves the streamed and the non-streamed reply, so the two always agree.

    >>> from tinyqwen.tokenizer import Tokenizer
    >>> tok = Tokenizer.qwen3()
    >>> p = ReplyParser(tok, eos_ids=[151645])
    >>> ids = tok.encode("<think>\\nHmm.\\n</think>\\n\\nHi!<|im_end|>", allowed_special="all")
    >>> [d for t in ids for d in p.push(t)] + p.finish()  # one delta per token that adds text
    [('reasoning', 'Hmm'), ('reasoning', '.'), ('content', 'Hi'), ('content', '!')]
    >>> p.reply.reasoning, p.reply.content, p.reply.stopped_by
    ('Hmm.', 'Hi!', 'eos')
    """

    def __init__(
        self,
        tokenizer,
        eos_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        tools: bool = False,
        reasoning: bool = True,
        prompt_ids: Sequence[int] = (),
    ):
        self.tokenizer, self.eos = tokenizer, set(eos_ids)
        ids = tokenizer.token_to_id
        self.think, self.end_think = (ids("<think>"), ids("</think>")) if reasoning else (None, None)
        self.tool_open = ids("<tool_call>") if tools else None
        self.stops, self.strip = list(stops), reasoning
        self.mode = "reasoning" if reasoning and _last_open(prompt_ids) else "content"
        self.channels = {name: _Channel(self.stops, self.strip) for name in ("reasoning", "content")}
        self.decoder = tokenizer.stream_decoder()
        self.tool_text = ""
        self.reply = ParsedReply()

    @property
    def stopped(self) -> bool:
        """The reply is over: an eos id or a stop string was seen."""
        return self.reply.stopped_by is not None

    def push(self, token: int) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        if token in self.eos:
            self.reply.stopped_by = "eos"
            return []
        if token == self.think and self.mode == "content":
            return self._switch("reasoning")
        if token == self.end_think and self.mode == "reasoning":
            return self._switch("content")
        if token == self.tool_open and self.mode == "content":
            out = self._switch("tool")
            self.tool_text = "<tool_call>"
            return out
        return self._text(self.decoder.push(token))

    def _text(self, text: str) -> list[tuple[str, str]]:
        if self.mode == "tool":
            self.tool_text += text
            return []
        channel = self.channels[self.mode]
        piece = channel.push(text)
        if channel.stopped:
            self.reply.stopped_by = "stop"
        return self._record(self.mode, piece)

    def _switch(self, mode: str) -> list[tuple[str, str]]:
        out = self._text(self.decoder.flush())
        if self.mode == "reasoning":  # a part ends: its held-back newlines are dropped
            out += self._record("reasoning", self.channels["reasoning"].close())
        self.mode = mode
        return out

    def _record(self, name: str, text: str) -> list[tuple[str, str]]:
        if not text:
            return []
        setattr(self.reply, name, getattr(self.reply, name) + text)
        return [(name, text)]

    def finish(self) -> list[tuple[str, str]]:
        """End of generation: flush what was held back, parse the tool calls."""
        out = self._text(self.decoder.flush()) if not self.stopped or self.mode == "tool" else []
        if self.mode == "tool":
            out += self._tool_calls()
        for name in ("reasoning", "content"):
            out += self._record(name, self.channels[name].close())
        return out

    def _tool_calls(self) -> list[tuple[str, str]]:
        from tinyqwen.chat_parsing import parse_tool_calls

        try:
            rest, calls = parse_tool_calls(self.tool_text)
        except ToolCallParseError:  # a malformed or cut-off call: the client gets the text as it is
            return self._record("content", self.channels["content"].push(self.tool_text))
        for call in calls:
            self.reply.tool_calls.append({
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
            })  # fmt: skip
        return self._record("content", self.channels["content"].push(rest))


# ------------------------------------------------------------------------------------------ the worker


@dataclass
class Job:
    """One request on its way through the worker. Events go back to the request's event loop:
    ("deltas", [(kind, text), ...]), then ("done", ParsedReply) or ("error", APIError)."""

    prompt_ids: list[int]
    max_tokens: int
    generate_kwargs: dict
    parser: ReplyParser
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    submitted: float = 0.0  # time.perf_counter() when it joined the queue

    def send(self, event: tuple) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()


@dataclass
class JobRecord:
    """What the worker did for a request (kept for tests and the load benchmark)."""

    id: str
    prompt_tokens: int
    completion_tokens: int
    cancelled: bool
    submitted: float  # time.perf_counter(): joined the queue, left it, finished
    started: float
    finished: float


class Engine:
    """The model behind a FIFO queue, run by one worker thread: one request at a time, never interleaved.

    NumPy releases the GIL inside its matrix products, so the event loop keeps answering HTTP while the worker
    computes. `records` keeps the last 10,000 finished requests.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.records: deque[JobRecord] = deque(maxlen=10_000)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="tinyqwen-engine", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join(timeout=30)
            self.thread = None

    def submit(self, job: Job) -> None:
        self.start()
        job.submitted = time.perf_counter()
        self.jobs.put(job)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """Generate one reply, sending its deltas as they come; stop early on cancel or a stop string."""
        from tinyqwen.generation import stream_generate

        started = time.perf_counter()
        try:
            if not job.cancelled.is_set():
                stream = stream_generate(self.model, job.prompt_ids, job.max_tokens, **job.generate_kwargs)
                for token in stream:
                    if job.cancelled.is_set():
                        break
                    job.output_ids.append(token)
                    deltas = job.parser.push(token)
                    if deltas:
                        job.send(("deltas", deltas))
                    if job.parser.stopped:
                        break
                stream.close()
            deltas = job.parser.finish()
            if deltas:
                job.send(("deltas", deltas))
            job.send(("done", job.parser.reply))
        except TinyQwenError as error:
            job.send(("error", APIError(400, " ".join(str(error).split()))))
        except Exception as error:  # a bug: say what kind, keep serving, never send a traceback
            job.send(("error", APIError(500, f"internal error while generating ({type(error).__name__})")))
        finally:
            self.records.append(JobRecord(job.id, len(job.prompt_ids), len(job.output_ids), job.cancelled.is_set(),
                                          job.submitted or started, started, time.perf_counter()))  # fmt: skip


# ------------------------------------------------------------------------------------------ checking requests

CHAT_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "n", "tools",
    "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "return_token_ids", "user", "logprobs",
    "top_logprobs", "logit_bias", "response_format", "store", "metadata", "skip_special_tokens",
}  # fmt: skip
COMPLETION_FIELDS = {
    "model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "n", "return_token_ids", "user",
    "logprobs", "logit_bias", "echo", "suffix", "best_of",
}  # fmt: skip


def _number(body: dict, name: str, low: float | None = None, high: float | None = None, integer=False):
    """body[name] checked to be a number in [low, high] (None when absent or null)."""
    value = body.get(name)
    if value is None:
        return None
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"'{name}' must be {kind}, got {json.dumps(value)}", name)
    if value != value or value in (float("inf"), float("-inf")):
        raise bad(f"'{name}' must be finite", name)
    if (low is not None and value < low) or (high is not None and value > high):
        where = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise bad(f"'{name}' must be {where}, got {value}", name)
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def check_fields(body: Any, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    if body.get("n") not in (None, 1):
        raise bad("only n=1 is supported", "n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs are not supported by tinyqwen serve", "logprobs")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported by tinyqwen serve", "logit_bias")
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise bad("echo, suffix and best_of are not supported by tinyqwen serve")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad("response_format other than {'type': 'text'} is not supported", "response_format")
    return body


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    return stops


def sampling_settings(body: dict, base: SamplingParams) -> tuple[SamplingParams, int | None]:
    """The request's sampling knobs on top of `base` (the mode's preset), and its seed. vLLM's names and ranges."""
    top_k = _number(body, "top_k", low=-1, integer=True)
    changes = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "top_k": 0 if top_k == -1 else top_k,
        "min_p": _number(body, "min_p", 0, 1),
        "presence_penalty": _number(body, "presence_penalty", -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2),
        "repetition_penalty": _number(body, "repetition_penalty", 0),
    }
    if changes["top_p"] == 0:
        raise bad("'top_p' must be in (0, 1], got 0", "top_p")
    if changes["repetition_penalty"] == 0:
        raise bad("'repetition_penalty' must be > 0, got 0", "repetition_penalty")
    seed = _number(body, "seed", low=0, integer=True)
    try:
        return base.override(**changes), seed
    except TinyQwenError as error:
        raise bad(str(error)) from None


def chat_messages(body: dict) -> list[dict]:
    """OpenAI's messages in the shape the chat template reads: text parts joined, `developer` as `system`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise bad(f"messages[{i}]: only text content parts are supported", "messages")
            message["content"] = "".join(p["text"] for p in content)
        out.append(message)
    return out


def chat_tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad("tool_choice must be 'auto' or 'none' (forced tool calls are not supported)", "tool_choice")
    if tools is None or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in tools
    ):  # fmt: skip
        raise bad("'tools' must be a list of {'type': 'function', 'function': {'name': ..., ...}}", "tools")
    return tools or None


def enable_thinking(body: dict) -> bool:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
        raise bad("chat_template_kwargs may only hold 'enable_thinking'", "chat_template_kwargs")
    value = kwargs.get("enable_thinking", True)
    if not isinstance(value, bool):
        raise bad("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
    return value


# ------------------------------------------------------------------------------------------ the service


@dataclass
class Prepared:
    """A checked request, ready for the worker."""

    job: Job
    stream: bool
    include_usage: bool
    return_token_ids: bool
    chat: bool


class Service:
    """Everything between a JSON body and a Job, and between a finished Job and the JSON reply; no HTTP here.

    `model_name` is what clients send as `model` (vLLM: the path given to --model, or --served-model-name).
    """

    def __init__(self, model, tokenizer, model_name: str):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.engine = Engine(model, tokenizer)
        self.context = model.config.max_position_embeddings
        self.generation_config = getattr(model, "generation_config", None) or {}
        eos = self.generation_config.get("eos_token_id", getattr(model.config, "eos_token_id", None))
        self.eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.created = int(time.time())

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tinyqwen",
                "max_model_len": self.context}  # fmt: skip
        return {"object": "list", "data": [card]}

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str):
            raise bad("'model' is required: the name from GET /v1/models", "model")
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def _max_tokens(self, body: dict, prompt_len: int, default: int | None) -> int:
        room = self.context - prompt_len
        if room <= 0:
            raise bad(f"This model's maximum context length is {self.context} tokens. However, your prompt is "
                      f"{prompt_len} tokens, which leaves no room to generate.", "messages")  # fmt: skip
        asked = _number(body, "max_completion_tokens", low=1, integer=True)
        if asked is None:
            asked = _number(body, "max_tokens", low=1, integer=True)
        if asked is None:
            return room if default is None else min(default, room)
        if prompt_len + asked > self.context:
            raise bad(f"This model's maximum context length is {self.context} tokens. However, you requested "
                      f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion).",
                      "max_tokens")  # fmt: skip
        return asked

    def _job(self, body, prompt_ids, params, seed, parser, max_tokens) -> Job:
        kwargs: dict = {"params": params, "temperature": params.temperature, "eos_token_ids": self.eos}
        if not params.greedy:
            kwargs["seed"] = seed
        return Job(prompt_ids, max_tokens, kwargs, parser)

    def prepare_chat(self, body: Any) -> Prepared:
        body = check_fields(body, CHAT_FIELDS)
        self._check_model(body)
        messages, tools, thinking_on = chat_messages(body), chat_tools(body), enable_thinking(body)
        try:
            prompt_ids = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=True,
                enable_thinking=thinking_on,
                return_dict=False,
            )  # sanitize_control_tokens=True: text in messages never becomes a control token
        except TinyQwenError as error:
            raise bad(" ".join(str(error).split()), "messages") from None
        thinking = thinking_mode(messages, thinking_on)
        base = (
            SamplingParams.from_generation_config(self.generation_config, base=THINKING)
            if thinking
            else NON_THINKING
        )
        params, seed = sampling_settings(body, base)
        stops = stop_strings(body)
        max_tokens = self._max_tokens(body, len(prompt_ids), None)
        parser = ReplyParser(self.tokenizer, self.eos, stops, tools=tools is not None, prompt_ids=prompt_ids)
        return self._prepared(body, self._job(body, prompt_ids, params, seed, parser, max_tokens), chat=True)

    def prepare_completion(self, body: Any) -> Prepared:
        body = check_fields(body, COMPLETION_FIELDS)
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            prompt_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt):  # fmt: skip
            bad_ids = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
            if bad_ids:
                raise bad(f"prompt id {bad_ids[0]} is outside the vocabulary", "prompt")
            prompt_ids = list(prompt)
        else:
            raise bad("'prompt' must be a non-empty string or list of token ids (one prompt)", "prompt")
        base = SamplingParams.from_generation_config(
            self.generation_config, base=SamplingParams(temperature=1.0)
        )
        params, seed = sampling_settings(body, base)
        stops = stop_strings(body)
        max_tokens = self._max_tokens(
            body, len(prompt_ids), 16
        )  # OpenAI's and vLLM's default for completions
        parser = ReplyParser(self.tokenizer, self.eos, stops, tools=False, reasoning=False)
        return self._prepared(body, self._job(body, prompt_ids, params, seed, parser, max_tokens), chat=False)

    def _prepared(self, body: dict, job: Job, chat: bool) -> Prepared:
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        return Prepared(job, _flag(body, "stream"), bool(options.get("include_usage")),
                        _flag(body, "return_token_ids"), chat)  # fmt: skip

    # ---- replies

    def usage(self, job: Job) -> dict:
        n, m = len(job.prompt_ids), len(job.output_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    @staticmethod
    def finish_reason(reply: ParsedReply) -> str:
        if reply.tool_calls:
            return "tool_calls"
        return "stop" if reply.stopped_by else "length"

    def response(self, p: Prepared, reply: ParsedReply) -> dict:
        job = p.job
        if p.chat:
            content = (
                (reply.content or None) if reply.tool_calls else reply.content
            )  # OpenAI: null beside calls
            message: dict = {"role": "assistant", "content": content}
            message["reasoning_content"] = reply.reasoning or None
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            choice: dict = {"index": 0, "message": message, "finish_reason": self.finish_reason(reply)}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": reply.content, "finish_reason": self.finish_reason(reply)}
            kind, prefix = "text_completion", "cmpl"
        choice["logprobs"] = None
        out = {"id": f"{prefix}-{job.id}", "object": kind, "created": int(time.time()), "model": self.model_name,
               "choices": [choice], "usage": self.usage(job)}  # fmt: skip
        if p.return_token_ids:
            choice["token_ids"] = list(job.output_ids)
            out["prompt_token_ids"] = list(job.prompt_ids)
        return out

    def chunk(
        self, p: Prepared, delta: dict | None = None, finish: str | None = None, text: str = ""
    ) -> dict:
        job = p.job
        if p.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            kind, prefix = "chat.completion.chunk", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind, prefix = "text_completion", "cmpl"
        if finish is not None and p.return_token_ids:
            choice["token_ids"] = list(job.output_ids)
        return {"id": f"{prefix}-{job.id}", "object": kind, "created": int(time.time()),
                "model": self.model_name, "choices": [choice]}  # fmt: skip

    def stream_events(self, p: Prepared, event: tuple) -> list[dict]:
        """The SSE chunks for one worker event."""
        kind, value = event
        if kind == "deltas":
            if p.chat:
                return [self.chunk(p, {("reasoning_content" if k == "reasoning" else "content"): t})
                        for k, t in value]  # fmt: skip
            return [self.chunk(p, text=t) for _, t in value]
        reply: ParsedReply = value
        out = []
        if p.chat and reply.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(reply.tool_calls)]
            out.append(self.chunk(p, {"tool_calls": calls}))
        out.append(self.chunk(p, {}, finish=self.finish_reason(reply)))
        if p.include_usage:
            last = self.chunk(p)
            last["choices"], last["usage"] = [], self.usage(p.job)
            out.append(last)
        return out


# ------------------------------------------------------------------------------------------ HTTP (Starlette)


def create_app(model, tokenizer, model_name: str = "tinyqwen"):
    """The ASGI app: run it with uvicorn (`tinyqwen serve`), or call it in-process (httpx.ASGITransport).

    `app.state.service` is the Service (and `.engine`, the worker) behind it.
    """
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    service = Service(model, tokenizer, model_name)

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def read_json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None

    class CancellingStream(StreamingResponse):
        """A streamed reply whose request is cancelled when the response ends for any reason (a disconnect)."""

        def __init__(self, content, job: Job):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancelled.set()

    async def run(request: Request, prepare: Callable[[Any], Prepared]):
        # checking and tokenizing in a thread: a long prompt must not hold up the other clients' streams
        prepared = await run_in_threadpool(prepare, await read_json(request))
        job = prepared.job
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        service.engine.submit(job)
        if prepared.stream:
            return CancellingStream(stream(prepared), job)
        return await collect(request, prepared)

    async def collect(request: Request, p: Prepared):
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(p.job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    kind = value = None
                # every ~0.25 s, whether deltas keep arriving or not: a generation that streams deltas into the
                # queue would otherwise never give the disconnect check a turn
                if kind is None or loop.time() - checked > 0.25:
                    checked = loop.time()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                if kind is None:
                    continue
                if kind == "error":
                    return error_response(value)
                if kind == "done":
                    return JSONResponse(service.response(p, value))
        finally:
            p.job.cancelled.set()  # a no-op when done; stops the worker when the client went away

    async def stream(p: Prepared):
        try:
            if p.chat:
                yield sse(service.chunk(p, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await p.job.events.get()
                if kind == "error":
                    yield sse(value.body())
                    break
                for chunk in service.stream_events(p, (kind, value)):
                    yield sse(chunk)
                if kind == "done":
                    break
            yield sse("[DONE]")
        finally:
            p.job.cancelled.set()

    async def models(request: Request):
        return JSONResponse(service.models())

    async def chat(request: Request):
        return await run(request, service.prepare_chat)

    async def completions(request: Request):
        return await run(request, service.prepare_completion)

    async def api_error(request: Request, error: APIError):
        return error_response(error)

    async def input_error(request: Request, error: TinyQwenError):  # e.g. the tokenizer refusing a prompt
        return error_response(bad(" ".join(str(error).split())))

    async def http_error(request: Request, error: HTTPException):
        return error_response(
            APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}")
        )

    async def internal_error(request: Request, error: Exception):
        return error_response(APIError(500, f"internal error ({type(error).__name__}); see the server's log"))

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        yield
        service.engine.stop()

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={
            APIError: api_error,
            TinyQwenError: input_error,
            HTTPException: http_error,
            Exception: internal_error,
        },  # fmt: skip
        lifespan=lifespan,
    )
    app.state.service = service
    return app


async def asgi_request(app, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
    """`asgi_call` for code that already runs in an event loop (several requests at once with asyncio.gather)."""
    done = asyncio.Event()
    sent = False
    status, headers, chunks = 0, {}, []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}  # fmt: skip
    await app(scope, receive, send)
    return status, headers, b"".join(chunks)


def asgi_call(app, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict, bytes]:
    """One HTTP request to an ASGI app, in-process, without a network: what uvicorn does for each request.

    An ASGI server calls `app(scope, receive, send)`: `scope` describes the request, `receive()` hands over the
    body, and the app calls `send()` with the status and headers, then the body in one or more pieces (one per SSE
    event when streaming). Returns (status, headers, body bytes).
    """
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return run_sync(asgi_request(app, method, path, data))


def run_sync(coroutine):
    """Run a coroutine to the end and return its result, also where an event loop already runs (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a fresh event loop in a thread of its own
        return pool.submit(asyncio.run, coroutine).result()


# ------------------------------------------------------------------------------------------ a scripted model


class ScriptedModel:
    """A real model whose choices are steered to a script: for tests, the benchmark and the chapter.

    A random fixture checkpoint writes gibberish, so it never thinks, calls a tool or stops on cue. This wrapper
    runs the real model (real prefill, real KV cache, real logits) and then adds `margin` to the logit of the id
    `script(prompt_ids, generated_ids)` names, or nothing when it returns None. Everything after the logits --
    sampling, the generation loop, the server, the parsers -- runs as it would for a real Qwen3 that wrote those
    ids. A margin of 1e4 makes the scripted id win under any temperature or filter (its probability is 1 in float64).

    Only one sequence at a time (batch 1), which is how the server runs it.
    """

    def __init__(self, model, script: Callable[[list[int], list[int]], int | None], margin: float = 1e4):
        self.model, self.script, self.margin = model, script, margin
        self.config, self.generation_config = model.config, getattr(model, "generation_config", {})
        self._prompt: list[int] = []
        self._seen: list[int] = []

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def forward(self, ids, *, cache=None, **kwargs):
        import numpy as np

        ids = np.asarray(ids)
        if ids.shape[0] != 1:
            raise TinyQwenError("ScriptedModel runs one sequence at a time")
        if cache is None or cache.length == 0:  # a new prefill: a new request
            self._prompt, self._seen = [], []
        fed = [int(t) for t in ids[0]]
        if cache is not None and cache.length > 0 and self._prompt:
            self._seen.extend(fed)  # decode steps feed back the generated ids
        else:
            self._prompt.extend(fed)
        out = self.model.forward(ids, cache=cache, **kwargs)
        wanted = self.script(list(self._prompt), list(self._seen))
        if wanted is not None:
            out.logits[0, -1, wanted] += self.margin
        return out


def scripted_reply(
    tokenizer, replies: Callable[[str], str | None]
) -> Callable[[list[int], list[int]], int | None]:
    """A script for ScriptedModel from text: `replies(prompt_text)` is the reply to write (special tokens such as
    `<think>`, `<tool_call>`, `<|im_end|>` allowed), or None to let the model write what it wants.

    >>> from tinyqwen.tokenizer import Tokenizer
    >>> tok = Tokenizer.qwen3()
    >>> script = scripted_reply(tok, lambda prompt: "Hi!<|im_end|>")
    >>> [script([1], tok.encode("Hi!")[:n]) for n in range(3)]
    [13048, 0, 151645]
    """
    cache: dict[str, list[int]] = {}

    def script(prompt_ids: list[int], generated: list[int]) -> int | None:
        key = ",".join(map(str, prompt_ids))
        if key not in cache:
            text = replies(tokenizer.decode(prompt_ids))
            cache.clear()
            cache[key] = [] if text is None else tokenizer.encode(text, allowed_special="all")
        ids = cache[key]
        return ids[len(generated)] if len(generated) < len(ids) else None

    return script


# ------------------------------------------------------------------------------------------ the command


def serve(
    model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
):
    """Run the server until Ctrl-C (uvicorn)."""
    import uvicorn

    app = create_app(model, tokenizer, model_name)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def require_serve_extra() -> None:
    """A clear error when the optional dependencies are missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TinyQwenError('tinyqwen serve needs Starlette and uvicorn: pip install -e ".[serve]"') from None


__all__ = ["APIError", "Engine", "asgi_call", "asgi_request", "run_sync", "ReplyParser", "ScriptedModel", "Service", "create_app", "parse_sse",
           "scripted_reply", "serve", "sse"]  # fmt: skip
