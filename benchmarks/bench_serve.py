"""Load test of `tinyqwen serve`: C concurrent streaming clients x R requests each, through the official openai client.

    python benchmarks/bench_serve.py                              # chapter 9's tiny real-vocabulary Qwen3
    python benchmarks/bench_serve.py --clients 16 --requests 20 --max-tokens 32
    python benchmarks/bench_serve.py --model path/to/Qwen3-0.6B --clients 4 --requests 2 --max-tokens 16

The server is `tinyqwen serve` in a process of its own (as in use; `--in-process` runs uvicorn in a thread of
this process instead, sharing its GIL with the clients) on 127.0.0.1 and a free port; each client is a thread with
its own `openai.OpenAI` client, streaming greedy chat completions with different prompts. Every response is checked:
complete (a finish chunk, then `[DONE]`), the right length, and its ids equal to `tinyqwen.generate` on the same
prompt (computed before the load starts), so a mixed-up or cut-off stream fails the run. Prints requests/s,
generated tokens/s, time to first token and latency (p50 / p95 / max); in-process also the worker's busy fraction.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tinyqwen  # noqa: E402
from tinyqwen.serve import create_app  # noqa: E402


def tiny_model():
    """Chapter 9's tiny Qwen3 (2 layers, hidden 32, the real 151,936-token vocabulary), written to a temp folder;
    `tinyqwen serve` gives it the bundled Qwen3 tokenizer."""
    from tinyqwen.testing import END_TO_END_SCALE, write_tiny_qwen3

    folder = Path(tempfile.mkdtemp(prefix="tinyqwen-bench-serve-"))
    write_tiny_qwen3(folder, seed=9, scale=END_TO_END_SCALE, with_tokenizer=False)
    return folder, tinyqwen.load_model(folder), tinyqwen.Tokenizer.qwen3(), "tiny-qwen3 (chapter 9)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_in_process(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return stop


def start_subprocess(folder: Path, backend: str, port: int):
    import openai

    cmd = [sys.executable, "-m", "tinyqwen.cli", "serve", "--model", str(folder), "--backend", backend, "--port",
           str(port), "--served-model-name", "m", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    while True:
        try:
            api.models.list()
            break
        except openai.APIConnectionError:
            if proc.poll() is not None:
                raise SystemExit("tinyqwen serve exited") from None
            time.sleep(0.2)

    def stop():
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)

    return stop


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: chapter 9's tiny Qwen3)")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--in-process", action="store_true", help="the server in a thread of this process")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args()
    import openai

    if args.model:
        folder = Path(args.model)
        model = tinyqwen.load_model(folder, backend=args.backend)
        tok, name = tinyqwen.Tokenizer.from_pretrained(folder), folder.name
    else:
        folder, model, tok, name = tiny_model()
    eos = tuple(model.generation_config.get("eos_token_id") or ())
    prompts = {(c, r): [{"role": "user", "content": f"Client {c}, request {r}: tell me something."}]
               for c in range(args.clients) for r in range(args.requests)}  # fmt: skip
    t = time.perf_counter()
    want = {k: tinyqwen.generate(model, tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False),
                                 args.max_tokens, eos_token_ids=eos) for k, m in prompts.items()}  # fmt: skip
    alone = time.perf_counter() - t

    load_before = os.getloadavg()[0]
    port = free_port()
    app = create_app(model, tok, "m") if args.in_process else None
    stop = start_in_process(app, port) if app is not None else start_subprocess(folder, args.backend, port)

    def client(c: int) -> list[dict]:
        api = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600
        )
        out = []
        for r in range(args.requests):
            start = time.perf_counter()
            first = None
            chunks = []
            for chunk in api.chat.completions.create(model="m", messages=prompts[c, r], max_tokens=args.max_tokens,
                                                     temperature=0, stream=True,
                                                     extra_body={"return_token_ids": True}):  # fmt: skip
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                chunks.append(chunk)
            end = time.perf_counter() - start
            last = chunks[-1].choices[0]
            ok = last.finish_reason in ("stop", "length") and last.token_ids == want[c, r]
            out.append({"key": (c, r), "ok": ok, "ttft": first if first is not None else end, "latency": end,
                        "tokens": len(last.token_ids or [])})  # fmt: skip
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
    wall = time.perf_counter() - start
    stop()

    bad = [r["key"] for r in results if not r["ok"]]
    records = app.state.service.engine.records if app is not None else []
    busy = sum(r.finished - r.started for r in records) / wall if records else None
    tokens = sum(r["tokens"] for r in results)
    ttft, latency = [r["ttft"] for r in results], [r["latency"] for r in results]
    report = {
        "model": name, "backend": args.backend, "server": "in-process thread" if app else "tinyqwen serve process", "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "responses": len(results), "complete_and_correct": len(results) - len(bad),
        "wall_s": wall, "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
        "generate_alone_tokens_per_s": sum(map(len, want.values())) / alone,
        "ttft_s": {"p50": statistics.median(ttft), "p95": pct(ttft, 0.95), "max": max(ttft)},
        "latency_s": {"p50": statistics.median(latency), "p95": pct(latency, 0.95), "max": max(latency)},
        "worker_busy_fraction": busy,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{name} ({args.backend}, {report['server']}): {args.clients} streaming clients x {args.requests} requests, "
              f"max_tokens {args.max_tokens}, greedy")  # fmt: skip
        print(f"  {report['complete_and_correct']}/{len(results)} responses complete and equal to generate")
        print(f"  wall {wall:.2f} s: {report['requests_per_s']:.1f} requests/s, {report['tokens_per_s']:.0f} "
              f"generated tokens/s (generate alone, no server: {report['generate_alone_tokens_per_s']:.0f} tok/s)")  # fmt: skip
        print(f"  time to first token: p50 {report['ttft_s']['p50'] * 1e3:.0f} ms, p95 "
              f"{report['ttft_s']['p95'] * 1e3:.0f} ms, max {report['ttft_s']['max'] * 1e3:.0f} ms")  # fmt: skip
        print(f"  latency:             p50 {report['latency_s']['p50'] * 1e3:.0f} ms, p95 "
              f"{report['latency_s']['p95'] * 1e3:.0f} ms, max {report['latency_s']['max'] * 1e3:.0f} ms")  # fmt: skip
        if busy is not None:
            print(f"  worker busy {busy:.0%} of the wall time")
        print(f"  load average {report['load_average_before_after'][0]:.1f} before the load, "
              f"{report['load_average_before_after'][1]:.1f} after")  # fmt: skip
    if bad:
        raise SystemExit(f"{len(bad)} responses were incomplete or wrong: {bad[:5]}")


if __name__ == "__main__":
    main()
