"""The HTTP side (Starlette): three routes, the error handlers, and `serve`, which runs the app under uvicorn.

    GET  /v1/models             the one model, under the name clients send as `model`
    POST /v1/chat/completions   chat: template, reasoning split, tool calls
    POST /v1/completions        raw text in, raw text out (no template)
    GET  /health                200 while the engine's worker runs (503 when it has stopped)
    GET  /metrics               Prometheus text: requests, active sequences, queue, tokens/s, TTFT and ITL histograms

A route reads the body, hands it to the `Service` (checks, prompt, Job), submits the Job to the worker and then
either collects the worker's events into one JSON reply or streams them as SSE chunks. Every error is an
OpenAI-style JSON body `{"error": {"message", "type", "param", "code"}}`, never a traceback.

Needs the `serve` extra (Starlette, uvicorn); `tinyqwen.serve` imports this module only when asked for the app.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tinyqwen.errors import TinyQwenError
from tinyqwen.serve.engine import Job
from tinyqwen.serve.protocol import (
    MAX_BODY_BYTES,
    APIError,
    bad,
    check_body_size,
    check_content_type,
    check_prompt_size,
    longest_token_bytes,
)
from tinyqwen.serve.service import Prepared, Service
from tinyqwen.serve.sse import sse

# ------------------------------------------------------------------------------------------ the routes


async def list_models(request: Request) -> Response:
    return JSONResponse(service_of(request).models())


async def chat_completions(request: Request) -> Response:
    return await run(request, service_of(request).prepare_chat, chat=True)


async def completions(request: Request) -> Response:
    return await run(request, service_of(request).prepare_completion, chat=False)


async def health(request: Request) -> Response:
    engine = service_of(request).engine
    if engine.thread is not None and not engine.alive:
        return JSONResponse(
            {"status": "error", "message": "the engine's worker has stopped"}, status_code=503
        )
    return JSONResponse({"status": "ok", "active_sequences": engine.active, "queue_length": engine.queued})


async def metrics(request: Request) -> Response:
    engine = service_of(request).engine
    return PlainTextResponse(engine.metrics.text(engine.gauges()), media_type="text/plain; version=0.0.4")


def service_of(request: Request) -> Service:
    return request.app.state.service


async def run(request: Request, prepare: Callable[[Any], Prepared], chat: bool) -> Response:
    """Check and queue one request, then answer it whole or as a stream."""
    body = await read_json(request)

    def check_then_prepare(body: Any) -> Prepared:
        check_prompt_size(body, chat, service_of(request).context, token_bytes(request))  # before tokenizing
        return prepare(body)

    # checking and tokenizing in a thread: a long prompt must not hold up the other clients' streams
    prepared = await run_in_threadpool(check_then_prepare, body)
    job = prepared.job
    job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
    service_of(request).engine.submit(job)
    if prepared.stream:
        return CancellingStream(stream(service_of(request), prepared), job)
    return await collect(request, prepared)


async def read_json(request: Request) -> Any:
    """The body as JSON, after the cheap checks: its Content-Type (415) and its size (413, `app.state.max_body_bytes`,
    default `MAX_BODY_BYTES`), counted while it arrives so that an oversized body is never held whole."""
    check_content_type(request.headers.get("content-type"))
    limit = getattr(request.app.state, "max_body_bytes", MAX_BODY_BYTES)
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        check_body_size(int(declared), limit)
    data = bytearray()
    async for piece in request.stream():
        data += piece
        check_body_size(len(data), limit, partial=True)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None


def token_bytes(request: Request) -> int | None:
    """The tokenizer's longest token in bytes, worked out once per app (`check_prompt_size` needs it)."""
    state = request.app.state
    if not hasattr(state, "longest_token_bytes"):
        state.longest_token_bytes = longest_token_bytes(service_of(request).tokenizer)
    return state.longest_token_bytes


# ------------------------------------------------------------------------------------------ the two kinds of reply


async def collect(request: Request, p: Prepared) -> Response:
    """The non-streamed reply: wait for the worker's "done", watching for a client that hangs up meanwhile."""
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
                return JSONResponse(service_of(request).response(p, value))
    finally:
        p.job.cancelled.set()  # a no-op when done; stops the worker when the client went away


async def stream(service: Service, p: Prepared) -> AsyncIterator[str]:
    """The streamed reply: an SSE chunk per worker event (a role chunk first for chat), then `data: [DONE]`."""
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


class CancellingStream(StreamingResponse):
    """A streamed reply whose request is cancelled when the response ends for any reason (a disconnect)."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()


# ------------------------------------------------------------------------------------------ errors


def error_response(error: APIError) -> JSONResponse:
    # an Overloaded (429) error carries Retry-After
    return JSONResponse(error.body(), status_code=error.status, headers=getattr(error, "headers", None))


async def api_error(request: Request, error: APIError) -> Response:
    return error_response(error)


async def input_error(
    request: Request, error: TinyQwenError
) -> Response:  # e.g. the tokenizer refusing a prompt
    return error_response(bad(" ".join(str(error).split())))


async def http_error(request: Request, error: HTTPException) -> Response:
    return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"))


async def internal_error(request: Request, error: Exception) -> Response:
    return error_response(APIError(500, f"internal error ({type(error).__name__}); see the server's log"))


# ------------------------------------------------------------------------------------------ the app


@asynccontextmanager
async def lifespan(app: Starlette):
    """The worker thread lives as long as the server."""
    engine = app.state.service.engine
    engine.start()
    yield
    engine.stop()


def create_app(model, tokenizer, model_name: str = "tinyqwen", **engine_options) -> Starlette:
    """The ASGI app: run it with uvicorn (`tinyqwen serve`), or call it in-process (`tinyqwen.testing.asgi_call`).

    `app.state.service` is the Service (and `.engine`, the worker) behind it. `engine_options`: max_batch,
    kv_budget (bytes), prefill_chunk, max_queue (tinyqwen.serve.engine.Engine).
    """
    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={
            APIError: api_error,
            TinyQwenError: input_error,
            HTTPException: http_error,
            Exception: internal_error,
        },  # fmt: skip
        lifespan=lifespan,
    )
    app.state.service = Service(model, tokenizer, model_name, **engine_options)
    return app


def serve(
    model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
    **engine_options,
) -> None:  # fmt: skip
    """Run the server until Ctrl-C (uvicorn); says its batching limits first."""
    import sys

    import uvicorn

    app = create_app(model, tokenizer, model_name, **engine_options)
    print(f"tinyqwen serve: {app.state.service.engine.describe()}", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
