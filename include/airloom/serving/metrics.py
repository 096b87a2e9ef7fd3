"""Prometheus metrics of one server app, in their own ``CollectorRegistry`` (tests build several apps
in one process; the global registry would refuse the second set of names).

Request counts and latency are recorded by the app's middleware for every response, 401/413/429
included; time to first token and token counts by the generation handlers (a non-streamed answer's
first token reaches the client with the last one, so its TTFT is its latency; a stream observes it
at its first chunk). Batch sizes, queue depth, the served version and reloads are read from the
engine when scraped, so the engine keeps no reference to the metrics.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Seconds: a tiny CPU model answers in tens of ms, a 7B model on a busy GPU in tens of seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _EngineCollector:
    """Engine state read at scrape time."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self):
        engine = self.engine
        sizes = dict(engine.batch_sizes)  # a copy: the generation thread updates it
        buckets = [(str(le), sum(n for size, n in sizes.items() if size <= le)) for le in BATCH_BUCKETS]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily(
            "airloom_batch_size",
            "Rows per generate call",
            buckets=buckets,
            sum_value=sum(size * n for size, n in sizes.items()),
        )
        yield GaugeMetricFamily(
            "airloom_queue_depth", "Requests waiting for a batch", value=engine.queue_depth
        )
        version = GaugeMetricFamily(
            "airloom_model_version",
            "The served registry version (1); versions served before an alias move (0)",
            labels=["name", "version"],
        )
        current = engine.current
        earlier = {r["from"] for r in engine.reloads} - {current.ref}
        for ref in sorted(earlier):
            name, _, number = ref.rpartition("/")
            version.add_metric([name, number], 0)
        version.add_metric([current.name, str(current.version)], 1)
        yield version
        yield CounterMetricFamily(
            "airloom_model_reloads", "Alias moves the server followed", value=len(engine.reloads)
        )


class _LogCollector:
    """The ``s3://`` traffic and feedback logs' batching writers, read at scrape time."""

    def __init__(self, logs: dict[str, Any]) -> None:
        self.logs = logs

    def collect(self):
        stats = {name: log.stats() for name, log in self.logs.items()}
        stats = {name: s for name, s in stats.items() if s is not None}
        if not stats:
            return
        for metric, help_, key in (
            ("airloom_log_objects_written", "Batch objects the log wrote to S3", "objects_written"),
            ("airloom_log_records_written", "Records the log wrote to S3", "records_written"),
            (
                "airloom_log_records_dropped",
                "Records the log dropped (memory bound reached, S3 down)",
                "records_dropped",
            ),
            (
                "airloom_log_upload_failures",
                "Failed writes of batch objects (each is retried)",
                "upload_failures",
            ),
        ):
            family = CounterMetricFamily(metric, help_, labels=["log"])
            for name, s in stats.items():
                family.add_metric([name], s[key])
            yield family
        pending = GaugeMetricFamily(
            "airloom_log_pending_records", "Records held in memory, not yet written to S3", labels=["log"]
        )
        for name, s in stats.items():
            pending.add_metric([name], s["pending"]["records"])
        yield pending


class ServingMetrics:
    """The app's metric objects; ``render()`` is the ``/metrics`` body and its content type."""

    def __init__(self, engine: Any = None, logs: dict[str, Any] | None = None) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "airloom_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=reg
        )
        self.latency = Histogram(
            "airloom_request_latency_seconds",
            "Request latency (to the last byte of the response)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "airloom_time_to_first_token_seconds",
            "Time to the first generated token sent (non-streamed: the latency)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "airloom_prompt_tokens", "Prompt tokens of answered requests", ["endpoint"], registry=reg
        )
        self.completion_tokens = Counter(
            "airloom_completion_tokens", "Generated tokens of answered requests", ["endpoint"], registry=reg
        )
        if engine is not None:
            reg.register(_EngineCollector(engine))
        if logs:
            reg.register(_LogCollector(logs))

    def observe_ttft(self, endpoint: str, started: float) -> None:
        """``started`` is the request's ``time.monotonic()``."""
        self.ttft.labels(endpoint).observe(time.monotonic() - started)

    def count_tokens(self, endpoint: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(endpoint).inc(prompt_tokens)
        self.completion_tokens.labels(endpoint).inc(completion_tokens)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
