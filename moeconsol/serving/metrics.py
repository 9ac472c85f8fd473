"""The server's Prometheus metrics (prometheus_client), one registry per app: per-model counters
of requests, cancellations, generated tokens and swaps, the swap-time summary, the
time-to-first-token histogram, and gauges of batch sizes, queue lengths and resident bytes."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from .engine import Completion, FinishReason
from .runtime import SwapReport

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Per-model counters, the swap summary, the time-to-first-token histogram and gauges of
    batch sizes, queue lengths and resident bytes, in one prometheus_client registry per app."""

    def __init__(self, models: Sequence[str]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moeconsol_requests", "Completed generation requests.", ["model"], registry=r)
        self.cancelled = Counter(
            "moeconsol_cancelled_requests", "Requests whose client went away before the end.", ["model"], registry=r
        )
        self.tokens = Counter("moeconsol_generated_tokens", "Tokens generated.", ["model"], registry=r)
        self.swaps = Counter("moeconsol_swaps", "Swaps that made this model active.", ["model"], registry=r)
        self.swap_bytes = Counter("moeconsol_swap_bytes", "Bytes copied by swaps to this model.", ["model"], registry=r)
        self.swap_seconds = Summary(
            "moeconsol_swap_seconds", "Time spent swapping to this model.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "moeconsol_time_to_first_token_seconds",
            "From arrival (queue and swap included) to the first token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.batch_size = Gauge(
            "moeconsol_batch_size", "Requests in this model's running or parked batch.", ["model"], registry=r
        )
        self.queue_length = Gauge(
            "moeconsol_queue_length", "Requests of this model waiting to be admitted.", ["model"], registry=r
        )
        self.resident = Gauge("moeconsol_resident_bytes", "Bytes held by the runtime.", ["part"], registry=r)
        for m in models:
            for metric in (
                self.requests,
                self.cancelled,
                self.tokens,
                self.swaps,
                self.swap_bytes,
                self.swap_seconds,
                self.ttft,
                self.batch_size,
                self.queue_length,
            ):
                metric.labels(m)

    def record(self, c: Completion) -> None:
        if c.finish_reason == FinishReason.CANCELLED.value:
            self.cancelled.labels(c.model).inc()
            return
        self.requests.labels(c.model).inc()
        self.tokens.labels(c.model).inc(len(c.token_ids))
        self.ttft.labels(c.model).observe(c.time_to_first_token)

    def swap(self, report: SwapReport) -> None:
        self.swaps.labels(report.model).inc()
        self.swap_bytes.labels(report.model).inc(report.bytes_moved)
        self.swap_seconds.labels(report.model).observe(report.seconds)

    def render(self, resident_bytes: dict[str, int] | None = None) -> bytes:
        for part, value in (resident_bytes or {}).items():
            self.resident.labels(part).set(value)
        return generate_latest(self.registry)
