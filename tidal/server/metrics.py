"""Prometheus metrics of the server (prometheus-client), with vLLM-like names under `tidal:`.

Owns: one registry per app (so several apps in one process do not collide), the request
histograms (TTFT, inter-token latency, end-to-end latency), counters (requests by finish reason,
prompt and generation tokens, from which tokens/s follows as a rate), and gauges read from the
engine's stats snapshot at scrape time (running, waiting, KV blocks and usage, prefix-cache hits).
Must not: change requests or engine state; it only observes.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        kv = s["kv"]
        for name, doc, value in (
                ("tidal:num_requests_running", "requests in the running batch", s["num_running"]),
                ("tidal:num_requests_waiting", "requests waiting to be scheduled", s["num_waiting"]),
                ("tidal:kv_cache_used_blocks", "KV cache blocks held by requests", kv["used"]),
                ("tidal:kv_cache_total_blocks", "KV cache blocks in the pool", kv["total"]),
                ("tidal:kv_cache_usage_perc", "fraction of KV cache blocks in use (0-1)", kv["usage"]),
                ("tidal:prefix_cache_hit_rate", "prefix-cache hit rate over all lookups (0-1)", kv["hit_rate"]),
                ("tidal:engine_healthy", "1 while the engine thread runs", 1 if self.engine.is_running else 0)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        counters = s.get("counters", {})
        for name, doc, value in (("tidal:prefix_cache_queries", "prefix-cache lookups (tokens)", kv["prefix_queries"]),
                                 ("tidal:prefix_cache_hits", "prefix-cache hits (tokens)", kv["prefix_hits"]),
                                 ("tidal:engine_requests_aborted", "requests the engine aborted (client gone, ...)",
                                  counters.get("aborted", 0)),
                                 ("tidal:jump_forward_tokens", "tokens a grammar forced, appended without a decode "
                                  "step (decode steps saved)", counters.get("jump_forward_tokens", 0))):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]
        self.requests = Counter("tidal:request_success", "finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("tidal:prompt_tokens", "prompt tokens of finished requests", labels, registry=r)
        self.generation_tokens = Counter("tidal:generation_tokens", "generated tokens", labels, registry=r)
        self.ttft = Histogram("tidal:time_to_first_token_seconds", "time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tidal:inter_token_latency_seconds", "time between output steps of a request",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tidal:e2e_request_latency_seconds", "arrival to last output", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))
        self.model_name = model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, arrival: float | None = None) -> "RequestTracker":
        return RequestTracker(self, arrival)


class RequestTracker:
    """Timings of one engine request (one prompt, all n choices), seen from the server's loop, so
    the latencies are what a client gets, queueing included."""

    def __init__(self, metrics: ServerMetrics, arrival: float | None = None):
        self.m = metrics
        self.arrival = time.monotonic() if arrival is None else arrival
        self.last_token_time: float | None = None
        self.last_output = None
        self.done = False

    def observe(self, output) -> None:
        now = time.monotonic()
        if any(o.delta_token_ids for o in output.outputs):
            name = self.m.model_name
            if self.last_token_time is None:
                self.m.ttft.labels(name).observe(now - self.arrival)
            else:
                self.m.itl.labels(name).observe(now - self.last_token_time)
            self.last_token_time = now
        self.last_output = output
        if output.finished:
            self.finish()

    def finish(self, aborted: bool = False) -> None:
        """Record the request once: at its final output, or when the client left (aborted)."""
        if self.done:
            return
        self.done = True
        name, out = self.m.model_name, self.last_output
        reasons = [o.finish_reason for o in out.outputs] if out is not None else []
        reason = "abort" if aborted or "abort" in reasons or not reasons else (reasons[0] or "abort")
        self.m.requests.labels(name, reason).inc()
        if out is not None:
            self.m.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
            self.m.generation_tokens.labels(name).inc(sum(len(o.token_ids) for o in out.outputs))
        self.m.e2e.labels(name).observe(time.monotonic() - self.arrival)
