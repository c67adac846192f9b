"""Prometheus metrics of the server, under vLLM's metric names (``vllm:...``) so that vLLM's
dashboards read them. One registry per server (tests run several in one process).

With several front ends (``serve --api-server-count N``), prometheus_client's multiprocess mode:
each front end writes its values to files in ``$PROMETHEUS_MULTIPROC_DIR`` (set before
prometheus_client is imported) and ``/metrics`` in any of them sums the counters and histograms
of all; the engine's gauges, the same in every front end, show the most recent value."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the server
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# fmt: off
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]
ITL_BUCKETS = [
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
]
E2E_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]
# fmt: on


class ServerMetrics:
    """Lives in the server's process: the output processor (``AsyncLLM``'s, on the event
    loop) records each request's tokens and latencies here; read by ``/metrics``.

    ``multiprocess_dir``: one of several front ends (see above); ``engine_counters``: this one
    counts the engine's own events (preemptions, prefix cache), which every front end hears of.
    """

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        multiprocess_dir: str | None = None,
        engine_counters: bool = True,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.engine_counters = engine_counters
        labels = ["model_name"]
        r = self.registry
        if multiprocess_dir is not None:  # the values live in files, summed by the collector
            multiprocess.MultiProcessCollector(self.registry, path=multiprocess_dir)
            r = None

        def labelled(metric):
            return metric.labels(model_name=model_name)

        self.running = labelled(
            Gauge(
                "vllm:num_requests_running",
                "Sequences running (scheduled) in the engine.",
                labels,
                registry=r,
                multiprocess_mode="mostrecent",
            )
        )
        self.waiting = labelled(
            Gauge(
                "vllm:num_requests_waiting",
                "Sequences waiting to be scheduled.",
                labels,
                registry=r,
                multiprocess_mode="mostrecent",
            )
        )
        self.kv_usage = labelled(
            Gauge(
                "vllm:kv_cache_usage_perc",
                "Share of KV-cache blocks in use (1 = full).",
                labels,
                registry=r,
                multiprocess_mode="mostrecent",
            )
        )
        self.prompt_tokens = labelled(
            Counter(
                "vllm:prompt_tokens", "Prompt tokens of the requests admitted.", labels, registry=r
            )
        )
        self.generation_tokens = labelled(
            Counter(
                "vllm:generation_tokens", "Output tokens generated (accepted).", labels, registry=r
            )
        )
        self.preemptions = labelled(
            Counter(
                "vllm:num_preemptions", "Sequences preempted (KV pool full).", labels, registry=r
            )
        )
        self.prefix_cache_queries = labelled(
            Counter(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in prompt tokens looked up.",
                labels,
                registry=r,
            )
        )
        self.prefix_cache_hits = labelled(
            Counter(
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in prompt tokens found cached.",
                labels,
                registry=r,
            )
        )
        self.ttft = labelled(
            Histogram(
                "vllm:time_to_first_token_seconds",
                "Time from arrival to the first token.",
                labels,
                buckets=TTFT_BUCKETS,
                registry=r,
            )
        )
        self.itl = labelled(
            Histogram(
                "vllm:inter_token_latency_seconds",
                "Time between a request's successive output deltas (one per step).",
                labels,
                buckets=ITL_BUCKETS,
                registry=r,
            )
        )
        self.e2e = labelled(
            Histogram(
                "vllm:e2e_request_latency_seconds",
                "Time from arrival to the last token.",
                labels,
                buckets=E2E_BUCKETS,
                registry=r,
            )
        )
        success = Counter(
            "vllm:request_success",
            "Requests finished, by finish reason.",
            labels + ["finished_reason"],
            registry=r,
        )
        self._success = lambda reason: success.labels(model_name=model_name, finished_reason=reason)

    # ---- engine hooks (replayed) -------------------------------------------------------------
    def request_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_tokens(self, seconds: float, count: int) -> None:
        """``count`` requests waited ``seconds`` since their last delta (a step's requests share
        their intervals: one call per distinct value, not per request)."""
        observe_many(self.itl, seconds, count)

    def generated(self, num_tokens: int) -> None:
        self.generation_tokens.inc(num_tokens)

    def request_finished(self, seconds: float, finish_reason: str) -> None:
        self.e2e.observe(seconds)
        self._success(finish_reason).inc()

    def engine_state(
        self,
        running: int,
        waiting: int,
        kv_usage: float,
        new_preemptions: int,
        new_prefix_cache_queries: int = 0,
        new_prefix_cache_hits: int = 0,
    ) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        if not self.engine_counters:
            return
        if new_preemptions:
            self.preemptions.inc(new_preemptions)
        if new_prefix_cache_queries:
            self.prefix_cache_queries.inc(new_prefix_cache_queries)
        if new_prefix_cache_hits:
            self.prefix_cache_hits.inc(new_prefix_cache_hits)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram, amount: float, count: int) -> None:
    """``histogram.observe(amount)`` ``count`` times, at the cost of one: a bucket and the sum
    incremented by ``count`` (prometheus_client has no such call; its histogram children keep
    ``_upper_bounds``, ``_buckets`` and ``_sum``, in memory or in multiprocess files alike)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    if bounds is None or count == 1:
        for _ in range(count):
            histogram.observe(amount)
        return
    histogram._sum.inc(amount * count)
    i = bisect_left(bounds, amount)  # the first bound >= amount (the last is +Inf)
    histogram._buckets[i].inc(count)
