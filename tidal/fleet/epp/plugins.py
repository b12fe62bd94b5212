"""The EPP's plug-ins: filters, scorers and the picker that the pipeline (picker.py) runs in order.

Owns: `ScoringContext` (what the plug-ins know about one request), the filters (health, role,
model, saturation), the scorers (each returns 0..1 per endpoint, 1 = best: prefix-cache hit
fraction, queue depth, KV-cache utilisation, running requests, session affinity) and
`MaxScorePicker` (highest weighted sum; ties broken by least load or at random), and
`RoundRobinPicker` (scores ignored: the baseline `picker: {type: round_robin}`). Load figures are
the pool's last poll plus the requests dispatched since (`EndpointState.load`), so a burst sees
its own earlier picks.
Must not: poll, tokenize, queue, or keep state beyond a scorer's own memory (the session map).
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from tidal.fleet.epp.config import SaturationConfig
from tidal.fleet.epp.pool import EndpointState
from tidal.fleet.epp.request import RoutingRequest


@dataclass
class ScoringContext:
    request: RoutingRequest
    model: str | None = None
    hashes: list[int] = field(default_factory=list)          # the prompt's full-block hashes
    prefix_blocks: dict[str, int] = field(default_factory=dict)   # endpoint -> longest held prefix (blocks)
    session_id: str | None = None


class Filter(Protocol):
    name: str

    def __call__(self, ctx: ScoringContext, endpoints: list[EndpointState]) -> list[EndpointState]: ...


class Scorer(Protocol):
    name: str

    def score(self, ctx: ScoringContext, endpoints: list[EndpointState]) -> dict[str, float]: ...


# ---- filters ----------------------------------------------------------------------------------
class HealthFilter:
    name = "health"

    def __call__(self, ctx, endpoints):
        return [e for e in endpoints if e.healthy]


class RoleFilter:
    """Endpoints serving `role` (prefill / decode) or both; role None keeps every endpoint."""
    name = "role"

    def __init__(self, role: str | None):
        self.role = role

    def __call__(self, ctx, endpoints):
        if self.role is None:
            return endpoints
        return [e for e in endpoints if e.role in (self.role, "both")]


class ModelFilter:
    """Endpoints serving the body's `model` (or whose model is not known yet). When none serves it,
    all are kept: the replica then answers the client with its own OpenAI 404."""
    name = "model"

    def __call__(self, ctx, endpoints):
        if not ctx.model:
            return endpoints
        kept = [e for e in endpoints if not e.models or ctx.model in e.models]
        return kept or endpoints


def is_saturated(e: EndpointState, limits: SaturationConfig) -> bool:
    return e.load >= limits.queue_depth or e.kv_usage >= limits.kv_cache


class SaturationFilter:
    """Endpoints below both saturation thresholds (waiting + dispatched-since-poll, KV usage)."""
    name = "saturation"

    def __init__(self, limits: SaturationConfig):
        self.limits = limits

    def __call__(self, ctx, endpoints):
        return [e for e in endpoints if not is_saturated(e, self.limits)]


# ---- scorers ----------------------------------------------------------------------------------
def _inverse(values: dict[str, float], scale: float) -> dict[str, float]:
    """0 -> 1, `scale` -> 0.5, falling smoothly beyond (scale / (scale + v)). An absolute scale, not
    min-max: with min-max, one request in flight against none is the scorer's whole weight, which
    outweighs a full prefix hit and sends a session's next turn away from the replica holding it."""
    scale = max(float(scale), 1e-9)
    return {k: scale / (scale + max(v, 0.0)) for k, v in values.items()}


class PrefixCacheScorer:
    """Fraction of the prompt's full blocks the endpoint holds as a prefix (0 with no full block)."""
    name = "prefix"

    def score(self, ctx, endpoints):
        n = len(ctx.hashes)
        return {e.address: (ctx.prefix_blocks.get(e.address, 0) / n if n else 0.0) for e in endpoints}


class QueueScorer:
    """Shorter waiting queue (as polled, plus what the EPP sent since) scores higher: 1 when empty,
    0.5 at `scale` (the saturation queue depth) waiting."""
    name = "queue"

    def __init__(self, scale: float = 5):
        self.scale = scale

    def score(self, ctx, endpoints):
        return _inverse({e.address: e.load for e in endpoints}, self.scale)


class RunningScorer:
    """Fewer running requests (a smaller batch, faster decoding) scores higher: 1 when idle, 0.5 at
    `scale` running."""
    name = "running"

    def __init__(self, scale: float = 8):
        self.scale = scale

    def score(self, ctx, endpoints):
        return _inverse({e.address: e.running for e in endpoints}, self.scale)


class KVCacheScorer:
    name = "kv_cache"

    def score(self, ctx, endpoints):
        return {e.address: min(max(1.0 - e.kv_usage, 0.0), 1.0) for e in endpoints}


class SessionAffinityScorer:
    """1 for the endpoint this session's last request went to, 0 elsewhere (LRU of sessions)."""
    name = "session"

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._where: OrderedDict[str, str] = OrderedDict()

    def score(self, ctx, endpoints):
        where = self._where.get(ctx.session_id) if ctx.session_id else None
        return {e.address: (1.0 if e.address == where else 0.0) for e in endpoints}

    def record(self, session_id: str | None, address: str) -> None:
        if session_id:
            self._where[session_id] = address
            self._where.move_to_end(session_id)
            while len(self._where) > self.capacity:
                self._where.popitem(last=False)

    def forget_endpoint(self, address: str) -> None:
        for s in [s for s, a in self._where.items() if a == address]:
            del self._where[s]


# ---- picker -----------------------------------------------------------------------------------
class MaxScorePicker:
    """Orders endpoints by total score; among equal best totals, `least_loaded` prefers the lowest
    (load, running, KV usage) and then chance, `random` picks by chance alone."""

    def __init__(self, tie_break: str = "least_loaded", rng: random.Random | None = None):
        self.tie_break = tie_break
        self.rng = rng or random.Random()

    def rank(self, endpoints: Sequence[EndpointState], totals: dict[str, float]) -> list[EndpointState]:
        shuffled = list(endpoints)
        self.rng.shuffle(shuffled)   # chance decides whatever the keys below leave equal

        def key(e: EndpointState):
            total = round(totals[e.address], 9)
            if self.tie_break == "least_loaded":
                return (-total, e.load, e.running, e.kv_usage)
            return (-total,)
        return sorted(shuffled, key=key)   # sorted is stable: equal keys keep the shuffled order


class RoundRobinPicker:
    """Ignores the scores: the candidate whose address comes next after the last one picked (in
    host:port order, wrapping), so a filtered-out endpoint is skipped rather than stalling the turn."""

    def __init__(self):
        self.last: tuple | None = None

    @staticmethod
    def _key(e: EndpointState) -> tuple:
        host, _, port = e.address.rpartition(":")
        return (host, int(port) if port.isdigit() else 0, e.address)

    def rank(self, endpoints: Sequence[EndpointState], totals: dict[str, float]) -> list[EndpointState]:
        order = sorted(endpoints, key=self._key)
        if not order:
            return order
        i = next((k for k, e in enumerate(order) if self.last is not None and self._key(e) > self.last), 0)
        ranked = order[i:] + order[:i]
        self.last = self._key(ranked[0])
        return ranked
