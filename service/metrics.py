"""Prometheus metrics of one service (GET /metrics), vLLM's names under the ``cogvlm2:`` prefix.

Latencies are observed where every protocol reads its request's outputs (``Handle.batches``), so all
routes count alike: time to first token and end-to-end latency per sequence from its submission, the
inter-token latency per engine step that gave a sequence tokens. Engine state (running / waiting
requests, KV cache use, prefix and vision cache counters) is read at scrape time by a collector. HTTP
errors are counted by route template and class (4xx / 5xx) by the access-log layer (service/observe.py).
Each ``Metrics`` has its own registry: several services in one process do not share counts.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "cogvlm2:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector(Collector):
    """Engine state at scrape time: ``source()`` returns the engine (None before there is one)."""

    def __init__(self, source):
        self.source = source

    def collect(self) -> Iterator:
        engine = self.source()
        if engine is None:
            return
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in the running batch.",
                                value=engine.num_running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.",
                                value=engine.num_waiting)
        blocks = engine.blocks
        used = 1.0 - blocks.num_free / blocks.num_blocks if blocks.num_blocks else 0.0
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "KV cache blocks in use (1 = all).", value=used)
        stats = engine.cache_stats()
        prefix, vision = stats["prefix_cache"], stats["vision_cache"]
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=prefix["queries"])
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=prefix["hits"])
        yield CounterMetricFamily(PREFIX + "vision_cache_queries", "Videos looked up in the vision-feature cache.",
                                  value=vision["hits"] + vision["misses"])
        yield CounterMetricFamily(PREFIX + "vision_cache_hits", "Videos whose features were in the cache.",
                                  value=vision["hits"])


class Metrics:
    """The service's metrics; ``engine_source`` gives the engine to read at scrape time."""

    def __init__(self, engine_source=lambda: None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "Time from submission to the first generated token.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(PREFIX + "inter_token_latency_seconds",
                                             "Time between two engine steps that gave a sequence tokens.",
                                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(PREFIX + "e2e_request_latency_seconds",
                                             "Time from submission to a sequence's end.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of submitted sequences.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Sequences that ended, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.http_errors = Counter(PREFIX + "http_request_errors", "HTTP error responses by route and class.",
                                   ["route", "status_class"], registry=r)
        r.register(_EngineCollector(engine_source))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def http_error(self, route: str, status: int) -> None:
        if status >= 400:
            self.http_errors.labels(route=route, status_class=f"{status // 100}xx").inc()


class SequenceTimer:
    """The latency observations of one HTTP request's sequences (fed by ``Handle.batches``)."""

    def __init__(self, metrics: Metrics | None, submit_time: float, count: int, prompt_tokens: int):
        self.metrics = metrics
        self.submit_time = submit_time
        self.last: list[float | None] = [None] * count
        if metrics is not None:
            metrics.prompt_tokens.inc(prompt_tokens * count)

    def tokens(self, index: int, count: int, at: float) -> None:
        if self.metrics is None or not count:
            return
        previous = self.last[index]
        if previous is None:
            self.metrics.time_to_first_token.observe(max(0.0, at - self.submit_time))
        else:
            self.metrics.inter_token_latency.observe(max(0.0, at - previous))
        self.last[index] = at
        self.metrics.generation_tokens.inc(count)

    def finished(self, reason: str | None, at: float) -> None:
        if self.metrics is None:
            return
        self.metrics.e2e_request_latency.observe(max(0.0, at - self.submit_time))
        self.metrics.request_success.labels(finished_reason=reason or "unknown").inc()
