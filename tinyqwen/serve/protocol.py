"""The OpenAI request shapes and their checks: what a body may hold, and the one-line 400 errors when it does not.

Every check raises `APIError`, which the app sends back as OpenAI's JSON error body
`{"error": {"message", "type", "param", "code"}}`. The names, ranges and defaults are vLLM's, so a client written
for vLLM gets the same answers (or the same refusals) here.

>>> check_fields({"model": "m", "n": 2}, CHAT_FIELDS)
Traceback (most recent call last):
    ...
tinyqwen.serve.protocol.APIError: only n=1 is supported, got n=2: tinyqwen serve returns one choice per request (send n requests, each with its own seed)

Some checks come before the body is even parsed, or before the prompt is tokenized, so that a bad request costs
milliseconds: `check_content_type` (415 for a body that does not say it is JSON), `check_body_size` (413 past
`MAX_BODY_BYTES`), and `check_prompt_size`, a lower bound on the prompt's token count from its length in bytes
(400 when even that bound does not fit the context).
"""

from __future__ import annotations

import json
import math
from typing import Any

from tinyqwen.errors import TinyQwenError
from tinyqwen.sampling import SamplingParams
from tinyqwen.tokenizer.pretokenize import nfc


class APIError(TinyQwenError):
    """An error to send back as OpenAI's JSON error body with an HTTP status.

    >>> APIError(404, "The model `x` does not exist.", code="model_not_found").body()["error"]["type"]
    'not_found_error'
    """

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
             500: "internal_server_error", 503: "service_unavailable"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


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
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad(f"only n=1 is supported, got n={json.dumps(n)}: tinyqwen serve returns one choice per request "
                  "(send n requests, each with its own seed)", "n")  # fmt: skip
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
    for i, tool in enumerate(tools):
        parameters = tool["function"].get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON Schema object, got "
                      f"{json.dumps(parameters)[:40]}", "tools")  # fmt: skip
        description = tool["function"].get("description")
        if description is not None and not isinstance(description, str):
            raise bad(f"tools[{i}].function.description must be a string", "tools")
    return tools or None


def enable_thinking(body: dict) -> bool:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
        raise bad("chat_template_kwargs may only hold 'enable_thinking'", "chat_template_kwargs")
    value = kwargs.get("enable_thinking", True)
    if not isinstance(value, bool):
        raise bad("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
    return value


def max_tokens(body: dict, prompt_len: int, context: int, default: int | None) -> int:
    """How many tokens to generate: the request's `max_completion_tokens` or `max_tokens`, else `default`, else
    what fits in the context. A prompt that leaves no room, or prompt + max_tokens over the context, is a 400."""
    room = context - prompt_len
    if room <= 0:
        raise bad(f"This model's maximum context length is {context} tokens. However, your prompt is "
                  f"{prompt_len} tokens, which leaves no room to generate.", "messages")  # fmt: skip
    asked = _number(body, "max_completion_tokens", low=1, integer=True)
    if asked is None:
        asked = _number(body, "max_tokens", low=1, integer=True)
    if asked is None:
        return room if default is None else min(default, room)
    if prompt_len + asked > context:
        raise bad(f"This model's maximum context length is {context} tokens. However, you requested "
                  f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion).",
                  "max_tokens")  # fmt: skip
    return asked


def reply_options(body: dict) -> tuple[bool, bool, bool]:
    """(stream, stream_options.include_usage, return_token_ids): how the reply is to be sent.

    As in vLLM, `stream_options` belongs to a streamed request only, and its flags are booleans.
    """
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False, _flag(body, "return_token_ids")
    if not isinstance(options, dict):
        raise bad(f"'stream_options' must be an object, got {json.dumps(options)[:40]}", "stream_options")
    if options and not stream:  # an empty object is let through, as vLLM lets it
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    for name in ("include_usage", "continuous_usage_stats"):
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise bad(f"'stream_options.{name}' must be true or false, got {json.dumps(value)[:40]}",
                      "stream_options")  # fmt: skip
    return stream, bool(options.get("include_usage")), _flag(body, "return_token_ids")


# ------------------------------------------------------------------------------------------ cheap checks first

MAX_BODY_BYTES = (
    16 * 2**20
)  # 16 MiB: a full 40,960-token context is at most 5.2 MB of text (128 bytes a token)
JSON_TYPES = ("application/json",)


def check_content_type(value: str | None) -> None:
    """A 415 unless the body says it is JSON: `application/json` or a `+json` type (a missing header is taken
    as JSON, as FastAPI does). A JSON body sent as `text/plain` is refused, as vLLM refuses it.

    >>> check_content_type("application/json; charset=utf-8"), check_content_type(None)
    (None, None)
    >>> check_content_type("text/plain")
    Traceback (most recent call last):
        ...
    tinyqwen.serve.protocol.APIError: Content-Type must be application/json, got 'text/plain'
    """
    if value is None or not value.strip():
        return
    kind = value.split(";")[0].strip().lower()
    if kind not in JSON_TYPES and not kind.endswith("+json"):
        raise APIError(
            415, f"Content-Type must be application/json, got {value!r}", code="unsupported_media_type"
        )


def check_body_size(size: int, limit: int, partial: bool = False) -> None:
    """A 413 for a body over `limit` bytes: from its Content-Length, or counted while it arrives (`partial`).

    >>> check_body_size(20_000, 10_000)
    Traceback (most recent call last):
        ...
    tinyqwen.serve.protocol.APIError: the request body is 20,000 bytes, over this server's limit of 10,000 bytes
    """
    if size > limit:
        got = f"at least {size:,}" if partial else f"{size:,}"
        raise APIError(413, f"the request body is {got} bytes, over this server's limit of {limit:,} bytes",
                       code="request_too_large")  # fmt: skip


def longest_token_bytes(tokenizer) -> int | None:
    """The most bytes any one token stands for (128 for Qwen3's vocabulary: a run of spaces); None if unknown.

    A prompt of B bytes (after NFC, which the tokenizer applies first) is at least ceil(B / this) tokens: byte-level
    BPE covers the text's bytes exactly, each token at most this many.
    """
    table = getattr(tokenizer, "_id_bytes", None)  # tinyqwen's Tokenizer keeps every token's bytes: ~5 ms
    if table is not None:
        return max(map(len, table))
    token_bytes = getattr(tokenizer, "_token_bytes", None)
    if token_bytes is None:
        return None
    return max(len(token_bytes(i, False)) for i in range(len(tokenizer)))


def prompt_texts(body: Any, chat: bool) -> list[str]:
    """The texts that go into the prompt whole: user, system and tool messages (an assistant's earlier turns may
    lose their thinking in the template), or the completion prompt. Malformed bodies give [] (checked later)."""
    if not isinstance(body, dict):
        return []
    if not chat:
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        return [prompt] if isinstance(prompt, str) else []
    texts = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict) or message.get("role") not in (
            "user",
            "system",
            "developer",
            "tool",
        ):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return texts


def check_prompt_size(body: Any, chat: bool, context: int, token_bytes: int | None) -> None:
    """Refuse a prompt that cannot fit the context, before tokenizing it: a lower bound on its token count from
    its UTF-8 length (`longest_token_bytes`). Costs a pass over the text, where tokenizing a 1 MB one-word message
    would take many seconds. Prompts the bound lets through are measured exactly after tokenizing (`max_tokens`).

    >>> check_prompt_size({"prompt": "a" * 1000}, False, context=8, token_bytes=128)
    Traceback (most recent call last):
        ...
    tinyqwen.serve.protocol.APIError: This model's maximum context length is 8 tokens. However, your prompt holds 1,000 bytes of text, which is at least 8 tokens (a token is at most 128 bytes), leaving no room to generate.
    """
    if not token_bytes:
        return
    size = sum(len(nfc(text).encode("utf-8", "surrogatepass")) for text in prompt_texts(body, chat))
    least = math.ceil(size / token_bytes)
    if least >= context:
        raise bad(f"This model's maximum context length is {context} tokens. However, your prompt holds {size:,} "
                  f"bytes of text, which is at least {least:,} tokens (a token is at most {token_bytes} bytes), "
                  "leaving no room to generate.", "messages" if chat else "prompt")  # fmt: skip
