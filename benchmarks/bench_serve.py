"""Load test of `tinyqwen serve` (continuous batching), with llama.cpp's server as the peer in the same run.

    python benchmarks/bench_serve.py                                        # chapter 9's tiny Qwen3, numpy, quick
    python benchmarks/bench_serve.py --model QWEN3_0.6B_DIR --backend numba --clients 1,4,16,64 \\
        --workload decode,prompt --llama-server LLAMA_SERVER_BIN --gguf MODEL_BF16.gguf
    python benchmarks/bench_serve.py --model QWEN3_0.6B_DIR --backend numba --clients 16 --soak 600

Each server runs in a process of its own on 127.0.0.1 (as in use). Requests are streamed greedy `/v1/completions`
(prompts as token ids, so both servers see exactly the same prompts). Every workload and client count C is a cell
of two phases, reported on two lines:

    burst    C clients send one request each at the same instant. The last prompt waits for all C prefills before
             it (prefill is compute-bound), so its TTFT grows with C whatever the scheduler: the worst case.
    steady   C clients each send `--requests` requests back to back, client c starting c/C of a request's
             duration late (the burst's mean), so arrivals are spread as in a server's steady state. Aggregate
             tok/s counts the tokens streamed while every client was active (from the last client's start to
             the first client's end; with one request per client there may be no such window: then all tokens
             over the phase's wall time, ramps included); TTFT/ITL are every steady request's.

and reports per phase:

    aggregate tok/s   generated tokens / wall time (all clients together)
    TTFT p50/p95      time from sending a request to its first streamed token
    ITL p50/p95       time between two streamed chunks of one reply (inter-token latency)
    lost              requests without a finish reason and `[DONE]` (must be 0)
    CPU (burst)       the server's CPU seconds in its model threads and in its event loop (HTTP, SSE), and the
                      clients' (this process, on the same cores): what the serving around the model costs
    ITL mean (burst)  tinyqwen's mean inter-token latency at its scheduler (/metrics) against the clients': what
                      HTTP and SSE add between a token chosen and a token received

The issue's throughput targets (16 clients against one: decode-heavy 4x, prompt-heavy 2x) read the burst line,
tokens / wall time with every client starting together; the steady line's rate is that of a full server (no
client's turnaround idles it), so it can exceed the client count on a model whose step costs little per row.
Per engine, its peak RSS (VmHWM). Before the cells each server answers a few warm-up requests (not counted). The summary gives each phase's aggregate against one client, and the TTFT
target: steady TTFT p95 against 3x the one-client TTFT plus one prefill (the one-client TTFT).

`--soak SECONDS`: instead of the cells, C clients (the largest of `--clients`) send requests of the first workload;
once each has had its first reply (the warm-up: by then every KV row has held a whole request, see `soak`), for
SECONDS more with the server's RSS sampled every `--soak-every` seconds; it reports the mean RSS of the first and
the last third, whether it stayed flat (last third within 5% + 16 MiB of the first), and the shared-anonymous part
(the KV pool's written pages) apart.

Workloads (the issue's shapes): decode-heavy: 32–64-token prompts, 128 new tokens; prompt-heavy: 256-token
prompts, 48 new tokens (`--scale` shrinks both for a quick run). At full scale on Qwen3-0.6B with 2 cores a 64-client
cell takes minutes: choose `--clients` and `--requests` to fit the time you have. tinyqwen's replies are checked
against `tinyqwen.generate` on the same prompt alone (`--check` requests per cell): a divergence is reported with its
logit margin (the alone run's logit of its own choice minus that of the server's choice at the first differing
position: a near-tie that float32 rounding of the batched products can flip). llama.cpp's replies are checked for
completeness only (its numerics differ). Timings on a shared machine swing: compare engines within one run, as
ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tinyqwen  # noqa: E402

WORKLOADS = {"decode": ((32, 64), 128), "prompt": ((256, 256), 48)}  # (prompt length range, new tokens)


def tiny_model() -> Path:
    """Chapter 9's tiny Qwen3 (2 layers, hidden 32, the real 151,936-token vocabulary), written to a temp folder."""
    from tinyqwen.testing import END_TO_END_SCALE, write_tiny_qwen3

    folder = Path(tempfile.mkdtemp(prefix="tinyqwen-bench-serve-"))
    write_tiny_qwen3(folder, seed=9, scale=END_TO_END_SCALE)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} was not ready after {timeout:.0f} s")


def peak_rss(pid: int) -> int:
    """The process's high-water resident memory in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def start_tinyqwen(folder: Path, backend: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinyqwen.cli", "serve", "--model", str(folder), "--backend", backend, "--port",
           str(port), "--served-model-name", "m", "--log-level", "warning", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: [print("  [tinyqwen]", line.rstrip(), file=sys.stderr)
                                     for line in proc.stderr], daemon=True).start()  # fmt: skip
    wait_ready(port, proc, "tinyqwen serve")
    return proc


def start_llama(binary: str, gguf: str, port: int, parallel: int, ctx_per_slot: int, threads: int):
    for path, what in ((binary, "--llama-server"), (gguf, "--gguf")):
        if not Path(path).is_file():
            raise SystemExit(f"{what}: no such file: {path}")
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"--llama-server: {binary} is not executable")
    usage = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    known = usage.stdout + usage.stderr
    cmd = [binary, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-t", str(threads), "-tb", str(threads),
           "--parallel", str(parallel), "-c", str(parallel * ctx_per_slot)]  # fmt: skip
    cmd += [flag for flag in ("--no-webui", "--cont-batching") if flag in known]  # (older builds lack some)
    log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc, "llama-server")
    except SystemExit:
        log.seek(0)
        print(
            "  [llama-server] " + "\n  [llama-server] ".join(log.read().splitlines()[-20:]), file=sys.stderr
        )
        proc.kill()
        raise
    return proc


def stream_completion(port: int, prompt: list[int], max_tokens: int) -> dict:
    """One streamed greedy /v1/completions request: chunk arrival times, ids (tinyqwen) and completeness."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    times, ids, finish, done, usage, status = [], None, None, False, None, response.status
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or []:
            if choice.get("text"):
                times.append(time.perf_counter() - start)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
                ids = choice.get("token_ids", ids)
    conn.close()
    end = time.perf_counter() - start
    tokens = usage if usage is not None else len(ids) if ids is not None else len(times)
    return {"status": status, "times": times, "end": end, "ids": ids, "tokens": tokens, "t0": start,
            "complete": status == 200 and done and finish is not None}  # fmt: skip


def prompts_for(workload: str, clients: int, rounds: int, scale: float, seed: int) -> list[list[int]]:
    (lo, hi), _ = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    lo, hi = max(2, int(lo * scale)), max(2, int(hi * scale))
    # ordinary vocabulary ids (not special tokens): the same prompts for every engine
    return [[int(t) for t in rng.integers(1000, 100_000, int(rng.integers(lo, hi + 1)))]
            for _ in range(clients * rounds)]  # fmt: skip


def run_burst(port: int, prompts: list[list[int]], new_tokens: int) -> tuple[list[dict], float]:
    """One request per client, all sent at the same instant."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: dict(stream_completion(port, p, new_tokens), prompt=p), prompts))
    return results, time.perf_counter() - start


def warm_up(port: int) -> None:
    """Requests that take every kernel path once (a batched prefill and decode, a long and a short prompt alone),
    so that no cell pays a first call's compile or cache load."""
    rng = np.random.default_rng(0)
    ids = [[int(t) for t in rng.integers(1000, 100_000, n)] for n in (8, 8, 80)]
    run_burst(port, ids, 4)
    run_burst(port, ids[:1], 4)
    run_burst(port, ids[2:], 4)


def run_steady(
    port: int, prompts: list[list[int]], clients: int, new_tokens: int, spread: float
) -> tuple[list[dict], float, float]:
    """`clients` clients, client c starting c/clients of `spread` seconds late, each sending its share of
    `prompts` back to back. -> (results, wall time, the window in which every client was active: [start, end])."""
    per_client = [prompts[c::clients] for c in range(clients)]
    t0 = time.perf_counter()
    bounds = [(0.0, 0.0)] * clients

    def client(c: int) -> list[dict]:
        time.sleep(max(0.0, t0 + spread * c / clients - time.perf_counter()))
        began = time.perf_counter()
        results = [dict(stream_completion(port, p, new_tokens), prompt=p) for p in per_client[c]]
        bounds[c] = (began, time.perf_counter())
        return results

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    window = (max(b for b, _ in bounds), min(e for _, e in bounds))
    return results, time.perf_counter() - t0, window


def tokens_in(results: list[dict], window: tuple[float, float]) -> float:
    """Tokens streamed inside [start, end]: each request's chunks in the window, times its tokens per chunk."""
    lo, hi = window
    total = 0.0
    for r in results:
        if r["times"]:
            inside = sum(lo <= r["t0"] + t <= hi for t in r["times"])
            total += inside * r["tokens"] / len(r["times"])
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(results: list[dict], wall: float, window: tuple[float, float] | None = None) -> dict:
    ttft = [r["times"][0] if r["times"] else r["end"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in results)
    rate = tokens / wall
    if window is not None and window[1] - window[0] > 0:  # steady: only while every client was active
        rate = tokens_in(results, window) / (window[1] - window[0])
    return {"requests": len(results), "lost": sum(not r["complete"] for r in results), "tokens": tokens,
            "wall_s": wall, "tok_per_s": rate, "ttft_p50": statistics.median(ttft),
            "ttft_p95": pct(ttft, 0.95), "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95),
            "itl_mean": statistics.mean(itl) if itl else float("nan"),
            "mean_request_s": statistics.mean(r["end"] for r in results)}  # fmt: skip


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The server's CPU seconds so far: (its main thread: the event loop, HTTP and SSE; every other thread: the
    scheduler's worker, Numba's and BLAS's threads). (0, 0) where /proc cannot tell (not Linux, or a peer's)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = rest = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            if int(tid) == pid:
                main += seconds
            else:
                rest += (
                    seconds  # (a thread that ended during the phase drops out: both phases' threads live on)
                )
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0
    return main, rest


def cpu_share(pid: int, phase) -> tuple[object, dict]:
    """Run `phase()` and measure who used the CPU meanwhile: the server's event loop, its model threads, and the
    clients (this process: 16 threads reading and JSON-decoding SSE are on the same cores as the server)."""
    main0, rest0 = cpu_seconds(pid)
    own0, wall0 = os.times(), time.perf_counter()
    out = phase()
    main1, rest1 = cpu_seconds(pid)
    own1, wall = os.times(), time.perf_counter() - wall0
    clients = (own1.user - own0.user) + (own1.system - own0.system)
    return out, {"cpu_loop_s": main1 - main0, "cpu_model_s": rest1 - rest0, "cpu_clients_s": clients,
                 "cpu_wall_s": wall}  # fmt: skip


def current_rss(pid: int, field: str = "VmRSS") -> int:
    """The process's resident memory now, in bytes (VmRSS; or another /proc status field, e.g. RssShmem)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def soak(port: int, pid: int, prompts: list[list[int]], clients: int, new_tokens: int, seconds: float,
         every: float) -> dict:  # fmt: skip
    """`clients` clients sending requests; once each has had one reply (the warm-up), `seconds` more of them with
    the server's RSS sampled every `every` seconds.

    The warm-up is not sampled: tinyqwen's KV pool is mapped lazily, a page resident once a position is written
    in it, so its resident size climbs while the first requests run until every row has held a whole request,
    then stays (rows x the longest request's positions; at full scale on a busy machine that first round took
    minutes, and a soak sampled from the start called it growth). The shared-anonymous part of the RSS (RssShmem:
    the pool's written pages) is reported beside the rest (RssAnon: the Python heap, NumPy's arrays, numba), so a
    growing pool and a growing heap can be told apart.
    """
    counts = {"requests": 0, "lost": 0, "tokens": 0}
    lock = threading.Lock()
    warm = threading.Barrier(clients + 1)
    stop = [float("inf")]

    def client(c: int) -> None:
        i, first = c, True
        while time.perf_counter() < stop[0]:
            r = stream_completion(port, prompts[i % len(prompts)], new_tokens)
            with lock:
                counts["requests"] += 1
                counts["lost"] += not r["complete"]
                counts["tokens"] += r["tokens"]
            i += clients
            if first:
                first = False
                warm.wait()  # (its next request goes out at once: the barrier only marks the time)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    warm.wait()
    start = time.perf_counter()
    stop[0] = start + seconds
    samples = []
    while any(t.is_alive() for t in threads):
        samples.append((time.perf_counter() - start, current_rss(pid), current_rss(pid, "RssShmem")))
        time.sleep(every)
    for t in threads:
        t.join()
    rss = [r for _, r, _ in samples]
    shmem = [s for _, _, s in samples]
    third = max(1, len(rss) // 3)
    first, last = statistics.mean(rss[:third]), statistics.mean(rss[-third:])
    return {**counts, "warm_up_s": start - begin, "wall_s": time.perf_counter() - start, "samples": samples,
            "rss_first_third": first, "rss_last_third": last, "rss_max": max(rss),
            "shmem_first_third": statistics.mean(shmem[:third]), "shmem_last_third": statistics.mean(shmem[-third:]),
            "flat": last <= 1.05 * first + (16 << 20)}  # fmt: skip


def divergences(
    model, results: list[dict], new_tokens: int, check: int, kv_dtype: str = "float32"
) -> list[dict]:
    """The first `check` replies against `generate` alone (its KV cache in the server's dtype); each difference
    with its logit margin."""
    out = []
    for r in results[:check]:
        want = tinyqwen.generate(model, r["prompt"], new_tokens, eos_token_ids=(), kv_dtype=kv_dtype)
        got = r["ids"] or []
        if got == want:
            continue
        p = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
        )
        item = {"prompt_tokens": len(r["prompt"]), "position": p, "got": len(got), "want": len(want)}
        if p < len(got) and p < len(want):
            logits = model(np.asarray(r["prompt"] + want[:p]))[-1]
            item["logit_margin"] = float(logits[want[p]] - logits[got[p]])
        out.append(item)
    return out


def scheduler_itl(port: int) -> tuple[float, int]:
    """tinyqwen's inter-token latency as its scheduler measured it so far (/metrics: the histogram's sum, count).
    Against the clients' it tells what HTTP and SSE add between the engine and a client; (0, 0) if not served."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except OSError:
        return 0.0, 0
    values = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("tinyqwen_inter_token")
    )
    name = "tinyqwen_inter_token_latency_seconds"
    return float(values.get(f"{name}_sum", 0)), int(float(values.get(f"{name}_count", 0)))


def run_cells(args, port: int, pid: int, engine: str, workload: str, c: int, check_model) -> list[dict]:
    """One workload at `c` clients: the burst, then the steady phase; a line printed for each (and for the burst,
    where the CPU time went: the server's event loop, its model threads, the clients in this process)."""
    new_tokens = max(2, int(WORKLOADS[workload][1] * args.scale))
    prompts = prompts_for(workload, c, 1, args.scale, seed=c)
    before = scheduler_itl(port) if engine == "tinyqwen" else (0.0, 0)
    (results, wall), cpu = cpu_share(pid, lambda: run_burst(port, prompts, new_tokens))
    after = scheduler_itl(port) if engine == "tinyqwen" else (0.0, 0)
    cells = [{"engine": engine, "workload": workload, "clients": c, "phase": "burst", **summarize(results, wall),
              **cpu}]  # fmt: skip
    if after[1] > before[1]:  # the mean ITL at the scheduler, over the same burst
        cells[0]["itl_mean_scheduler"] = (after[0] - before[0]) / (after[1] - before[1])
    if engine == "tinyqwen" and check_model is not None:
        cells[0]["divergences"] = divergences(
            check_model, results, new_tokens, args.check, args.kv_dtype or "float32"
        )
        cells[0]["checked"] = min(args.check, len(results))
    if args.requests:
        prompts = prompts_for(workload, c, args.requests, args.scale, seed=1000 + c)
        spread = cells[0]["mean_request_s"] if c > 1 else 0.0
        results, wall, window = run_steady(port, prompts, c, new_tokens, spread)
        cells.append({"engine": engine, "workload": workload, "clients": c, "phase": "steady",
                      **summarize(results, wall, window)})  # fmt: skip
    for cell in cells:
        div = ""
        if "divergences" in cell:
            d = cell["divergences"]
            div = f", {cell['checked'] - len(d)}/{cell['checked']} equal to generate alone"
            div += "".join(
                f" [diverged at {x['position']}, margin {x.get('logit_margin', 'n/a')}]" for x in d
            )
        print(f"{engine:9s} {workload:6s} {c:3d} clients {cell['phase']:6s}: {cell['tok_per_s']:7.1f} tok/s, TTFT "
              f"p50 {cell['ttft_p50']:6.2f} s p95 {cell['ttft_p95']:6.2f} s, ITL p50 {cell['itl_p50'] * 1e3:6.0f} ms "
              f"p95 {cell['itl_p95'] * 1e3:6.0f} ms, {cell['requests']} requests, lost {cell['lost']}{div}",
              flush=True)  # fmt: skip
    burst = cells[0]
    if "itl_mean_scheduler" in burst:
        at, sent = burst["itl_mean_scheduler"], burst["itl_mean"]
        print(f"{engine:9s} {workload:6s} {c:3d} clients burst  ITL mean at the scheduler {at * 1e3:.0f} ms, at the "
              f"clients {sent * 1e3:.0f} ms (HTTP/SSE in between: {(sent - at) * 1e3:+.0f} ms)", flush=True)  # fmt: skip
    if burst["cpu_model_s"] > 0:
        main, rest = (
            ("event loop", "model threads") if engine == "tinyqwen" else ("main thread", "other threads")
        )
        print(f"{engine:9s} {workload:6s} {c:3d} clients burst  CPU: server {rest} {burst['cpu_model_s']:.1f} s, "
              f"{main} {burst['cpu_loop_s']:.1f} s, clients {burst['cpu_clients_s']:.1f} s, over "
              f"{burst['cpu_wall_s']:.1f} s of wall time ({os.cpu_count()} cores)", flush=True)  # fmt: skip
    return cells


def print_summary(cells: list[dict], workload: str, engines: list[str]) -> None:
    """Each phase's aggregate against one client; the TTFT target; tinyqwen against llama.cpp."""

    def table(engine: str, phase: str) -> dict:
        return {c["clients"]: c for c in cells
                if c["engine"] == engine and c["workload"] == workload and c["phase"] == phase}  # fmt: skip

    for engine in engines:
        for phase in ("burst", "steady"):
            t = table(engine, phase)
            if 1 in t and len(t) > 1:
                gains = ", ".join(f"{c}: {t[c]['tok_per_s'] / t[1]['tok_per_s']:.1f}×" for c in t if c > 1)
                print(f"{engine:9s} {workload:6s} {phase:6s} aggregate tok/s vs 1 client: {gains}")
        one, steady = table(engine, "burst").get(1), table(engine, "steady")
        if one is not None:  # 3x the one-client TTFT plus one prefill (alone, a prefill is the TTFT)
            target = 4 * one["ttft_p50"]
            met = ", ".join(f"{c}: {t['ttft_p95']:.2f} s ({'met' if t['ttft_p95'] < target else 'NOT met'})"
                            for c, t in steady.items() if c > 1)  # fmt: skip
            if met:
                print(f"{engine:9s} {workload:6s} steady TTFT p95 vs target {target:.2f} s "
                      f"(4 x one client's {one['ttft_p50']:.2f} s): {met}")  # fmt: skip
    if len(engines) > 1:
        for phase in ("burst", "steady"):
            ours, peer = table("tinyqwen", phase), table(engines[1], phase)
            ratios = ", ".join(
                f"{c}: {ours[c]['tok_per_s'] / peer[c]['tok_per_s']:.2f}×" for c in ours if c in peer
            )
            if ratios:
                print(f"tinyqwen / {engines[1]} {workload:6s} {phase:6s} aggregate tok/s: {ratios}")


def run_soak(args, port: int, pid: int, clients: list[int], workload: str) -> dict:
    c = max(clients)
    new_tokens = max(2, int(WORKLOADS[workload][1] * args.scale))
    prompts = prompts_for(workload, c, 4, args.scale, seed=7)
    result = soak(port, pid, prompts, c, new_tokens, args.soak, args.soak_every)
    mib = 2**20
    print(f"soak: {c} clients, {workload}, {result['warm_up_s']:.0f} s of warm-up (each client's first reply), then "
          f"{result['wall_s']:.0f} s, {result['requests']} requests ({result['tokens']} tokens, lost {result['lost']});"
          f" RSS first third {result['rss_first_third'] / mib:.0f} MiB, last third "
          f"{result['rss_last_third'] / mib:.0f} MiB, max {result['rss_max'] / mib:.0f} MiB: "
          f"{'flat' if result['flat'] else 'GROWING'}; of which shared anonymous (a KV pool's written pages) "
          f"{result['shmem_first_third'] / mib:.0f} and {result['shmem_last_third'] / mib:.0f} MiB", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: chapter 9's tiny Qwen3)")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--workload", default="decode,prompt", help="decode, prompt or both")
    parser.add_argument("--requests", "--rounds", dest="requests", type=int, default=2,
                        help="requests per client in each cell's steady phase (0: burst only; 2+ for a window "
                             "in which every client is active)")  # fmt: skip
    parser.add_argument(
        "--scale", type=float, default=1.0, help="scale prompt lengths and new tokens (quick runs)"
    )
    parser.add_argument(
        "--check", type=int, default=4, help="tinyqwen replies per cell checked against generate"
    )
    parser.add_argument(
        "--max-batch", type=int, default=None, help="tinyqwen serve --max-batch (and llama's slots)"
    )
    parser.add_argument("--prefill-chunk", type=int, default=None, help="tinyqwen serve --prefill-chunk")
    parser.add_argument("--kv-budget", default=None, help="tinyqwen serve --kv-budget, e.g. 2GiB")
    parser.add_argument("--kv-dtype", default=None, choices=("float32", "bfloat16"),
                        help="tinyqwen serve --kv-dtype (the checked replies' generate uses it too)")  # fmt: skip
    parser.add_argument("--matmul-precision", default=None, choices=("highest", "medium"),
                        help="tinyqwen serve --matmul-precision (and the checking model's)")  # fmt: skip
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary: the peer, in the same run")
    parser.add_argument("--gguf", help="the same weights as GGUF, for llama-server")
    parser.add_argument("--threads", type=int, default=2, help="llama-server threads")
    parser.add_argument("--soak", type=float, default=0, help="seconds of soak (instead of the cells)")
    parser.add_argument("--soak-every", type=float, default=5.0, help="seconds between two RSS samples")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    folder = Path(args.model) if args.model else tiny_model()
    clients = [int(c) for c in args.clients.split(",")]
    workloads = [w.strip() for w in args.workload.split(",")]
    precision = args.matmul_precision or "highest"
    check_model = (
        tinyqwen.load_model(folder, backend=args.backend, matmul_precision=precision) if args.check else None
    )
    flags = (
        ("max-batch", args.max_batch),
        ("prefill-chunk", args.prefill_chunk),
        ("kv-budget", args.kv_budget),
        ("kv-dtype", args.kv_dtype),
        ("matmul-precision", args.matmul_precision),
    )
    extra = [f"--{k}={v}" for k, v in flags if v]
    engines = {"tinyqwen": lambda port: start_tinyqwen(folder, args.backend, port, extra)}
    if args.llama_server and args.gguf:
        slots = args.max_batch or 16
        ctx = int(max(hi for (_, hi), _ in WORKLOADS.values()) * args.scale) + int(128 * args.scale) + 64
        engines["llama.cpp"] = lambda port: start_llama(
            args.llama_server, args.gguf, port, slots, ctx, args.threads
        )
    elif args.llama_server or args.gguf:
        raise SystemExit("--llama-server and --gguf go together")

    report = {"model": folder.name, "backend": args.backend, "kv_dtype": args.kv_dtype or "float32",
              "matmul_precision": precision, "cells": []}  # fmt: skip
    print(f"{folder.name} ({args.backend}, KV {report['kv_dtype']}, matmul {precision}); load average {os.getloadavg()[0]:.1f} at the start (a shared machine "
          "disturbs every figure: compare engines within this run)")  # fmt: skip
    for engine, start in engines.items():
        port = free_port()
        proc = start(port)
        try:
            warm_up(port)
            if args.soak:
                report.setdefault("soak", {})[engine] = run_soak(args, port, proc.pid, clients, workloads[0])
            else:
                for workload in workloads:
                    for c in clients:
                        report["cells"] += run_cells(args, port, proc.pid, engine, workload, c, check_model)
            report.setdefault("peak_rss_mib", {})[engine] = peak_rss(proc.pid) / 2**20
            print(f"{engine:9s} peak RSS {report['peak_rss_mib'][engine]:.0f} MiB", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    for workload in workloads:
        print_summary(report["cells"], workload, list(engines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if any(c["lost"] for c in report["cells"]) or any(x["lost"] for x in report.get("soak", {}).values()):
        raise SystemExit("some requests were lost")


if __name__ == "__main__":
    main()
