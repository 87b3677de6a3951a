"""The server's counters, and `/metrics` in Prometheus' text format (what vLLM and llama.cpp's server expose).

    # TYPE tinyqwen_requests_total counter
    tinyqwen_requests_total{outcome="finished"} 12
    # TYPE tinyqwen_time_to_first_token_seconds histogram
    tinyqwen_time_to_first_token_seconds_bucket{le="0.1"} 3
    ...

Counters only go up; gauges are read when asked (`active sequences`, `queue length`); a histogram counts how many
observations fell at or below each bucket's upper edge (`le`, cumulative), plus their sum and count, so a
dashboard can compute percentiles over any window. The engine's thread writes, the HTTP thread reads: each update
is a few integer additions under one lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)  # seconds
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)  # seconds


class Histogram:
    """Cumulative buckets, Prometheus style.

    >>> h = Histogram((0.1, 1.0)); h.observe(0.05); h.observe(0.5); h.observe(3.0)
    >>> h.lines("x")[:3]
    ['x_bucket{le="0.1"} 1', 'x_bucket{le="1.0"} 2', 'x_bucket{le="+Inf"} 3']
    """

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.bounds):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge}"}} {n}' for edge, n in zip(self.bounds, self.counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]  # fmt: skip


class Metrics:
    """What `/metrics` reports; the engine calls the `on_*` methods."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {"finished": 0, "cancelled": 0, "error": 0, "rejected": 0}
        self.prompt_tokens = self.generation_tokens = self.steps = 0
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s of decode steps

    def on_tokens(self, n: int, now: float) -> None:
        with self.lock:
            self.generation_tokens += n
            self.steps += 1
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - 10.0:
                self.recent.popleft()

    def on_first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def on_next_token(self, seconds: float) -> None:
        with self.lock:
            self.itl.observe(seconds)

    def on_request(self, outcome: str, prompt_tokens: int = 0) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens

    def tokens_per_second(self, now: float | None = None) -> float:
        """Generated tokens per second over the last 10 seconds."""
        now = time.perf_counter() if now is None else now
        with self.lock:
            recent = [n for t, n in self.recent if t >= now - 10.0]
        return sum(recent) / 10.0

    def text(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The Prometheus exposition; `gauges`: name -> (help, value), read from the engine at this moment."""
        p = "tinyqwen_"
        out = [f"# HELP {p}requests_total Requests by how they ended.", f"# TYPE {p}requests_total counter"]
        with self.lock:
            out += [f'{p}requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
            for name, what, value in (
                ("prompt_tokens_total", "Prompt tokens prefilled.", self.prompt_tokens),
                ("generation_tokens_total", "Tokens generated.", self.generation_tokens),
                ("decode_steps_total", "Batched decode steps run.", self.steps),
            ):
                out += [f"# HELP {p}{name} {what}", f"# TYPE {p}{name} counter", f"{p}{name} {value}"]
            histograms = (
                ("time_to_first_token_seconds", "From joining the queue to the first token.", self.ttft),
                ("inter_token_latency_seconds", "Between two tokens of one reply.", self.itl),
            )
            for name, what, h in histograms:
                out += [f"# HELP {p}{name} {what}", f"# TYPE {p}{name} histogram", *h.lines(p + name)]
        gauges = {**gauges, "tokens_per_second": ("Tokens generated per second, last 10 s.",
                                                  self.tokens_per_second())}  # fmt: skip
        for name, (what, value) in gauges.items():
            out += [f"# HELP {p}{name} {what}", f"# TYPE {p}{name} gauge", f"{p}{name} {value:g}"]
        return "\n".join(out) + "\n"
