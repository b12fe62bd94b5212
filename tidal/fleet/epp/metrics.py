"""The EPP's own Prometheus metrics (prometheus_client), under `tidal_epp:` (the ext_proc server's
`tidal_epp:decisions` / `tidal_epp:pick_seconds` sit beside them in the same registry).

Owns: the metric objects and their names, in one `CollectorRegistry` that the ext_proc server
exposes on the EPP's `/metrics` (`generate_latest(picker.metrics.registry)`).
Must not: decide anything; the pool, picker and flow control only count here.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SCORE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EPPMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter("tidal_epp:routed", "requests routed, by chosen endpoint", ["endpoint"],
                                 registry=r)
        self.scores = Histogram("tidal_epp:scorer_score", "each scorer's score (0-1) for the chosen endpoint",
                                ["scorer"], buckets=_SCORE_BUCKETS, registry=r)
        self.rejections = Counter("tidal_epp:rejections", "requests refused, by status and reason",
                                  ["status", "reason"], registry=r)
        self.prefix_blocks = Counter("tidal_epp:prompt_blocks", "full prompt blocks of routed requests", registry=r)
        self.prefix_hit_blocks = Counter("tidal_epp:prefix_hit_blocks",
                                         "of those, blocks the chosen endpoint was believed to hold", registry=r)
        self.queue_size = Gauge("tidal_epp:queue_size", "requests waiting in flow control, by priority",
                                ["priority"], registry=r)
        self.queue_wait = Histogram("tidal_epp:queue_wait_seconds", "time a dispatched request waited in the EPP",
                                    buckets=_WAIT_BUCKETS, registry=r)
        self.endpoint_healthy = Gauge("tidal_epp:endpoint_healthy", "1 while the endpoint is in rotation",
                                      ["endpoint"], registry=r)
        self.endpoint_in_flight = Gauge("tidal_epp:endpoint_dispatched_since_poll",
                                        "requests sent to the endpoint since its last metrics poll",
                                        ["endpoint"], registry=r)
        self.poll_failures = Counter("tidal_epp:poll_failures", "failed /metrics or /health polls", ["endpoint"],
                                     registry=r)
        self.kv_events = Counter("tidal_epp:kv_events", "KV events applied, by endpoint and kind",
                                 ["endpoint", "kind"], registry=r)
        self.kv_event_gaps = Counter("tidal_epp:kv_event_gaps", "KV event batches missed (sequence gaps)",
                                     ["endpoint"], registry=r)
