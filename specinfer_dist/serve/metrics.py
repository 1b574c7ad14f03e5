"""Prometheus metrics of one replica, named like vLLM's with our own prefix.

Engine totals and gauges are read from the engine at scrape time (no second bookkeeping);
latencies are observed as each request streams through ``Metrics.timed``.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specinfer_dist.engine.async_engine import RequestDelta
from specinfer_dist.serve.backend import ServingEngine

PREFIX = "specinfer_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = (  # (name, Counters field, help)
    ("prompt_tokens", "prompt_tokens", "Prompt tokens admitted."),
    # Hit rate = hits / queries (vLLM's vllm:prefix_cache_queries/hits): a preempted request's return is not a query.
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)."),
    ("generation_tokens", "generation_tokens", "Tokens generated."),
    ("request_success", "requests_finished", "Requests that finished (EOS, stop string or max_tokens)."),
    ("request_aborted", "requests_aborted", "Requests dropped unfinished (client went away, step failed)."),
    ("request_failure", "requests_failed", "Requests ended by an error in their own processing (logged by id)."),
    ("spec_decode_num_drafts", "spec_decode_num_drafts", "Verification steps that carried a draft."),
    ("spec_decode_num_draft_tokens", "spec_decode_num_draft_tokens", "Drafted tokens verified."),
    ("spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens", "Drafted tokens the LLM accepted."),
)


class _EngineCollector(Collector):
    """The engine's totals and gauges; none while the replica is still loading its engine."""

    def __init__(self, engine: Callable[[], ServingEngine | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        if engine is None:
            return
        counters = engine.counters
        for name, attr, doc in _COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=getattr(counters, attr))
        per_pos = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Drafted tokens accepted at each tree depth (position 0 = first drafted token).", labels=["position"],
        )
        for pos, n in enumerate(list(counters.spec_decode_num_accepted_tokens_per_pos)):
            per_pos.add_metric([str(pos)], n)
        yield per_pos
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in the running batch.", engine.num_running())
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests queued for the batch.", engine.num_waiting())
        kv_usage = getattr(engine, "kv_usage", None)  # only engines with a bounded KV pool have one
        usage = kv_usage() if kv_usage else None
        if usage is not None:
            yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of the LLM's KV blocks in use.", usage)


class Metrics:
    def __init__(self, engine: Callable[[], ServingEngine | None]) -> None:
        """``engine``: the replica's engine once loaded, else None."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.api_requests = Counter(
            PREFIX + "api_requests", "Generation requests answered, by protocol and status.",
            ["protocol", "status"], registry=self.registry,
        )
        self.stream_errors = Counter(
            PREFIX + "api_stream_errors", "HTTP streams that ended with an in-band error after their 200, by error status.",
            ["protocol", "status"], registry=self.registry,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first token.", registry=self.registry,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time per generated token after the first (a step's wait, spread over the tokens it accepted).",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to last token, for requests that finished.",
            registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def timed(self, stream: AsyncIterator[RequestDelta]) -> AsyncIterator[RequestDelta]:
        """``stream``'s deltas, passed through while their latencies are observed."""
        start = last = time.perf_counter()
        first = True
        async with aclosing(stream):
            async for delta in stream:
                now = time.perf_counter()
                if first:
                    self.ttft.observe(now - start)
                elif delta.token_ids:
                    per_token = (now - last) / len(delta.token_ids)
                    for _ in delta.token_ids:
                        self.itl.observe(per_token)
                first, last = False, now
                yield delta
                if delta.finished:
                    self.e2e.observe(now - start)
