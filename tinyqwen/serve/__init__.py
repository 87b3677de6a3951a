"""Serving: an OpenAI-compatible HTTP endpoint, the way vLLM and SGLang serve Qwen3.

    tinyqwen serve --model ./Qwen3-0.6B --port 8000        # then point any OpenAI client at http://127.0.0.1:8000/v1

    client ──HTTP──► Starlette app ──► request checked, prompt rendered (chat template, injection-safe) ──┐
      ▲                                                                                                    │
      │ JSON, or SSE "data: {...}\\n\\n" chunks     one worker thread: a continuous-batching scheduler ◄┘
      └── ReplyParser: thinking → reasoning_content, answer → content, <tool_call> → tool_calls ◄── generate

Three endpoints: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` (raw text, no template).
What a Qwen3 server adds to a plain text server is the *reasoning split* (vLLM's `--reasoning-parser qwen3`): the
text the model writes as its thinking, up to `</think>` (or a tool call), goes to `message.reasoning_content` (when
streaming, `delta.reasoning_content`), the rest to `message.content`; and the *tool-call parser*: `<tool_call>` blocks,
Qwen3's JSON or Qwen3.5's `<function=...>` form, become OpenAI `tool_calls` with `finish_reason: "tool_calls"`.

The package, one module per concept (read them in this order):

    protocol.py      the OpenAI request shapes and their checks; APIError, OpenAI's JSON error body
    sse.py           server-sent events: writing and reading `data: ...` frames
    reply_parser.py  the reasoning split and the tool-call parser, token by token
    kv_pool.py       KV memory: one row per running sequence, from a budget, freed the moment a sequence ends
    engine.py        the worker thread: the scheduler (chunked prefill, one batched decode step for all)
    mixed_forward.py a step's prefill chunk and decode rows in one forward (vLLM's chunked prefill)
    metrics.py       counters and histograms for GET /metrics (Prometheus text format)
    service.py       JSON body -> Job, finished Job -> JSON reply or stream chunks (no HTTP)
    app.py           the Starlette routes and error handlers, and `serve` (uvicorn); needs the `serve` extra

Test doubles for all of this (a scripted model, an in-process ASGI client) are in `tinyqwen.testing`.

Decisions (each one what a client of vLLM would expect, unless it says otherwise):
- Continuous batching: one worker thread runs every request in flight, one batched decode step for all of them
  (each at its own position, with its own KV row, sampling settings, seed and stops); queued prompts are
  prefilled `--prefill-chunk` tokens per step. Each reply's ids equal `tinyqwen.generate` on the same prompt and
  settings (greedy; sampled with a seed, up to the float32 rounding of batched products).
- KV memory is a fixed budget (`--kv-budget`) of `--max-batch` rows; requests wait when every row is taken, and
  past `--max-queue` waiting requests get 429 with Retry-After. A request may use at most the row's length
  (prompt + reply; `max_tokens` is cut to fit) — vLLM's paged memory has no such per-request limit.
  `--kv-dtype bfloat16` stores it in half the bytes (vLLM's `--kv-cache-dtype`, llama-server's `-ctk`/`-ctv`):
  twice the positions in the budget; the default float32 is exact, as the library's default cache.
- A client that disconnects cancels its request: the scheduler drops it at the next step and frees its row.
- `GET /health`, and `GET /metrics` in Prometheus' text format.
- Sampling: unset knobs take Qwen's preset for the turn's mode (thinking: the checkpoint's generation_config.json;
  non-thinking, through `enable_thinking=False` or `/no_think`: T 0.7, top-p 0.8, top-k 20), as `tinyqwen chat`
  does; vLLM takes generation_config.json for both. `top_k=-1` means off (vLLM's spelling), as does 0.
- `max_tokens` defaults to what fits in the context; a prompt that leaves no room, or prompt + max_tokens over the
  context, is a 400 error, as in vLLM.
- Reasoning and answer are the text as generated (vLLM's rules, its test cases ported in the tests: with thinking
  on, a reply cut off before `</think>` is all reasoning; a part with no text is null); streamed deltas are the same
  text cut into pieces, so joining the deltas gives exactly the non-streamed message. The few deliberate
  differences are listed in reply_parser.py.
- Cheap checks first: a body that is not `application/json` is a 415, one over 16 MiB a 413, and a prompt whose
  length in bytes alone proves it cannot fit the context a 400 before it is tokenized; `n` must be 1.
- Stop strings end the reply when they appear in its reasoning or answer text; the stop string is not returned.
- Every error is an OpenAI-style JSON body `{"error": {"message", "type", "param", "code"}}`, never a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyqwen.errors import TinyQwenError
from tinyqwen.serve.engine import Engine, Job, JobRecord
from tinyqwen.serve.protocol import APIError
from tinyqwen.serve.reply_parser import ParsedReply, ReplyParser, _Channel  # noqa: F401 (chapter 12 reads _Channel)
from tinyqwen.serve.service import Prepared, Service
from tinyqwen.serve.sse import parse_sse, sse

if TYPE_CHECKING:
    from tinyqwen.serve.app import create_app, serve


def __getattr__(name: str):
    # the app needs Starlette (the `serve` extra); everything else here does not, so it is imported on first use
    if name in ("create_app", "serve"):
        from tinyqwen.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_serve_extra() -> None:
    """A clear error when the optional dependencies are missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TinyQwenError('tinyqwen serve needs Starlette and uvicorn: pip install -e ".[serve]"') from None


__all__ = ["APIError", "Engine", "Job", "JobRecord", "ParsedReply", "Prepared", "ReplyParser", "Service",
           "create_app", "parse_sse", "require_serve_extra", "serve", "sse"]  # fmt: skip
