"""The worker: one thread runs the model, requests wait in a FIFO queue, one request at a time.

Outputs cannot interleave, and each reply's ids equal `tinyqwen.generate` on the same prompt and settings. A
client that disconnects cancels its request: the worker checks before every new token and stops.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from tinyqwen.errors import TinyQwenError
from tinyqwen.generation import stream_generate
from tinyqwen.serve.protocol import APIError
from tinyqwen.serve.reply_parser import ReplyParser


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
