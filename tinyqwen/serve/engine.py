"""The engine: one worker thread runs a continuous-batching scheduler over every request in flight.

    every step:   1. drop what finished or was cancelled (its KV row is free at once)
                  2. prefill: queued requests, oldest first, up to `prefill_chunk` prompt tokens this step
                     (a long prompt is prefilled over several steps, so running streams keep flowing)
                  3. decode: ONE forward over all running sequences, each at its own position and KV length
                  4. sample each row with its own settings and seed, send its text, check its stops

With the model itself, 2 and 3 are one forward (vLLM's chunked prefill): the chunk and the decode rows share every
product (mixed_forward.py), and each prompt of the chunk is a group of its own (its KV row, `_grouped_step`): no
pads. A wrapper with only `forward` (the tests' scripted models) gets two passes and padded rounds (`_plan_round`).

A decode step reads every weight once whatever the batch (memory-bound: the weights are the bytes), so serving 16
streams costs little more per step than serving one. Requests wait in a FIFO queue while every KV row is taken
(`max_batch`, `kv_budget`; see kv_pool.py); past `max_queue` waiting requests, new ones get 429 with Retry-After.

Each sequence computes what it would alone: its own positions and KV row (tinyqwen.kv_cache.RaggedKVCache), its own
sampler (`sample`, its own generator seeded as `generate` seeds it): its logits differ from a lone run's only by
the float32 rounding of batched products (greedy ids the same on the test models). A client that disconnects
cancels its request: the worker checks every step and frees the row.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tinyqwen.errors import TinyQwenError
from tinyqwen.generation import _make_rows, _resolve_eos, _resolve_sampling  # one sequence's sampling setup
from tinyqwen.kv_cache import KV_DTYPE_ALIASES
from tinyqwen.model import Qwen3
from tinyqwen.sampling import sample
from tinyqwen.serve.kv_pool import KV_DTYPES, KVPool, default_kv_budget, default_max_batch, pool_shape
from tinyqwen.serve.metrics import Metrics
from tinyqwen.serve.mixed_forward import forward_groups
from tinyqwen.serve.protocol import APIError
from tinyqwen.serve.reply_parser import ReplyParser

# prompt tokens prefilled per step (a step's extra time for the running streams). Smaller chunks keep the streams
# flowing at a price on a compute-bound CPU: 128 cut a 16-client prompt-heavy burst's ITL p95 by 40 % for 11 % of
# its throughput (benchmarks/bench_scheduler.py), and throughput is what a burst of long prompts lacks. A bigger
# chunk buys no prefill throughput: with the grouped rounds (no pads) a prefill forward costs the same per prompt id
# from 128 to 768 ids (16.6-17.7 ms an id, Qwen3-0.6B-shaped, 2 threads, load 5), and a decode-heavy burst's 825
# prompt ids took 4 forwards at 256, 2 at 512: the same work, but the first prompts wait for the whole chunk
PREFILL_CHUNK = 256
MAX_QUEUE = 256  # requests waiting for a KV row before new ones get 429


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
    submitted: float  # time.perf_counter(): joined the queue, prefill began, finished
    started: float
    finished: float
    first_token: float = 0.0  # time.perf_counter() of the first token (0: none)


class Overloaded(APIError):
    """429: the queue is full. `headers` carries Retry-After (seconds), as vLLM and OpenAI send it."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(429, message, code="rate_limit_exceeded")
        self.headers = {"Retry-After": str(retry_after)}

    def body(self) -> dict:
        body = super().body()
        body["error"]["type"] = "rate_limit_error"
        return body


@dataclass
class Sequence:
    """A request inside the scheduler: its prompt, sampling state and KV row."""

    job: Job
    limit: int  # most new tokens (max_tokens, cut to the KV row)
    params: object  # SamplingParams
    rng: np.random.Generator | None
    eos: frozenset
    prefilled: int = 0  # prompt tokens already in the KV row
    row: int | None = None
    pending: int | None = None  # the last chosen id: fed at the next decode step
    started: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0

    @property
    def prompt(self) -> list[int]:
        return self.job.prompt_ids

    @property
    def output(self) -> list[int]:
        return self.job.output_ids


def _plain_greedy(params) -> bool:
    """Greedy with no penalty: `sample` is then the arg-max of the raw logits."""
    return (
        params.greedy
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
    )


class Engine:
    """The scheduler and its worker thread. `records` keeps the last 10,000 finished requests; `metrics` feeds
    `/metrics`. `max_batch`: most sequences decoded together; `kv_budget`: bytes of KV cache for them;
    `prefill_chunk`: prompt tokens prefilled per step; `max_queue`: requests that may wait; `kv_dtype`: the KV
    pool's storage (`KV_DTYPES`)."""

    def __init__(self, model, tokenizer, max_batch: int | None = None, kv_budget: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, max_queue: int = MAX_QUEUE,
                 kv_dtype: str = "float32"):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        name = KV_DTYPE_ALIASES.get(str(kv_dtype).lower(), str(kv_dtype).lower())
        if name not in KV_DTYPES:
            raise TinyQwenError(f"the server's KV cache dtype must be float32 or bfloat16, got {kv_dtype!r}")
        self.kv_dtype = name
        self.max_batch = max_batch or default_max_batch(model)
        self.kv_budget = kv_budget or default_kv_budget(model, self.max_batch, self.kv_dtype)
        if self.max_batch < 1 or prefill_chunk < 1 or max_queue < 0:
            raise TinyQwenError(f"max_batch and prefill_chunk must be >= 1, max_queue >= 0 (got {self.max_batch}, "
                                f"{prefill_chunk}, {max_queue})")  # fmt: skip
        self.rows, self.slot_len = pool_shape(model.config, self.kv_budget, self.max_batch, self.kv_dtype)
        self.prefill_chunk, self.max_queue = prefill_chunk, max_queue
        # a prefill round and the decode rows in one forward (mixed_forward.py): the model itself, on host memory
        # (a wrapper that only has `forward`, such as the tests' scripted models, gets two forwards per step)
        self.mixed = isinstance(model, Qwen3) and getattr(model.backend, "zeros", np.zeros) is np.zeros
        # ... and there each prompt of a prefill round is a group of its own (no pads, see `_grouped_step`);
        # False: the padded rounds of `_plan_round`, as a wrapper gets them (kept for the A/B in the benchmarks)
        self.grouped = True
        self.pool: KVPool | None = None  # allocated by the worker on its first request
        self.inbox: deque[Job] = deque()
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # being prefilled, in row order (shortest prompt first)
        self.wake = threading.Condition()
        self.records: deque[JobRecord] = deque(maxlen=10_000)
        self.metrics = Metrics()
        self.thread: threading.Thread | None = None
        self.running = False

    def describe(self) -> str:
        """One line for start-up: the batch, the KV budget and what it buys."""
        return (f"continuous batching: up to {self.rows} sequences per decode step, KV budget "
                f"{self.kv_budget / 2**20:,.0f} MiB of {self.kv_dtype} ({self.rows} rows of {self.slot_len:,} "
                f"positions), "
                f"{self.prefill_chunk} prompt tokens prefilled per step, queue of {self.max_queue}")  # fmt: skip

    # ---- the thread

    def start(self) -> None:
        if self.thread is None:
            self.running = True
            self.thread = threading.Thread(target=self._run, name="tinyqwen-engine", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            with self.wake:
                self.running = False
                self.wake.notify()
            self.thread.join(timeout=30)
            self.thread = None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue a request; raises Overloaded (429) when `max_queue` requests already wait."""
        self.start()
        queued = len(self.inbox) + len(self.waiting)
        if queued >= self.max_queue and (self.max_queue or self.active >= self.rows):
            self.metrics.on_request("rejected")
            raise Overloaded(f"the server is busy: {queued} requests are waiting (limit {self.max_queue}); "
                             "retry later", retry_after=max(1, queued // max(1, self.rows)))  # fmt: skip
        job.submitted = time.perf_counter()
        with self.wake:
            self.inbox.append(job)
            self.wake.notify()

    @property
    def active(self) -> int:
        """Sequences holding a KV row (decoding, or being prefilled)."""
        pool = self.pool
        return 0 if pool is None else pool.decoding + len(self.prefilling)

    @property
    def queued(self) -> int:
        return len(self.inbox) + len(self.waiting)

    def gauges(self) -> dict[str, tuple[str, float]]:
        return {"active_sequences": ("Sequences holding a KV row.", self.active),
                "queue_length": ("Requests waiting for a KV row.", self.queued),
                "max_batch": ("Most sequences per decode step.", self.rows),
                "kv_budget_bytes": (f"Bytes of KV cache for the running sequences (stored as {self.kv_dtype}).",
                                    self.rows * self.slot_len * self._bytes_per_token())}  # fmt: skip

    def _bytes_per_token(self) -> int:
        from tinyqwen.kv_cache import kv_bytes_per_token

        c = self.model.config
        return kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.kv_dtype)

    def _run(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.inbox and not self._busy():
                    self.wake.wait(timeout=0.25)
                if not self.running:
                    break
                new = list(self.inbox)
                self.inbox.clear()
            for job in new:
                self._admit(job)
            try:
                self.step()
            except Exception as error:  # a bug: fail what was in flight, keep serving, never send a traceback
                self._fail_all(APIError(500, f"internal error while generating ({type(error).__name__})"))
        self._fail_all(APIError(503, "the server is shutting down"))

    def _busy(self) -> bool:
        return bool(self.waiting) or self.active > 0

    # ---- one step

    def step(self) -> None:
        """One scheduler step: drop cancelled sequences, prefill up to `prefill_chunk` prompt tokens, then one
        batched decode over every running sequence."""
        if self.pool is None:
            self.pool = KVPool(self.model, self.rows, self.slot_len, self.kv_dtype)
        pool = self.pool
        for seq in [s for s in pool.owner[: pool.decoding] if s.job.cancelled.is_set()]:
            self._finish(seq)
        for seq in [s for s in self.prefilling if s.job.cancelled.is_set()]:
            self._finish(seq)
        gone = [s for s in self.waiting if s.job.cancelled.is_set()]  # clients that left while queued
        for seq in gone:
            self.waiting.remove(seq)
            self._close(seq, time.perf_counter())
        if self.mixed and self.grouped:
            if (self.prefilling or self.waiting) and self._grouped_step():
                return
        elif self.mixed and pool.decoding and (self.prefilling or self.waiting) and self._mixed_step():
            return
        else:
            self._prefill(self.prefill_chunk)
        if pool.decoding:
            self._decode()

    def _admit(self, job: Job) -> None:
        """A new request becomes a Sequence in the waiting queue (or an error, sent at once)."""
        try:
            kwargs = dict(job.generate_kwargs)
            temperature, eos = kwargs.pop("temperature", 0.0), kwargs.pop("eos_token_ids", None)
            params, options = _resolve_sampling(self.model, temperature, kwargs)
            row = _make_rows([job.prompt_ids], params, options)[0]
            eos = _resolve_eos(self.model, eos, self.model.config.vocab_size)
            room = self.slot_len - len(job.prompt_ids)
            if room < 1:
                raise TinyQwenError(f"the prompt has {len(job.prompt_ids)} tokens, but this server keeps at most "
                                    f"{self.slot_len} positions per request (--kv-budget / --max-batch)")  # fmt: skip
            seq = Sequence(job, min(job.max_tokens, room), params, row.rng, eos)
        except TinyQwenError as error:
            self._error(job, APIError(400, " ".join(str(error).split())))
            return
        if seq.limit <= 0:
            self._close(seq, time.perf_counter())
            return
        self.waiting.append(seq)

    def _prefill(self, budget: int) -> None:
        """Queued requests, oldest first, `budget` prompt tokens in all, in rounds of one forward each (see
        `_plan_round`); a finished prefill samples the sequence's first token and joins the decoding rows."""
        while budget > 0:
            plan = self._plan_round(budget)
            if plan is None:
                return
            group, ids, real, cache, at = plan
            try:
                out = self.model.forward(ids, cache=cache, last_only=at is None, logits_at=at)
            except TinyQwenError as error:
                for seq in list(group):
                    self._finish(seq, APIError(400, " ".join(str(error).split())))
                continue
            budget -= ids.size
            finished, logits = self._prefilled(group, real, np.asarray(out.logits)[:, -1])
            if finished:
                self._choose(finished, logits)

    def _plan_round(self, budget: int):
        """The next prefill round within `budget` prompt tokens: (group, ids [rows, take], real [rows], cache,
        logits_at or None), or None when nothing waits. Prompts that fit in the budget together are prefilled
        together, in one forward per round (rows sorted shortest first; each round feeds every row up to an equal
        share of the budget, the rows with fewer ids left padded at the end with copies of their last one, so the
        shortest finish, in row order); a longer prompt alone, over as many steps as it needs.

        Why pads: without them a round can only feed every row the shortest one's remaining length, and prompts of
        16 different lengths took 16 rounds, each a pass over all the weights, most with a few rows (a burst of 16
        prompts of 32-64 ids: 19 forwards; padded: 7, for 16 % more rows x positions)."""
        pool = self.pool
        if not self.prefilling:
            group, tokens = [], 0
            while self.waiting and pool.decoding + len(group) < pool.rows:
                seq = self.waiting[0]
                if seq.job.cancelled.is_set():
                    self.waiting.popleft()
                    self._close(seq, time.perf_counter())
                    continue
                if group and tokens + len(seq.prompt) > budget:
                    break
                group.append(self.waiting.popleft())
                tokens += len(seq.prompt)
            if not group:
                return None
            now = time.perf_counter()
            for seq in sorted(group, key=lambda s: len(s.prompt)):
                seq.started = now
                pool.take(seq)
                self.prefilling.append(seq)
        group = list(self.prefilling)
        remaining = [len(s.prompt) - s.prefilled for s in group]
        per_row = budget if len(group) == 1 else budget // len(group)
        take = min(per_row, max(remaining))  # the shorter prompts padded at the end (see below)
        if any(s.prefilled + take > pool.slot_len for s in group):  # pads must stay inside the rows
            take = min(per_row, min(remaining))
        if take < 1:
            return None
        real = [min(take, r) for r in remaining]
        ids = np.asarray([s.prompt[s.prefilled : s.prefilled + n] + [s.prompt[s.prefilled + n - 1]] * (take - n)
                          for s, n in zip(group, real, strict=True)], dtype=np.int64)  # fmt: skip
        # one prompt: a plain one-row cache, so that alone (no decode rows beside it) it is exactly the lone run's
        # prefill; in a mixed step its products run over the decode rows too (the same sums, up to their rounding)
        if len(group) == 1:
            return group, ids, real, pool.row_cache(group[0].row), None
        # each row's logits after its own last id; its pads' keys lie past its length: masked, then overwritten by
        # its next tokens (and causal: no real position attends to them)
        return group, ids, real, pool.window(pool.decoding, len(group)), np.asarray(real) - 1

    def _prefilled(self, group: list[Sequence], real: list[int], logits: np.ndarray):
        """After a round's forward: each row's prompt ids fed so far; the rows whose prompt is done (a prefix:
        shortest first) join the decoding rows. -> (those sequences, their logits [n, vocab])."""
        pool = self.pool
        for seq, n in zip(group, real, strict=True):
            seq.prefilled += n
            pool.lengths[seq.row] = seq.prefilled
        done = [i for i, s in enumerate(group) if s.prefilled == len(s.prompt)]
        finished = [group[i] for i in done]
        for seq in finished:
            self.prefilling.remove(seq)
            pool.prefilled(seq, seq.prefilled)
        return finished, logits[done]

    def _mixed_step(self) -> bool:
        """A prefill round and the decode rows in ONE forward (mixed_forward.py): the running streams ride along
        the chunk's pass over the weights instead of a pass of their own. False when no prefill round is due."""
        pool = self.pool
        plan = self._plan_round(self.prefill_chunk)
        if plan is None:
            return False
        group, ids, real, cache, at = plan
        seqs = list(pool.owner[: pool.decoding])
        decode_ids = np.asarray([[s.pending] for s in seqs], dtype=np.int64)  # [D, 1]
        try:
            decode_logits, logits = forward_groups(
                self.model, [(decode_ids, pool.batch(), None), (ids, cache, at)]
            )
        except TinyQwenError as error:
            for seq in seqs + list(group):
                self._finish(seq, APIError(400, " ".join(str(error).split())))
            return True
        finished, logits = self._prefilled(group, real, logits[:, -1])
        self._choose(seqs + finished, np.concatenate([decode_logits[:, -1], logits]))
        return True

    def _plan_groups(self, budget: int) -> list[tuple[Sequence, int]]:
        """The prompts this step prefills and how many of their ids, `budget` ids in all: the prompts being
        prefilled first (in row order), then queued requests (oldest first) while a KV row is free, the last one
        cut where the budget ends (its rest next step). [(sequence, ids)], in row order: so the prompts a step
        completes are the first rows being prefilled, and join the decoding rows in order."""
        pool, plan, now = self.pool, [], time.perf_counter()
        for seq in self.prefilling:
            if budget <= 0:
                return plan
            n = min(len(seq.prompt) - seq.prefilled, budget)
            plan.append((seq, n))
            budget -= n
        while budget > 0 and self.waiting and pool.decoding + len(self.prefilling) < pool.rows:
            seq = self.waiting.popleft()
            if seq.job.cancelled.is_set():
                self._close(seq, now)
                continue
            seq.started = now
            pool.take(seq)
            self.prefilling.append(seq)
            n = min(len(seq.prompt), budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def _grouped_step(self) -> bool:
        """The decode rows and this step's prompt ids (`_plan_groups`) in ONE forward (mixed_forward.py), each
        prompt a group of its own: its ids [1, n] on its own row (`pool.row_cache`), so a round wastes nothing on
        pads and fills the whole budget whatever the prompts' lengths. False when there is nothing to prefill.

        Why not padded rows (`_plan_round`): prompts of different lengths in one [rows, take] block either wait for
        the shortest or pad the others, and a round stops at the first prompt that does not fit. A decode-heavy
        burst (16 prompts of 32-64 ids, 825 in all, budget 256) took 9 prefill forwards of 880 rows (7 % pads);
        grouped, 4 forwards of exactly its 825 ids (budget 512: 3 forwards with 15 % pads, against 2). A prefill
        forward costs per id, not per forward (Qwen3-0.6B-shaped, numba, 2 threads: 16.6-17.7 ms per id from 128 to
        768 ids at load 5), so the pads were the waste. Attention runs group by group either way. Measured
        (benchmarks/bench_scheduler.py --prompt 0 --new 4 --configs 256:mixed,256:padded,... --clock cpu, one thread,
        interleaved): the burst's work 8.1 and 7.6 s grouped against 8.4 and 8.4 s padded, TTFT p95 7.2-7.7 s
        against 8.1 s."""
        pool = self.pool
        plan = self._plan_groups(self.prefill_chunk)
        if not plan:
            return False
        seqs = list(pool.owner[: pool.decoding])
        groups = (
            [(np.asarray([[s.pending] for s in seqs], dtype=np.int64), pool.batch(), None)] if seqs else []
        )
        for seq, n in plan:
            ids = np.asarray([seq.prompt[seq.prefilled : seq.prefilled + n]], dtype=np.int64)  # [1, n]
            groups.append((ids, pool.row_cache(seq.row), None))
        try:
            outs = forward_groups(self.model, groups)
        except TinyQwenError as error:
            for seq in seqs + [s for s, _ in plan]:
                self._finish(seq, APIError(400, " ".join(str(error).split())))
            return True
        finished, rows = [], [outs[0][:, -1]] if seqs else []
        for (seq, n), out in zip(plan, outs[len(outs) - len(plan) :], strict=True):
            seq.prefilled += n
            pool.lengths[seq.row] = seq.prefilled
            if seq.prefilled == len(seq.prompt):  # (a prefix of the plan: all but its last are whole prompts)
                self.prefilling.remove(seq)
                pool.prefilled(seq, seq.prefilled)
                finished.append(seq)
                rows.append(out[:, -1])
        if seqs or finished:
            self._choose(seqs + finished, np.concatenate(rows))
        return True

    def _decode(self) -> None:
        """One forward over every decoding row, each fed its last token."""
        pool = self.pool
        seqs = list(pool.owner[: pool.decoding])
        ids = np.asarray([[s.pending] for s in seqs], dtype=np.int64)  # [B, 1]
        try:
            out = self.model.forward(ids, cache=pool.batch(), last_only=True)
        except TinyQwenError as error:
            for seq in seqs:
                self._finish(seq, APIError(400, " ".join(str(error).split())))
            return
        self._choose(seqs, np.asarray(out.logits)[:, -1])

    def _choose(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        """Sample each sequence's next id from its row of `logits` [B, vocab]; send its text; finish it at a stop."""
        now = time.perf_counter()
        done, chosen = [], 0
        # one pass over the whole [B, vocab] block for the finite check, one for every greedy row's arg-max (the
        # lowest id on ties, as `sample`'s): a plain greedy row (no penalties) needs nothing else, where `sample`
        # widens its row to float64 first (a copy of 151,936 values per row per step)
        finite = np.isfinite(logits).all(axis=-1)  # [B]
        plain = [_plain_greedy(seq.params) for seq in seqs]
        best = logits.argmax(axis=-1) if any(plain) else None  # [B]
        for b, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            if seq.job.cancelled.is_set():
                done.append((seq, None))
                continue
            if not finite[b]:
                done.append((seq, APIError(400, f"the model's logits are not finite when choosing new token "
                                                f"{len(seq.output) + 1}")))  # fmt: skip
                continue
            if plain[b]:
                token = int(best[b])
            else:
                token = sample(row, seq.rng, seq.params, seq.prompt, seq.output)
            seq.output.append(token)
            chosen += 1
            if len(seq.output) == 1:
                seq.first_token = now
                self.metrics.on_first_token(now - seq.job.submitted)
            else:
                self.metrics.on_next_token(now - seq.last_token)
            seq.last_token = now
            deltas = seq.job.parser.push(token)
            if deltas:
                seq.job.send(("deltas", deltas))
            seq.pending = token
            if token in seq.eos or seq.job.parser.stopped or len(seq.output) >= seq.limit:
                done.append((seq, None))
        self.metrics.on_tokens(chosen, now)
        for seq, error in sorted(done, key=lambda d: -(d[0].row if d[0].row is not None else -1)):
            self._finish(seq, error)  # highest row first: each release moves only rows still running

    # ---- leaving

    def _finish(self, seq: Sequence, error: APIError | None = None) -> None:
        """Free the sequence's KV row at once, then tell its client."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self.pool.release(seq)
        if error is not None:
            self._error(seq.job, error, seq)
        else:
            self._close(seq, time.perf_counter())

    def _close(self, seq: Sequence, now: float) -> None:
        # counted and recorded before the client hears "done": whoever reads /metrics after the reply sees it
        job = seq.job
        self.metrics.on_request("cancelled" if job.cancelled.is_set() else "finished", len(job.prompt_ids))
        self._record(job, seq.started or now, seq.first_token, now)
        try:
            deltas = job.parser.finish()
            if deltas:
                job.send(("deltas", deltas))
            job.send(("done", job.parser.reply))
        except Exception as error:  # noqa: BLE001 (a parser bug must not stop the other streams)
            job.send(
                ("error", APIError(500, f"internal error while parsing the reply ({type(error).__name__})"))
            )

    def _error(self, job: Job, error: APIError, seq: Sequence | None = None) -> None:
        self.metrics.on_request("error")
        now = time.perf_counter()
        self._record(job, seq.started if seq and seq.started else now, seq.first_token if seq else 0.0, now)
        job.send(("error", error))

    def _record(self, job: Job, started: float, first: float, now: float) -> None:
        self.records.append(JobRecord(job.id, len(job.prompt_ids), len(job.output_ids), job.cancelled.is_set(),
                                      job.submitted or started, started, now, first))  # fmt: skip

    def _fail_all(self, error: APIError) -> None:
        pool = self.pool
        seqs = list(self.waiting) + list(self.prefilling)
        seqs += list(pool.owner[: pool.decoding]) if pool is not None else []
        self.waiting.clear()
        for seq in seqs:
            try:
                if pool is not None and seq.row is not None:
                    self._finish(seq, error)
                else:
                    self._error(seq.job, error, seq)
            except Exception:  # noqa: BLE001 (keep failing the others)
                seq.job.send(("error", error))
