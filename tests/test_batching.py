"""Continuous batching: the ragged decode (tinyqwen.kv_cache.RaggedKVCache), the KV pool and the server's scheduler.

Same answers: every row of a batched decode step gets the logits it would get alone, within the project's tolerance
(`tinyqwen.verify.tolerance`: 1e-5 of the logits' size; the only difference is the float32 rounding of a product
over B rows instead of one), while sequences join and leave the batch and rows move in the pool; greedy ids are
identical, and seeded sampled ids too (each request keeps its own generator).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tinyqwen.errors import TinyQwenError
from tinyqwen.generation import generate
from tinyqwen.kv_cache import KVCache, RaggedKVCache, kv_bytes_per_token
from tinyqwen.sampling import SamplingParams
from tinyqwen.serve.engine import Engine, Job, Overloaded
from tinyqwen.serve.kv_pool import KVPool, pool_shape
from tinyqwen.serve.reply_parser import ReplyParser
from tinyqwen.verify import tolerance

EOS = (151645, 151643)


def budget(model, rows: int, positions: int, kv_dtype: str = "float32") -> int:
    """The KV budget (bytes, stored as `kv_dtype`) that buys `rows` rows of `positions` positions."""
    c = model.config
    return (
        rows
        * positions
        * kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, kv_dtype)
    )


def alone_logits(model, prompt: list[int], fed: list[int], kv_dtype: str = "float32") -> list[np.ndarray]:
    """The last position's logits after the prompt, then after each fed id: the sequence run by itself (on a KV
    cache stored as `kv_dtype`)."""
    cache = model.new_cache(1, len(prompt) + len(fed) + 1, kv_dtype)
    out = [model.forward(np.array([prompt]), cache=cache, last_only=True).logits[0, -1]]
    for t in fed:
        out.append(model.forward(np.array([[t]]), cache=cache, last_only=True).logits[0, -1])
    return out


def cupy_standin_model(folder: Path):
    """The cupy backend on the CPU (its kernels' NumPy twins, device arrays that refuse host arrays as CuPy's do;
    see tests/test_cupy_backend.py): the KV pool's rows and the ragged cache in the backend's own arrays."""
    from cuda_executor.devicearrays import OnDevice

    from tinyqwen.backends import cupy as cupy_backend
    from tinyqwen.checkpoint import Checkpoint
    from tinyqwen.config import load_config, load_generation_config
    from tinyqwen.model import Qwen3, load_weights

    backend = cupy_backend.make_backend(OnDevice(cupy_backend.NumpyTwins()), name="cupy-standin")
    config = load_config(folder)
    with Checkpoint(folder) as checkpoint:
        weights = load_weights(checkpoint, config, backend.prepare, keep_bf16=backend.options.keep_bf16)
    return Qwen3(config, weights, backend, load_generation_config(folder), folder)


@pytest.fixture(scope="module", params=["numpy", "numba", "cupy-standin"])
def model(request, tiny_qwen3_dir, tiny_qwen3_model):
    if request.param == "numpy":
        return tiny_qwen3_model
    if request.param == "cupy-standin":
        return cupy_standin_model(tiny_qwen3_dir)
    pytest.importorskip("numba")
    import tinyqwen

    return tinyqwen.load_model(tiny_qwen3_dir, backend="numba")


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_ragged_rows_decode_as_they_would_alone_while_sequences_come_and_go(model, kv_dtype):
    """A pool of 4 rows: sequences of different lengths join (prefilled into their row), decode together, leave
    (rows move to stay packed); every row's logits at every step equal its lone run's (a bf16 pool: against the
    lone run on a bf16 KVCache, within the same tolerance)."""
    rng = np.random.default_rng(0)
    specs = [(int(n), list(rng.integers(0, 5000, n)), list(rng.integers(0, 5000, s)))
             for n, s in ((7, 6), (3, 2), (12, 5), (5, 7), (9, 3))]  # fmt: skip
    want = [alone_logits(model, prompt, fed, kv_dtype) for _, prompt, fed in specs]

    class Seq:
        def __init__(self, i):
            self.i, self.step, self.row = i, 0, None

    pool = KVPool(model, 4, 32, kv_dtype)
    assert pool.cache.dtype == kv_dtype and pool.cache.keys[0].dtype == (np.uint16 if kv_dtype == "bfloat16"
                                                                        else np.float32)  # fmt: skip
    waiting, worst = [Seq(i) for i in range(len(specs))], 0.0
    got_steps = 0
    while waiting or pool.decoding:
        while waiting and pool.decoding < pool.rows:  # join: prefill into the next free row
            seq = waiting.pop(0)
            pool.take(seq)
            out = model.forward(np.array([specs[seq.i][1]]), cache=pool.row_cache(seq.row), last_only=True)
            pool.prefilled(seq, len(specs[seq.i][1]))
            np.testing.assert_allclose(
                out.logits[0, -1], want[seq.i][0], rtol=0, atol=tolerance(want[seq.i][0])
            )
        seqs = list(pool.owner[: pool.decoding])
        ids = np.array([[specs[s.i][2][s.step]] for s in seqs])
        logits = model.forward(ids, cache=pool.batch(), last_only=True).logits[:, -1]
        got_steps += 1
        for b, s in enumerate(seqs):
            s.step += 1
            ref = want[s.i][s.step]
            worst = max(worst, float(np.abs(logits[b] - ref).max() / max(1.0, np.abs(ref).max())))
            np.testing.assert_allclose(logits[b], ref, rtol=0, atol=tolerance(ref), err_msg=f"seq {s.i}")
            assert int(np.argmax(logits[b])) == int(np.argmax(ref))
        for s in sorted(seqs, key=lambda s: -s.row):  # leave when its ids run out, highest row first
            if s.step == len(specs[s.i][2]):
                pool.release(s)
    assert got_steps < sum(len(f) for _, _, f in specs)  # rows really shared steps
    assert pool.decoding == 0 and all(o is None for o in pool.owner)


def test_ragged_cache_checks_its_rows():
    base = KVCache.allocate(1, 2, 1, 4, 2)
    with pytest.raises(Exception, match="one length per row"):
        RaggedKVCache(base, np.array([1, 2, 3]))
    rows = RaggedKVCache(base, np.array([3, 1]))
    with pytest.raises(Exception, match="KV cache is full"):
        rows.update(0, np.ones((2, 1, 2, 2), np.float32), np.ones((2, 1, 2, 2), np.float32))


def test_pool_shape_divides_the_budget():
    from tinyqwen.config import published_configs

    c = published_configs()["Qwen3-0.6B"]
    per_token = 2 * 28 * 8 * 128 * 4
    assert pool_shape(c, 16 * 40960 * per_token, 16) == (16, 40960)  # the whole context each
    assert pool_shape(c, 1 << 30, 16) == (16, (1 << 30) // (16 * per_token))
    assert pool_shape(c, 256 * per_token * 3, 16) == (3, 256)  # a small budget: fewer rows, not tiny ones
    assert pool_shape(c, 1 << 30, 16, "bfloat16") == (
        16,
        (1 << 30) // (16 * per_token // 2),
    )  # twice the positions
    assert pool_shape(c, 256 * per_token * 3, 16, "bfloat16") == (6, 256)  # ... or twice the rows


# ------------------------------------------------------------------------------------------ the engine


class Collector:
    """A job's event queue without an HTTP server: an event loop in a thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def job(self, tok, prompt, max_tokens, **kwargs) -> Job:
        job = Job(
            prompt, max_tokens, {"eos_token_ids": EOS, **kwargs}, ReplyParser(tok, EOS, (), tools=False)
        )
        job.loop = self.loop
        job.events = asyncio.run_coroutine_threadsafe(self._queue(), self.loop).result()
        return job

    @staticmethod
    async def _queue():
        return asyncio.Queue()

    def wait(self, job: Job, timeout: float = 60) -> tuple:
        async def last():
            while True:
                kind, value = await job.events.get()
                if kind != "deltas":
                    return kind, value

        return asyncio.run_coroutine_threadsafe(last(), self.loop).result(timeout)


@pytest.fixture(scope="module")
def tok():
    from tinyqwen.tokenizer import Tokenizer

    return Tokenizer.qwen3()


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [5, 64])
def test_engine_batches_and_every_reply_equals_generate_alone(tiny_qwen3_model, tok, chunk, kv_dtype):
    """12 requests at once into 4 rows: greedy and seeded sampled ids equal `generate` alone (with the same KV
    dtype); no more than 4 rows ever run; steps are shared. Chunk 5: prompts prefilled over several steps; chunk
    64: several prompts prefilled together in one forward."""
    model = tiny_qwen3_model
    engine = Engine(model, tok, max_batch=4, kv_budget=budget(model, 4, 256, kv_dtype), prefill_chunk=chunk,
                    kv_dtype=kv_dtype)  # fmt: skip
    collector = Collector()
    rng = np.random.default_rng(1)
    cases = []
    for i in range(12):
        prompt = [int(t) for t in rng.integers(0, 150000, 3 + i)]
        sampled = i % 3 == 0
        kwargs = {"params": SamplingParams(temperature=0.8, top_k=20), "temperature": 0.8, "seed": i} if sampled \
            else {"temperature": 0.0}  # fmt: skip
        cases.append((prompt, 4 + i % 5, kwargs))
    try:
        jobs = [collector.job(tok, p, n, **kw) for p, n, kw in cases]
        peak = 0
        for job in jobs:
            engine.submit(job)
        results = []
        for job in jobs:
            while not job.events.qsize() and engine.active:
                peak = max(peak, engine.active)
                time.sleep(0.001)
            results.append(collector.wait(job))
    finally:
        engine.stop()
    assert engine.rows == 4 and engine.slot_len == 256 and peak <= 4 and engine.pool.cache.dtype == kv_dtype
    for (prompt, n, kwargs), job, (kind, _) in zip(cases, jobs, results, strict=True):
        assert kind == "done"
        want = generate(model, prompt, n, eos_token_ids=EOS, kv_dtype=kv_dtype, **kwargs)
        assert job.output_ids == want, prompt
    assert engine.metrics.steps < sum(len(j.output_ids) for j in jobs)  # decode steps were shared
    assert engine.pool.decoding == 0 and not engine.prefilling


def test_engine_on_the_cupy_backend_batches_and_equals_numpy_alone(tiny_qwen3_dir, tiny_qwen3_model, tok):
    """The server's engine on the cupy backend (its stand-in on the CPU): the KV pool in device arrays, prompts
    prefilled into their rows, batched ragged decode steps; every greedy reply equals the NumPy backend's `generate`
    of the same prompt alone."""
    model = cupy_standin_model(tiny_qwen3_dir)
    rows_per_forward, forward = [], model.forward

    def counted(ids, *args, **kwargs):
        rows_per_forward.append(len(ids))
        return forward(ids, *args, **kwargs)

    model.forward = counted
    engine = Engine(model, tok, max_batch=3, kv_budget=budget(model, 3, 256), prefill_chunk=8)
    collector = Collector()
    rng = np.random.default_rng(2)
    cases = [([int(t) for t in rng.integers(0, 150000, 4 + 3 * i)], 8 + i % 3) for i in range(5)]
    try:
        jobs = [collector.job(tok, p, n, temperature=0.0) for p, n in cases]
        for job in jobs:
            engine.submit(job)
        results = [collector.wait(job) for job in jobs]
    finally:
        engine.stop()
    for (prompt, n), job, (kind, _) in zip(cases, jobs, results, strict=True):
        assert kind == "done"
        assert job.output_ids == generate(tiny_qwen3_model, prompt, n, eos_token_ids=EOS, temperature=0.0)
    assert max(rows_per_forward) == 3  # steps were shared, by as many rows as the pool has
    assert engine.pool.decoding == 0


@pytest.mark.parametrize("grouped", [True, False])
def test_prompts_of_different_lengths_are_prefilled_in_one_forward(
    tiny_qwen3_model, tok, monkeypatch, grouped
):
    """Four prompts of 3, 8, 13 and 18 ids arrive together (within one step's budget): one forward prefills them
    all, not one round per length; every reply equals `generate` alone. With the model itself each prompt is a
    group of its own in that forward (no pads); in padded rounds (`Engine.grouped` off, as a wrapper model gets
    them) the shorter ones are padded at the end to the longest."""
    import tinyqwen.serve.engine as engine_module

    model = tiny_qwen3_model
    shapes, forward, groups = [], model.forward, engine_module.forward_groups

    def counted(ids, *args, **kwargs):
        shapes.append(np.shape(ids))
        return forward(ids, *args, **kwargs)

    def counted_groups(model, parts):
        shapes.append([np.shape(ids) for ids, _, _ in parts])
        return groups(model, parts)

    monkeypatch.setattr(model, "forward", counted)
    monkeypatch.setattr(engine_module, "forward_groups", counted_groups)
    engine = Engine(model, tok, max_batch=4, kv_budget=budget(model, 4, 256), prefill_chunk=96)
    engine.grouped = grouped
    collector = Collector()
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(0, 150000, n)] for n in (3, 8, 13, 18)]
    try:
        jobs = [collector.job(tok, p, 4, temperature=0.0) for p in prompts]
        with engine.wake:  # (a reentrant lock) all four queued before the worker takes any
            for job in jobs:
                engine.submit(job)
        results = [collector.wait(job) for job in jobs]
    finally:
        engine.stop()
    monkeypatch.undo()
    assert [kind for kind, _ in results] == ["done"] * 4
    prefills = [shape for shape in shapes if isinstance(shape, list) or shape[1] > 1]
    if grouped:  # one forward of four groups, each a prompt's own ids
        assert prefills == [[(1, 3), (1, 8), (1, 13), (1, 18)]]
    else:  # one forward, padded to the longest
        assert prefills == [(4, 18)]
    for prompt, job in zip(prompts, jobs, strict=True):
        assert job.output_ids == generate(model, prompt, 4, eos_token_ids=EOS, temperature=0.0)


def test_a_grouped_round_fills_its_budget_and_cuts_the_last_prompt(tiny_qwen3_model, tok):
    """Prefill chunk 20, prompts of 7, 9, 11 and 6 ids queued together: the first step prefills 7 + 9 and the first
    4 ids of the third (20 in all), the next its other 7 and the whole fourth, while the two finished prompts
    decode in the same forward; the rows join the decoding rows in order and every reply equals `generate`."""
    import tinyqwen.serve.engine as engine_module

    model = tiny_qwen3_model
    engine = Engine(model, tok, max_batch=4, kv_budget=budget(model, 4, 256), prefill_chunk=20)
    rng = np.random.default_rng(9)
    prompts = [[int(t) for t in rng.integers(0, 150000, n)] for n in (7, 9, 11, 6)]
    jobs = [Job(p, 5, {"eos_token_ids": (), "temperature": 0.0}, ReplyParser(tok, ())) for p in prompts]
    calls, groups = [], engine_module.forward_groups

    def recorded(model, parts):
        calls.append([np.shape(ids) for ids, _, _ in parts])
        return groups(model, parts)

    engine_module.forward_groups, saved = recorded, engine_module.forward_groups
    try:
        for job in jobs:
            engine._admit(job)
        engine.step()
        assert calls == [[(1, 7), (1, 9), (1, 4)]] and engine.pool.decoding == 2
        assert [len(j.output_ids) for j in jobs] == [1, 1, 0, 0]
        engine.step()
        assert calls[1] == [(2, 1), (1, 7), (1, 6)] and engine.pool.decoding == 4
        assert [len(j.output_ids) for j in jobs] == [2, 2, 1, 1]
        while engine.active:
            engine.step()
    finally:
        engine_module.forward_groups = saved
    for prompt, job in zip(prompts, jobs, strict=True):
        assert job.output_ids == generate(model, prompt, 5, eos_token_ids=(), temperature=0.0)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_a_cancelled_request_frees_its_row_and_the_others_go_on(tiny_qwen3_model, tok, kv_dtype):
    engine = Engine(tiny_qwen3_model, tok, max_batch=2, kv_budget=budget(tiny_qwen3_model, 2, 256, kv_dtype),
                    kv_dtype=kv_dtype)  # fmt: skip
    collector = Collector()
    try:
        long = [collector.job(tok, [1, 2, 3 + i], 100) for i in range(2)]
        waiter = collector.job(tok, [7, 8, 9], 5)
        for job in (*long, waiter):
            engine.submit(job)
        deadline = time.time() + 30
        while len(long[0].output_ids) < 3:
            assert time.time() < deadline
            time.sleep(0.005)
        assert engine.active == 2 and len(waiter.output_ids) == 0  # no free row: it waits
        long[0].cancelled.set()  # its client went away: the waiting request takes its row
        assert collector.wait(waiter)[0] == "done"
        assert len(long[0].output_ids) < 100
        assert collector.wait(long[0])[0] == "done"
        long[1].cancelled.set()
        collector.wait(long[1])
        assert waiter.output_ids == generate(
            tiny_qwen3_model, [7, 8, 9], 5, eos_token_ids=EOS, kv_dtype=kv_dtype
        )
    finally:
        engine.stop()
    assert engine.active == 0
    cancelled = [r for r in engine.records if r.cancelled]
    assert len(cancelled) == 2


def test_past_the_queue_limit_requests_get_429_with_retry_after(tiny_qwen3_model, tok):
    engine = Engine(
        tiny_qwen3_model, tok, max_batch=1, kv_budget=budget(tiny_qwen3_model, 1, 256), max_queue=1
    )
    collector = Collector()
    engine.running = True  # no worker: everything stays queued
    engine.thread = threading.current_thread()
    engine.submit(collector.job(tok, [1, 2], 3))
    with pytest.raises(Overloaded) as caught:
        engine.submit(collector.job(tok, [1, 2], 3))
    assert caught.value.status == 429 and int(caught.value.headers["Retry-After"]) >= 1
    assert caught.value.body()["error"]["type"] == "rate_limit_error"
    engine.thread = None


def test_a_prompt_longer_than_a_kv_row_is_a_clear_error(tiny_qwen3_model, tok):
    engine = Engine(tiny_qwen3_model, tok, max_batch=1, kv_budget=budget(tiny_qwen3_model, 1, 16))
    collector = Collector()
    try:
        job = collector.job(tok, list(range(20)), 3)
        engine.submit(job)
        kind, error = collector.wait(job)
    finally:
        engine.stop()
    assert kind == "error" and error.status == 400 and "positions per request" in error.message


def test_health_and_metrics_endpoints(tiny_qwen3_model, tok):
    from tinyqwen.serve import create_app
    from tinyqwen.testing import asgi_call

    app = create_app(tiny_qwen3_model, tok, "tiny", max_batch=2)
    try:
        status, _, body = asgi_call(app, "GET", "/health")
        assert status == 200 and b'"ok"' in body
        status, _, _ = asgi_call(app, "POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 3],
                                                                   "max_tokens": 3, "temperature": 0})  # fmt: skip
        assert status == 200
        status, headers, body = asgi_call(app, "GET", "/metrics")
    finally:
        app.state.service.engine.stop()
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for line in (
        'tinyqwen_requests_total{outcome="finished"} 1',
        "tinyqwen_generation_tokens_total 3",
        "tinyqwen_active_sequences 0",
        "tinyqwen_queue_length 0",
        "tinyqwen_max_batch 2",
        'tinyqwen_time_to_first_token_seconds_bucket{le="+Inf"} 1',
        "tinyqwen_inter_token_latency_seconds_count 2",
        "# TYPE tinyqwen_tokens_per_second gauge",
    ):
        assert line in text, line  # fmt: skip


def test_serve_flags_are_checked_and_the_batching_is_shown_at_start_up(tiny_qwen3_dir):
    import subprocess
    import sys

    def serve(*flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "tinyqwen.cli",
            "serve",
            "--model",
            str(tiny_qwen3_dir),
            "--port",
            "0",
            *flags,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    bad = serve("--kv-budget", "lots")
    assert bad.returncode != 0 and "--kv-budget must be a size such as 4GiB" in bad.stderr, bad.stderr
    bad = serve("--max-batch", "0")
    assert bad.returncode != 0 and "--max-batch must be >= 1" in bad.stderr, bad.stderr

    from tinyqwen.cli.commands import parse_bytes

    assert parse_bytes("1.5KiB", "--kv-budget") == 1536 and parse_bytes("2g", "--kv-budget") == 2 << 30
    bad = serve("--kv-dtype", "float16")
    assert bad.returncode != 0 and "argument --kv-dtype: invalid choice: 'float16'" in bad.stderr, bad.stderr
    engine = Engine(SimpleModel(), None, max_batch=3, kv_budget=3 * 300 * 512)
    assert engine.describe().startswith("continuous batching: up to 3 sequences per decode step, KV budget 0 MiB "
                                        "of float32 (3 rows of 300 positions)")  # fmt: skip
    engine = Engine(SimpleModel(), None, max_batch=3, kv_budget=3 * 300 * 512, kv_dtype="bf16")
    assert engine.describe().startswith("continuous batching: up to 3 sequences per decode step, KV budget 0 MiB "
                                        "of bfloat16 (3 rows of 600 positions)")  # fmt: skip
    help_, value = engine.gauges()["kv_budget_bytes"]
    assert "bfloat16" in help_ and value == 3 * 600 * 256  # 2 layers x 2 (k, v) x 2 heads x 16 x 2 bytes
    with pytest.raises(TinyQwenError, match="KV cache dtype must be float32 or bfloat16, got 'float16'"):
        Engine(SimpleModel(), None, max_batch=3, kv_budget=3 * 300 * 512, kv_dtype="float16")


class SimpleModel:
    """Only a config: what the Engine reads before its first request."""

    from types import SimpleNamespace

    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                             vocab_size=10)  # fmt: skip


def test_pool_release_keeps_rows_packed_and_moves_their_keys(tiny_qwen3_model):
    """Rows: 3 decoding, then 2 prefilling. Releasing a decoding row moves the last decoding row into it and the
    prefilling rows down one; releasing a prefilling row moves the ones behind it; every row's keys travel."""

    class S:
        row = None

    pool = KVPool(tiny_qwen3_model, 6, 8)
    seqs = [S() for _ in range(5)]
    for i, s in enumerate(seqs):
        pool.take(s)
        pool.lengths[s.row] = i + 1
        for a in pool.cache.keys:
            a[s.row, :, : i + 1] = i + 1  # each row's keys are its number
        if i < 3:
            pool.prefilled(s, i + 1)

    def rows_hold():
        return [(pool.owner[r] is not None and seqs.index(pool.owner[r]), int(pool.lengths[r]),
                 float(pool.cache.keys[0][r, 0, 0, 0])) for r in range(pool.rows)]  # fmt: skip

    pool.release(seqs[0])
    assert rows_hold()[:4] == [(2, 3, 3.0), (1, 2, 2.0), (3, 4, 4.0), (4, 5, 5.0)]
    assert pool.decoding == 2 and pool.owner[4] is None and [s.row for s in seqs[1:]] == [1, 0, 2, 3]
    pool.release(seqs[3])  # a prefilling sequence cancelled before its first token
    assert rows_hold()[:3] == [(2, 3, 3.0), (1, 2, 2.0), (4, 5, 5.0)] and pool.owner[3] is None
    window = pool.window(2, 1)
    assert window.first == 2 and window.sequences == [seqs[4]] and window.length == 5


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_a_lone_decoding_row_takes_the_whole_step_kernel_and_the_same_logits(monkeypatch, kv_dtype):
    """One decoding row: `pool.batch()` is that row as a plain KVCache (the same view object every step), so the
    numba backend runs the step as its one whole-step kernel (decode_step.py), as a lone `generate` does; the
    logits are bit-identical to the ragged one-row window's (the same one-row kernels; one row sees all its keys),
    and the pool's length of the row advances as with the ragged cache."""
    pytest.importorskip("numba")
    import tinyqwen
    from tinyqwen.backends.numba import decode_step

    # bf16 weights: the whole-step kernel runs bf16 models (the tiny float32 checkpoint decodes layer by layer)
    model = tinyqwen.load_model(
        Path(__file__).parent / "fixtures" / "dense-untied-bf16-sharded", backend="numba"
    )
    whole = []
    region = decode_step._step_bf16_region
    monkeypatch.setattr(decode_step, "_step_bf16_region", lambda *a: whole.append(1) or region(*a))
    pool = KVPool(model, 3, 32, kv_dtype)
    seq = type("Seq", (), {"row": None})()
    pool.take(seq)
    model.forward(np.array([[5, 17, 300, 4, 42]]), cache=pool.row_cache(0), last_only=True)
    pool.prefilled(seq, 5)
    assert pool.lengths[0] == 5
    cache = pool.batch()
    assert not isinstance(cache, RaggedKVCache) and cache.length == 5 and cache.sequences == [seq]
    got = model.forward(np.array([[7]]), cache=cache, last_only=True).logits[0, -1]
    assert whole == [1] and pool.lengths[0] == 6 and pool.batch() is cache and cache.length == 6
    pool.lengths[0] = 5  # the same step again, on the ragged window of that row (layer by layer)
    want = model.forward(np.array([[7]]), cache=pool.window(0, 1), last_only=True).logits[0, -1]
    assert whole == [1] and pool.lengths[0] == 6
    np.testing.assert_array_equal(got, want)
    # ... and the lone `generate` step on its own KVCache of that dtype: the same kernel, the same logits
    alone = model.new_cache(1, 32, kv_dtype)
    model.forward(np.array([[5, 17, 300, 4, 42]]), cache=alone, last_only=True)
    np.testing.assert_array_equal(
        model.forward(np.array([[7]]), cache=alone, last_only=True).logits[0, -1], got
    )
    assert whole == [1, 1]


@pytest.mark.parametrize("precision", ["highest", "medium"])
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])  # the server's pool in either dtype
def test_a_batched_step_in_one_region_is_bit_identical_to_kernel_by_kernel(precision, kv_dtype, monkeypatch):
    """Several decoding rows of different lengths (a RaggedKVCache from row 0): the numba backend runs the step as
    one region (decode_step.py's batched step: the tiles' rows, the ragged cache write, attention per (row, kv
    head)); its logits and the keys and values it writes are bit-identical to the layer-by-layer, kernel-by-kernel
    step's (the same serial kernels on the same rows), step after step as rows join and leave; a window that does
    not start at row 0 declines it. "medium" (AVX512-BF16 hosts): the region on the vdpbf16ps tiles, with every
    rounding to bf16 of the kernel-by-kernel medium step (each product's input, SwiGLU's h, the lm_head's input),
    so bit-identical too; and its logits are not "highest"'s (the roundings happen)."""
    pytest.importorskip("numba")
    import tinyqwen
    from tinyqwen.backends.numba import decode_step, decode_tiles, linear

    if not decode_tiles.WIDE_TILES:
        pytest.skip("the batched step runs on the 4 x 6 tiles (AVX-512 hosts)")
    if precision == "medium" and not (decode_tiles.DPBF16_TILES and linear.BATCH_DPBF16):
        pytest.skip('"medium"\'s batched step runs on the vdpbf16ps tiles (AVX512-BF16 hosts)')
    monkeypatch.setattr(linear, "BATCH_PANELS", False)
    folder = Path(__file__).parent / "fixtures" / "dense-untied-bf16-sharded"
    model = tinyqwen.load_model(folder, backend="numba", matmul_precision=precision)
    regions = []
    region = decode_step._batch_step_region
    monkeypatch.setattr(decode_step, "_batch_step_region", lambda *a: regions.append(1) or region(*a))
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 500, n)) for n in (5, 9, 3, 12, 7)]
    pools = {flag: KVPool(model, 5, 32, kv_dtype) for flag in (True, False)}
    for pool in pools.values():
        for i, prompt in enumerate(prompts):
            seq = type("Seq", (), {"row": None})()
            pool.take(seq)
            model.forward(np.array([prompt]), cache=pool.row_cache(i), last_only=True)
            pool.prefilled(seq, len(prompt))
    steps = 0
    for step in range(6):
        got = {}
        for flag, pool in pools.items():
            monkeypatch.setattr(decode_step, "BATCH_STEP", flag)
            ids = (np.arange(pool.decoding) * 31 + step * 7)[:, None] % 500
            got[flag] = model.forward(ids, cache=pool.batch(), last_only=True).logits
        steps += pools[True].decoding > 1
        np.testing.assert_array_equal(got[True], got[False])
        if precision == "medium" and step == 0:  # the same step in "highest" (kernel by kernel) differs
            high = tinyqwen.load_model(folder, backend="numba")
            pool = KVPool(high, 5, 32, kv_dtype)
            for i, prompt in enumerate(prompts):
                pool.take(type("Seq", (), {"row": None})())
                high.forward(np.array([prompt]), cache=pool.row_cache(i), last_only=True)
                pool.prefilled(pool.owner[i], len(prompt))
            ids = (np.arange(pool.decoding) * 31)[:, None] % 500
            want = high.forward(ids, cache=pool.batch(), last_only=True).logits
            assert not np.array_equal(got[True], want)
            np.testing.assert_allclose(got[True], want, atol=0.05 * np.abs(want).max())
        for a, b in zip(pools[True].cache.keys + pools[True].cache.values,
                        pools[False].cache.keys + pools[False].cache.values, strict=True):  # fmt: skip
            assert np.array_equal(a, b)
        np.testing.assert_array_equal(pools[True].lengths, pools[False].lengths)
        if step in (1, 3):  # a sequence leaves: the last row moves into its place
            for pool in pools.values():
                pool.release(pool.owner[1 if step == 1 else 0])
    assert len(regions) == steps == 6
    monkeypatch.setattr(decode_step, "BATCH_STEP", True)
    window = pools[True].window(1, 2)
    model.forward(np.array([[3], [4]]), cache=window, last_only=True)  # rows 1, 2: kernel by kernel
    assert len(regions) == 6
    # a bf16 KV cache (uint16 bit patterns): the region rounds each new key and value as the cache's own encode
    c = model.config
    bases = {flag: KVCache.allocate(c.num_hidden_layers, 3, c.num_key_value_heads, 16, c.head_dim, "bfloat16")
             for flag in (True, False)}  # fmt: skip
    lengths = {flag: np.array([2, 5, 0]) for flag in bases}
    for step in range(3):
        got = {}
        for flag, base in bases.items():
            monkeypatch.setattr(decode_step, "BATCH_STEP", flag)
            ids = np.array([[11 + step], [40], [7 * step]])
            got[flag] = model.forward(ids, cache=RaggedKVCache(base, lengths[flag]), last_only=True).logits
            assert lengths[flag].tolist() == [3 + step, 6 + step, 1 + step]  # advanced in place
        np.testing.assert_array_equal(got[True], got[False])
        for a, b in zip(bases[True].keys + bases[True].values, bases[False].keys + bases[False].values,
                        strict=True):  # fmt: skip
            assert a.dtype == np.uint16 and np.array_equal(a, b)
    assert len(regions) == 9


# ---- the numba backend's batched decode products (register tiles of 4 token rows x 3 or 6 weight rows)


def _bf16_weight(rng, n: int, k: int):
    from tinyqwen.backends.numba.weights import BF16Weight

    bits = (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return BF16Weight(bits), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("wide", [False, True])  # 4 x 3 tiles, 4 x 6 (AVX-512 hosts' default)
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 6, 7, 16, 17])  # whole tiles, leftover rows, both (16: panels)
def test_batched_products_equal_float64_per_row_and_batch_one_is_untouched(rows, wide, monkeypatch):
    # every row of a batched q/k/v (row counts that are not multiples of 3 or 6: a triple or six that spans two
    # weights), o and SwiGLU product against float64 sums of the same bf16 weights: 1e-5 of the output's size, as
    # the backend's other products (tests/test_numba_backend.py); and a batch of one still takes the one-row
    # loops, bit for bit
    pytest.importorskip("numba")
    from tinyqwen.backends.numba import decode_tiles, linear

    monkeypatch.setattr(decode_tiles, "WIDE_TILES", wide)

    rng = np.random.default_rng(rows)
    K = 96
    ws = [_bf16_weight(rng, n, K) for n in (7, 13, 64, 3)]
    x = rng.standard_normal((rows, K)).astype(np.float32)
    outs = linear.linears(x, tuple(w for w, _ in ws))
    for out, (_, w64) in zip(outs, ws, strict=True):
        want = x.astype(np.float64) @ w64.T
        assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
    # a row's sums depend neither on the other rows of its step nor on its place in a tile (or panel): the rows
    # reversed give the same sums, bit for bit
    reversed_ = linear.linears(x[::-1], tuple(w for w, _ in ws))
    assert all(np.array_equal(out[::-1], r) for out, r in zip(outs, reversed_, strict=True))
    (g, g64), (u, u64), (d, d64) = (
        _bf16_weight(rng, 50, K),
        _bf16_weight(rng, 50, K),
        _bf16_weight(rng, K, 50),
    )
    hg = x.astype(np.float64) @ g64.T
    want = (hg / (1 + np.exp(-hg)) * (x.astype(np.float64) @ u64.T)) @ d64.T
    for fused in (True, False):  # one call, or gate/up then down
        monkeypatch.setattr(linear, "FUSED_SWIGLU", fused)
        got = linear.swiglu(x, g, u, d)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    one = [linear.linears(x[:1], tuple(w for w, _ in ws)), linear.swiglu(x[:1], g, u, d)]
    monkeypatch.setattr(linear, "BATCH_TILES", False)
    again = [linear.linears(x[:1], tuple(w for w, _ in ws)), linear.swiglu(x[:1], g, u, d)]
    for a, b in zip([*one[0], one[1]], [*again[0], again[1]], strict=True):
        assert np.array_equal(a, b)


def test_ragged_decode_attention_reads_each_row_only_to_its_own_length():
    # a server's batch: rows of different lengths in one cache, each masked past its own end (stale keys there,
    # huge ones: a kernel that read them would not hide them by much). Each row's output equals the reference's,
    # and is bit-identical to that row run alone on exactly its own keys
    pytest.importorskip("numba")
    from tinyqwen.attention import attention as reference
    from tinyqwen.backends.numba.attention import attention

    rng = np.random.default_rng(3)
    B, Hq, Hkv, S, d = 4, 8, 2, 11, 16
    lengths = [11, 3, 7, 1]
    q = rng.standard_normal((B, Hq, 1, d)).astype(np.float32)
    cache = rng.standard_normal((2, B, Hkv, 16, d)).astype(np.float32)
    for b, n in enumerate(lengths):
        cache[:, b, :, n:] = 1e4  # stale
    k, v = cache[0][:, :, :S], cache[1][:, :, :S]
    mask = np.arange(S)[None, None, :] < np.array(lengths)[:, None, None]  # [B, 1, S]
    got = attention(q, k, v, mask)
    want = reference(q, k, v, mask)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    for b, n in enumerate(lengths):
        alone = attention(
            q[b : b + 1], cache[0][b : b + 1, :, :n], cache[1][b : b + 1, :, :n], mask[b : b + 1, :, :n]
        )
        assert np.array_equal(got[b], alone[0])


def _two_decoding_and_a_newcomer(engine, tok, new_tokens: int) -> tuple[list, Job]:
    """Two short requests admitted and decoding, then a 23-token prompt admitted beside them (greedy, no eos)."""
    running = [Job([5, 6, 7 + i], new_tokens, {"eos_token_ids": (), "temperature": 0.0}, ReplyParser(tok, ()))
               for i in range(2)]  # fmt: skip
    for job in running:
        engine._admit(job)
    while engine.pool is None or engine.pool.decoding < 2:
        engine.step()
    newcomer = Job(list(range(100, 123)), 3, {"eos_token_ids": (), "temperature": 0.0}, ReplyParser(tok, ()))
    engine._admit(newcomer)
    return running, newcomer


def test_a_new_request_is_prefilled_at_the_next_step_in_chunks_while_the_others_keep_decoding(
    tiny_qwen3_model, tok
):
    # steps driven by hand (no worker thread): two sequences decode; a prompt of 23 tokens arrives. The very next
    # step starts its prefill (it does not wait for the running ones to finish), every step prefills at most
    # `prefill_chunk` tokens, and every step still decodes both running rows: their tokens keep flowing
    model = tiny_qwen3_model
    calls = []

    class Recording:  # the real model; each forward's [rows, tokens] recorded
        config, generation_config = model.config, getattr(model, "generation_config", {})

        def new_cache(self, *args):
            return model.new_cache(*args)

        def forward(self, ids, **kwargs):
            calls.append(np.asarray(ids).shape)
            return model.forward(ids, **kwargs)

    engine = Engine(Recording(), tok, max_batch=4, kv_budget=budget(model, 4, 256), prefill_chunk=8)
    assert engine.rows == 4
    running, newcomer = _two_decoding_and_a_newcomer(engine, tok, 40)
    steps = []
    while not newcomer.output_ids:
        before = [len(j.output_ids) for j in running]
        calls.clear()
        engine.step()
        steps.append(list(calls))
        assert [len(j.output_ids) for j in running] == [b + 1 for b in before]  # both decoded this step
    assert steps[0][0] == (1, 8)  # the very next step: the newcomer's first chunk, before the decode
    assert all(sum(r * t for r, t in s if t > 1) <= 8 for s in steps)  # at most prefill_chunk prompt tokens
    assert len(steps) == 3 and steps[-1][0] == (1, 7)  # 23 = 8 + 8 + 7, the first token right after


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads the process's resident memory in /proc"
)
def test_the_kv_pool_is_resident_only_where_sequences_wrote(tiny_qwen3_model):
    # a pool of 512 MiB (16 rows): one position written in every row and layer takes a few MiB, not the pool
    # (with NumPy's huge-page advice each write took a 2 MiB page: the whole pool after one token per row)
    def rss() -> int:
        text = Path("/proc/self/status").read_text()
        return int(next(line for line in text.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024

    model = tiny_qwen3_model
    rows = 16
    per_row = (512 << 20) // rows
    slot_len = per_row // kv_bytes_per_token(
        model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    )
    before = rss()
    pool = KVPool(model, rows, slot_len)
    assert pool.nbytes >= 500 << 20
    for store in (pool.cache.keys, pool.cache.values):
        for a in store:
            a[:, :, 0] = 1.0  # every row's first position, every head
    assert rss() - before < 64 << 20


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_forward_groups_gives_each_group_its_logits_alone(model, kv_dtype):
    """A server step's decode rows and a prefill chunk in one forward (tinyqwen/serve/mixed_forward.py): two rows
    decoding at their own lengths and one prompt's chunk of 5 ids (its second chunk) share every product; each row's
    logits equal the sequence run alone within tolerance, and each cache holds what the row alone would."""
    from tinyqwen.serve.mixed_forward import forward_groups

    if model.backend.zeros is not np.zeros:
        pytest.skip("the engine mixes only on host memory (the numpy and numba backends)")
    rng = np.random.default_rng(7)
    prompts = [[int(t) for t in rng.integers(0, 150000, n)] for n in (4, 9, 12)]
    pool = KVPool(model, 3, 32, kv_dtype)
    for row, prompt in enumerate(prompts[:2]):  # two sequences prefilled, then decoding
        pool.owner[row] = object()
        model.forward(np.array([prompt]), cache=pool.row_cache(row), last_only=True)
        pool.lengths[row], pool.decoding = len(prompt), row + 1
    pool.owner[2] = object()
    model.forward(np.array([prompts[2][:7]]), cache=pool.row_cache(2), last_only=True)  # the first chunk
    pool.lengths[2] = 7
    fed = [11, 22]
    decode, chunk = forward_groups(model, [(np.array([[t] for t in fed]), pool.batch(), None),
                                           (np.array([prompts[2][7:]]), pool.row_cache(2), None)])  # fmt: skip
    assert decode.shape == (2, 1, model.config.vocab_size) and chunk.shape == (1, 1, model.config.vocab_size)
    assert pool.lengths[:2].tolist() == [5, 10]  # the ragged cache advanced the decode rows
    for got, prompt, more in ((decode[0, 0], prompts[0], [fed[0]]), (decode[1, 0], prompts[1], [fed[1]]),
                              (chunk[0, 0], prompts[2], [])):  # fmt: skip
        want = alone_logits(model, prompt, more, kv_dtype)[-1]
        assert np.abs(np.asarray(got) - want).max() <= tolerance(want)


def test_a_prefill_chunk_rides_in_the_decode_step_s_forward(tiny_qwen3_model, tok, monkeypatch):
    """With the model itself (not a wrapper), a newcomer's prompt is prefilled `prefill_chunk` ids per step inside
    the running rows' decode step: one forward per step (mixed_forward.forward_groups), the running rows decode
    every step, and every reply equals `generate` alone."""
    import tinyqwen.serve.engine as engine_module

    calls = []

    def recorded(model, groups):
        calls.append([np.shape(ids) for ids, _, _ in groups])
        return forward_groups(model, groups)

    forward_groups = engine_module.forward_groups
    monkeypatch.setattr(engine_module, "forward_groups", recorded)
    model = tiny_qwen3_model
    engine = Engine(model, tok, max_batch=4, kv_budget=budget(model, 4, 256), prefill_chunk=8)
    assert engine.mixed
    running, newcomer = _two_decoding_and_a_newcomer(engine, tok, 12)
    while not newcomer.output_ids:
        before = [len(j.output_ids) for j in running]
        calls.clear()
        engine.step()
        assert [len(j.output_ids) for j in running] == [b + 1 for b in before]  # both decoded this step
        assert len(calls) == 1  # ... in the same forward as the chunk
    assert len(calls[0]) == 2 and calls[0][0] == (2, 1) and calls[0][1] == (1, 7)  # 23 = 8 + 8 + 7
    while engine.active:
        engine.step()
    for job in [*running, newcomer]:
        assert job.output_ids == generate(
            model, job.prompt_ids, job.max_tokens, eos_token_ids=(), temperature=0.0
        )


def test_choose_takes_the_arg_max_of_plain_greedy_rows_and_sample_for_the_rest(tiny_qwen3_model, tok):
    """`Engine._choose` on a hand-made block of logits: a plain greedy row (no penalty) is the arg-max, the lowest
    id on a tie, as `sample`'s; a greedy row with a repetition penalty goes through `sample` (the penalty moves its
    choice off the raw arg-max); a row with an -inf or a NaN anywhere ends its request with a 400, as before."""
    model = tiny_qwen3_model
    engine = Engine(model, tok, max_batch=4, kv_budget=budget(model, 4, 64))
    engine.pool = KVPool(model, engine.rows, engine.slot_len)
    kwargs = [{"temperature": 0.0}, {"temperature": 0.0, "repetition_penalty": 5.0}, {"temperature": 0.0},
              {"temperature": 0.0}]  # fmt: skip
    jobs = [Job([7, 3], 8, {"eos_token_ids": (), **kw}, ReplyParser(tok, ())) for kw in kwargs]
    for job in jobs:
        engine._admit(job)
    seqs = list(engine.waiting)
    V = model.config.vocab_size
    logits = np.zeros((4, V), np.float32)
    logits[0, [11, 5]] = 2.0  # a tie: the lower id
    logits[1, 7], logits[1, 9] = 3.0, 1.0  # 7 is in the prompt: penalised to 0.6, below 9
    logits[2, 4], logits[2, 100] = 1.0, -np.inf
    logits[3, 6] = np.nan
    engine._choose(seqs, logits)
    assert [j.output_ids for j in jobs] == [[5], [9], [], []]
    assert [r.completion_tokens for r in engine.records] == [0, 0]  # the two non-finite rows ended at once
    assert engine.metrics.requests["error"] == 2
