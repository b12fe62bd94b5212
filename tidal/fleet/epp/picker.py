"""The endpoint picker: one request in, one endpoint (plus fallbacks) out (docs/fleet.md seam 3).

Owns: `EndpointPicker`, which wires the pieces together and runs the pipeline for each request:
tokenize the prompt (off the event loop, one worker thread) -> block hashes -> flow control
(`FlowController.submit`) -> filters (health, role, model) -> prefix match -> saturation (prefix-aware:
a replica holding most of the prompt is full only at the `warm_*` limits; hold in flow control while
every candidate is saturated) -> weighted scorers (prefix, load, and `spread`, which places a prefix
no candidate holds on the replica the index believes holds the fewest blocks) -> `MaxScorePicker` ->
bookkeeping (in-flight count, speculative prefix entries, session map, metrics, a debug log of the
decision and every scorer's scores). It starts and stops the metrics poller and the KV event feed,
and loads the model's tokenizer when it is not given one (`tokenizer` config key, else the model
name a replica reports; without one, prefix scoring is off and a warning says so).
Must not: speak HTTP/gRPC to clients (tidal/fleet/ext_proc.py does) or reach into the plug-ins'
internals; a new scorer is a class with `name` and `score` listed in `_SCORERS`.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx
from prometheus_client import CollectorRegistry

from tidal.fleet.epp.config import EndpointSpec, EPPConfig
from tidal.fleet.epp.flow_control import FlowController
from tidal.fleet.epp.metrics import EPPMetrics
from tidal.fleet.epp.plugins import (HealthFilter, KVCacheScorer, MaxScorePicker, ModelFilter, PrefixCacheScorer,
                                     QueueScorer, RoleFilter, RoundRobinPicker, RunningScorer, SaturationFilter,
                                     ScoringContext, SessionAffinityScorer, SpreadScorer)
from tidal.fleet.epp.pool import EndpointPool, EndpointState
from tidal.fleet.epp.prefix_index import PrefixIndex, block_hashes, prompt_token_ids
from tidal.fleet.epp.request import Decision, RejectedError, RoutingRequest

logger = logging.getLogger("tidal.fleet.epp")

_SCORERS = {"prefix": PrefixCacheScorer, "queue": QueueScorer, "kv_cache": KVCacheScorer, "running": RunningScorer}


class EndpointPicker:
    def __init__(self, config: EPPConfig | None = None, *, tokenizer=None, client: httpx.AsyncClient | None = None,
                 registry: CollectorRegistry | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """tokenizer: the model's (HF-style: encode / apply_chat_template); None: loaded at start.
        client: the httpx client for polling (tests pass one over a MockTransport).
        registry: where the EPP's metrics go (default: a fresh one, `self.metrics.registry`)."""
        self.config = config = config or EPPConfig()
        self.clock = clock
        self.metrics = EPPMetrics(registry)
        self.pool = EndpointPool(config, client, self.metrics, clock)
        p = config.prefix
        self.index = PrefixIndex(p.block_size, p.speculative_ttl_s, p.lru_capacity_blocks, clock)
        self.flow = FlowController(config.flow_control, self.metrics, clock)
        self.filters = [HealthFilter(), RoleFilter(config.role), ModelFilter()]
        self.saturation = SaturationFilter(config.saturation)
        self.session = SessionAffinityScorer()
        scorers = {name: cls() for name, cls in _SCORERS.items()}
        scorers["queue"] = QueueScorer(config.saturation.queue_depth)
        scorers["spread"] = SpreadScorer(config.saturation)
        scorers["session"] = self.session
        self.scorers = [(scorers[name], w) for name, w in config.scorers.items() if w > 0]
        # prefix weight 0 (e.g. the round-robin baseline): no prefix awareness anywhere, so saturation
        # uses the cold limits and `spread` sees no held blocks
        self._prefix_on = config.scorers.get("prefix", 0) > 0
        self.picker = (RoundRobinPicker() if config.picker.type == "round_robin"
                       else MaxScorePicker(config.picker.tie_break, rng))
        self.tokenizer = tokenizer
        self._tokenizer_load: asyncio.Future | None = None
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidal-epp-tokenize")
        self._feed = None
        for spec in config.endpoints:
            self._watch_events(spec)
        self.pool.poll_listeners.append(self._on_poll)
        self.pool.health_listeners.append(self._on_health)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._feed is not None:
            self._feed.start()
        await self.pool.start()
        if self.tokenizer is None:
            await self._load_tokenizer()

    async def stop(self) -> None:
        self.flow.fail_all(RejectedError(503, "the gateway is shutting down; retry", code="shutdown"))
        await self.pool.stop()
        if self._feed is not None:
            self._feed.stop()
        self._tok_pool.shutdown(wait=False)

    async def __aenter__(self) -> "EndpointPicker":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def add_endpoint(self, spec: EndpointSpec | str) -> None:
        spec = spec if isinstance(spec, EndpointSpec) else EndpointSpec(spec)
        self.pool.add_endpoint(spec)
        self._watch_events(spec)
        if self._feed is not None and self.pool._task is not None:
            self._feed.start()

    def remove_endpoint(self, address: str) -> None:
        state = self.pool.endpoints.get(address)
        if state is not None and state.kv_events and self._feed is not None:
            self._feed.remove(state.kv_events)
        self.pool.remove_endpoint(address)
        self.index.remove(address)

    def _watch_events(self, spec: EndpointSpec) -> None:
        if spec.kv_events:
            if self._feed is None:
                from tidal.fleet.epp.kv_subscriber import KVEventFeed
                self._feed = KVEventFeed(self.index, self.metrics)
            self._feed.add(spec.address, spec.kv_events)
        else:
            self.index.set_mode(spec.address, precise=False)

    def _on_poll(self) -> None:
        self.index.prune()
        self.flow.dispatch()

    def _on_health(self, address: str, healthy: bool) -> None:
        state = self.pool.endpoints.get(address)
        if not healthy:
            self.session.forget_endpoint(address)
        elif state is not None and state.ever_healthy:
            # back after an outage: it may have restarted with an empty cache
            self.index.clear(address)
        self.flow.dispatch()

    # ---- tokenizer ----------------------------------------------------------------------------
    async def _load_tokenizer(self) -> None:
        """Load the tokenizer once (the `tokenizer` key, else the first model a replica reports);
        concurrent callers wait for the same load. A failure leaves prefix scoring off."""
        if self._tokenizer_load is None:
            name = self.config.tokenizer or next((m for e in self.pool.healthy() for m in sorted(e.models)), None)
            if name is None:
                return
            self._tokenizer_load = asyncio.ensure_future(self._load(name))
        await asyncio.shield(self._tokenizer_load)

    async def _load(self, name: str) -> None:
        def load():
            from tidal.weights.loader import open_checkpoint
            return open_checkpoint(name, require_weights=False).load_tokenizer()
        try:
            self.tokenizer = await asyncio.get_running_loop().run_in_executor(self._tok_pool, load)
            logger.info("EPP tokenizer: %s", name)
        except Exception as exc:
            logger.warning("EPP: cannot load the tokenizer of %r (%s); prefix-cache scoring is off", name, exc)

    async def _token_ids(self, req: RoutingRequest) -> list[int] | None:
        if req.body is None:
            return None
        if self.tokenizer is None:
            await self._load_tokenizer()
            if self.tokenizer is None:
                return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tok_pool, prompt_token_ids, self.tokenizer, req.path, req.body)

    # ---- the pipeline -------------------------------------------------------------------------
    async def pick(self, req: RoutingRequest) -> Decision:
        """The endpoint for `req`, or RejectedError (429: held too long / queue full; 503: none healthy)."""
        ids = await self._token_ids(req)
        h = self.config.headers
        model = req.body.get("model") if isinstance(req.body, dict) and isinstance(req.body.get("model"), str) else None
        ctx = ScoringContext(req, model, block_hashes(ids, self.config.prefix.block_size) if ids else [],
                             session_id=req.header(h.session))
        if not self.config.flow_control.enabled:
            return self._attempt(ctx, hold=False)
        deadline = req.header(h.deadline)
        try:
            timeout_s = float(deadline) / 1000 if deadline is not None else None
        except ValueError:
            timeout_s = None
        return await self.flow.submit(lambda: self._attempt(ctx, hold=True), self.flow.priority_of(req.header(h.priority)),
                                      req.header(h.tenant) or "", timeout_s)

    def _attempt(self, ctx: ScoringContext, hold: bool) -> Decision | None:
        """Filter, score and pick now; None (only when `hold`) while every candidate is saturated.
        Runs synchronously, so the in-flight count it leaves is seen by the next attempt."""
        candidates = list(self.pool.endpoints.values())
        for f in self.filters:
            candidates = f(ctx, candidates)
        if not candidates:
            self.metrics.rejections.labels("503", "no_endpoint").inc()
            total, up = len(self.pool.endpoints), len(self.pool.healthy())
            raise RejectedError(503, f"no healthy replica can serve this request ({up} of {total} in rotation"
                                f"{', role ' + self.config.role if self.config.role else ''}); retry shortly",
                                code="no_healthy_endpoint")
        if ctx.hashes and self._prefix_on:   # before saturation: a warm replica is full only at higher limits
            ctx.prefix_blocks = self.index.match(ctx.hashes, [e.address for e in candidates])
            ctx.held_blocks = {e.address: self.index.held_blocks(e.address) for e in candidates}
        ready = self.saturation(ctx, candidates)
        if not ready:
            if hold:
                self.pool.refresh_soon(candidates)   # the in-flight estimate may be all that holds it
                return None
            ready = candidates
        scores: dict[str, dict[str, float]] = {e.address: {} for e in ready}
        totals = {e.address: 0.0 for e in ready}
        for scorer, weight in self.scorers:
            for address, s in scorer.score(ctx, ready).items():
                scores[address][scorer.name] = s
                totals[address] += weight * s
        for address, total in totals.items():
            scores[address]["total"] = total
        ranked = self.picker.rank(ready, totals)
        chosen = ranked[0]
        rest = sorted((e for e in candidates if e.address not in totals), key=lambda e: (e.load, e.kv_usage))
        decision = Decision(chosen.address, scores, [e.address for e in ranked[1:] + rest],
                            ctx.prefix_blocks.get(chosen.address, 0), len(ctx.hashes))
        self._record(ctx, chosen, decision)
        return decision

    def _record(self, ctx: ScoringContext, chosen: EndpointState, d: Decision) -> None:
        self.pool.note_dispatched(chosen.address)
        if ctx.hashes:
            self.index.record_routed(chosen.address, ctx.hashes)
        self.session.record(ctx.session_id, chosen.address)
        m = self.metrics
        m.decisions.labels(chosen.address).inc()
        for name, value in d.scores[chosen.address].items():
            if name != "total":
                m.scores.labels(name).observe(value)
        m.prefix_blocks.inc(d.total_blocks)
        m.prefix_hit_blocks.inc(d.prefix_blocks)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("EPP %s -> %s (prefix %d/%d blocks, fallbacks %s); scores %s", ctx.request.path,
                         d.endpoint, d.prefix_blocks, d.total_blocks, d.fallbacks,
                         {a: {k: round(v, 3) for k, v in s.items()} for a, s in d.scores.items()})
