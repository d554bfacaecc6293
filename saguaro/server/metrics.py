"""`GET /metrics`: Prometheus text from a registry of the app's own (two apps in one process, as in
the tests, never share counters). Requests and time to first token are counted by the server; the
engine's own figures (queue depth, tokens, prefix reuse, acceptance) are read from
`engine.metrics()` at each scrape, so they cannot drift from it."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: CPU serving spans tens of milliseconds (a warm prefix) to many seconds (a long prompt).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)

# engine.metrics() key -> (metric name, help); gauges are states, counters only grow.
ENGINE_GAUGES = {
    "queued": ("saguaro_queue_depth", "Requests waiting for a place in the running batch."),
    "running": ("saguaro_running_requests", "Requests in the running batch."),
}
ENGINE_COUNTERS = {
    "finished": ("saguaro_engine_finished_requests", "Requests the engine finished."),
    "failed": ("saguaro_engine_failed_requests", "Requests that failed in the engine."),
    "cancelled": (
        "saguaro_engine_cancelled_requests",
        "Requests cancelled (client gone, stop string, shutdown).",
    ),
    "prompt_tokens": ("saguaro_prompt_tokens", "Prompt tokens submitted."),
    "generated_tokens": ("saguaro_generated_tokens", "Tokens generated."),
    "reused_prompt_tokens": ("saguaro_prefix_reused_tokens", "Prompt tokens served from the prefix cache."),
    "drafted": ("saguaro_draft_tokens", "Draft tokens proposed for verification."),
    "accepted": ("saguaro_accepted_draft_tokens", "Draft tokens the target accepted."),
}


class EngineCollector:
    """The engine's figures at scrape time; nothing while the models are still loading."""

    def __init__(self, read: Callable[[], dict | None]):
        self.read = read

    def collect(self):
        figures = self.read()
        if figures is None:
            return
        for key, (name, doc) in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=figures.get(key, 0))
        for key, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=figures.get(key, 0))
        drafted = figures.get("drafted", 0)
        yield GaugeMetricFamily(
            "saguaro_acceptance_rate",
            "Accepted draft tokens over drafted ones, since the start.",
            value=figures.get("accepted", 0) / drafted if drafted else 0.0,
        )


class ServerMetrics:
    def __init__(self, read_engine: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "saguaro_http_requests",
            "Completion requests by endpoint and HTTP status (499: the client went away).",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "saguaro_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(read_engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
