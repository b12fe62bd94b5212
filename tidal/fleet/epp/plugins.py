"""The EPP's plug-ins: filters, scorers and the picker that the pipeline (picker.py) runs in order.

Owns: `ScoringContext` (what the plug-ins know about one request), the filters (health, role,
model, saturation: prefix-aware, a replica holding most of the prompt is full only at higher
limits than a cold one), the scorers (each returns 0..1 per endpoint, 1 = best: prefix-cache hit
fraction, queue depth, KV-cache utilisation, running requests, spread of new prefixes, session
affinity) and
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
    held_blocks: dict[str, int] = field(default_factory=dict)     # endpoint -> blocks the index says it holds
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


def is_warm(ctx: ScoringContext, e: EndpointState, limits: SaturationConfig) -> bool:
    """Whether `e` holds at least `warm_fraction` of the prompt's full blocks (as a prefix)."""
    n = len(ctx.hashes)
    return n > 0 and ctx.prefix_blocks.get(e.address, 0) >= limits.warm_fraction * n


def is_saturated(e: EndpointState, limits: SaturationConfig, warm: bool = False) -> bool:
    if warm:
        return (e.load >= max(limits.warm_queue_depth, limits.queue_depth)
                or e.kv_usage >= max(limits.warm_kv_cache, limits.kv_cache))
    return e.load >= limits.queue_depth or e.kv_usage >= limits.kv_cache


class SaturationFilter:
    """Endpoints below the saturation thresholds (waiting + dispatched-since-poll, KV usage) *for this
    request*: a replica warm for it (holding >= `warm_fraction` of its blocks; needs `ctx.prefix_blocks`,
    so the picker matches the prefix first) is full only at `warm_queue_depth` / `warm_kv_cache`, a cold
    one at `queue_depth` / `kv_cache`. The reasoning is expected time to first token: at a warm replica
    a request costs a short prefill behind its queue; at a cold one, the whole prompt's prefill (with a
    2,048-token prefix, seconds, and it stalls that replica's batch and evicts another prefix there), so
    a little queueing at home is the cheaper wait. A same-prefix burst still spreads, once its holder
    reaches the warm limits."""
    name = "saturation"

    def __init__(self, limits: SaturationConfig):
        self.limits = limits

    def __call__(self, ctx, endpoints):
        return [e for e in endpoints if not is_saturated(e, self.limits, is_warm(ctx, e, self.limits))]


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


class SpreadScorer:
    """Places a *new* prefix: when no candidate holds at least `warm_fraction` of the prompt, the ones
    the prefix index believes hold the fewest blocks score highest (1 - held / most held), so new
    prefixes (a new group, a new conversation) spread evenly over the fleet instead of piling onto
    whichever replica's queue was momentarily short: each prefix placed becomes that replica's future
    load (its group's later requests follow it) and takes cache room. 0 everywhere when some candidate
    is warm, so it never pulls a request away from its prefix."""
    name = "spread"

    def __init__(self, limits: SaturationConfig | None = None):
        self.limits = limits or SaturationConfig()

    def score(self, ctx, endpoints):
        if not ctx.hashes or any(is_warm(ctx, e, self.limits) for e in endpoints):
            return {e.address: 0.0 for e in endpoints}
        most = max((ctx.held_blocks.get(e.address, 0) for e in endpoints), default=0)
        return {e.address: (1.0 - ctx.held_blocks.get(e.address, 0) / most if most else 1.0) for e in endpoints}


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
