"""The endpoint pool: which replicas exist, which are in rotation, and their last-known load.

Owns: `EndpointState` (address, role, models, waiting / running / KV usage from the last poll, the
requests dispatched since that poll, health) and `EndpointPool`, which polls every replica's
`GET /metrics` (Prometheus text: `tidal:num_requests_waiting`, `tidal:num_requests_running`,
`tidal:kv_cache_usage_perc`) every `poll_interval_s`, `GET /health` every `health_interval_s`,
and `GET /v1/models` when it does not know the model yet, all with httpx. An endpoint whose polls
fail `failure_threshold` times in a row leaves rotation; its first fully successful poll brings it
back. No Kubernetes: endpoints come from the config (or `add_endpoint`).
In-flight accounting: `note_dispatched` counts a request the EPP sent to an endpoint; it stays
counted until a metrics poll that *started after* it succeeds (that poll's waiting / running
figures include it), so a burst is not all released on one stale snapshot. A request held while
such counts stand (`refresh_soon`) gets an extra poll round as soon as one can see them (the oldest
dispatched request plus _REFLECT_GRACE_S; one round at a time, at least EARLY_GAP_S after the last)
rather than the next period's: requests that already finished no longer hold the ones behind them
for up to a poll interval (a sequential client through the gateway saw a 20-35 ms tail on a fifth
of its requests), and a pool held by its polled figures alone (nothing dispatched since) adds no polling.
Must not: score, pick or queue requests (plugins / picker / flow control), or read KV events.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tidal.fleet.epp.config import EndpointSpec, EPPConfig
from tidal.fleet.epp.metrics import EPPMetrics

logger = logging.getLogger("tidal.fleet.epp")

WAITING, RUNNING, KV_USAGE = "tidal:num_requests_waiting", "tidal:num_requests_running", "tidal:kv_cache_usage_perc"
# A request dispatched this shortly before a poll began may not have reached the replica yet
# (Envoy still forwarding it), so that poll does not count as having seen it.
_REFLECT_GRACE_S = 0.01
EARLY_GAP_S = 0.005   # refresh_soon: at most one extra round this soon after the last one began


@dataclass
class EndpointState:
    address: str
    role: str = "both"
    kv_events: str | None = None
    models: set[str] = field(default_factory=set)
    healthy: bool = False
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    metrics_at: float | None = None       # monotonic time the last good metrics poll began
    failures: int = 0                     # consecutive failed poll rounds
    ever_healthy: bool = False
    dispatched: deque = field(default_factory=deque)   # monotonic times of requests sent since the last poll

    @property
    def in_flight(self) -> int:
        return len(self.dispatched)

    @property
    def load(self) -> float:
        """Waiting requests as the replica will see them: the last poll plus what was sent since."""
        return self.waiting + self.in_flight


def parse_metrics(text: str) -> dict[str, float]:
    """The three load figures from a Prometheus text page (label sets summed; absent ones are 0)."""
    out = {WAITING: 0.0, RUNNING: 0.0, KV_USAGE: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += float(sample.value)
    return out


class EndpointPool:
    def __init__(self, config: EPPConfig, client: httpx.AsyncClient | None = None,
                 metrics: EPPMetrics | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.metrics = metrics or EPPMetrics()
        self.clock = clock
        self._client = client
        self._own_client = client is None
        self.endpoints: dict[str, EndpointState] = {}
        self._last_health: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._early: asyncio.Task | None = None
        self._early_wanted = False
        self._round_at = float("-inf")   # when the last poll round began
        self.poll_listeners: list[Callable[[], None]] = []             # after every poll round
        self.health_listeners: list[Callable[[str, bool], None]] = []  # (address, healthy) on a change
        for spec in config.endpoints:
            self.add_endpoint(spec)

    # ---- membership ---------------------------------------------------------------------------
    def add_endpoint(self, spec: EndpointSpec | str) -> EndpointState:
        spec = spec if isinstance(spec, EndpointSpec) else EndpointSpec(spec)
        state = EndpointState(spec.address, spec.role, spec.kv_events, {spec.model} if spec.model else set())
        self.endpoints[spec.address] = state
        self.metrics.endpoint_healthy.labels(spec.address).set(0)
        return state

    def remove_endpoint(self, address: str) -> None:
        if self.endpoints.pop(address, None) is not None:
            self.metrics.endpoint_healthy.labels(address).set(0)
            for cb in self.health_listeners:
                cb(address, False)

    def healthy(self) -> list[EndpointState]:
        return [e for e in self.endpoints.values() if e.healthy]

    def note_dispatched(self, address: str) -> None:
        state = self.endpoints.get(address)
        if state is not None:
            state.dispatched.append(self.clock())
            self.metrics.endpoint_in_flight.labels(address).set(state.in_flight)

    # ---- polling ------------------------------------------------------------------------------
    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.config.request_timeout_s)
        return self._client

    async def start(self) -> None:
        """One poll round now (so the pool knows who is up before the first request), then the loop."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="tidal-epp-poll")

    async def stop(self) -> None:
        for task in (self._task, self._early):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._early = None
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.refresh()
            except Exception:   # never let one bad round end polling
                logger.exception("EPP poll round failed")

    def refresh_soon(self, endpoints: list[EndpointState]) -> None:
        """An extra poll round, off the period, where a held request's `endpoints` count requests
        dispatched since their last poll (which may have finished already): see the module docstring."""
        if not any(e.dispatched for e in endpoints):
            return
        if self._early is not None and not self._early.done():
            self._early_wanted = True   # asked during a round: one more after it
            return
        self._early_wanted = False
        self._early = asyncio.get_running_loop().create_task(self._early_rounds(), name="tidal-epp-poll-early")

    async def _early_rounds(self) -> None:
        while True:
            # late enough to count the oldest dispatched request as seen (_REFLECT_GRACE_S), and not
            # sooner than EARLY_GAP_S after the last round
            oldest = min((e.dispatched[0] for e in self.endpoints.values() if e.dispatched), default=None)
            if oldest is None:
                return
            wait = max(self._round_at + EARLY_GAP_S, oldest + _REFLECT_GRACE_S + 1e-3) - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._early_wanted = False
            try:
                await self.refresh()
            except Exception:
                logger.exception("EPP poll round failed")
            if not self._early_wanted:
                return

    async def refresh(self) -> None:
        """Poll every endpoint once (concurrently), then tell the listeners."""
        self._round_at = self.clock()
        await asyncio.gather(*(self._poll(e) for e in list(self.endpoints.values())))
        for cb in self.poll_listeners:
            cb()

    async def _poll(self, e: EndpointState) -> None:
        started = self.clock()
        ok = True
        try:
            if started - self._last_health.get(e.address, float("-inf")) >= self.config.health_interval_s \
                    or not e.healthy:
                r = await self.client.get(f"http://{e.address}/health", timeout=self.config.request_timeout_s)
                ok = r.status_code == 200
                if ok:
                    self._last_health[e.address] = started
            if ok:
                r = await self.client.get(f"http://{e.address}/metrics", timeout=self.config.request_timeout_s)
                ok = r.status_code == 200
                if ok:
                    figures = parse_metrics(r.text)
                    e.waiting, e.running, e.kv_usage = figures[WAITING], figures[RUNNING], figures[KV_USAGE]
                    e.metrics_at = started
                    while e.dispatched and e.dispatched[0] <= started - _REFLECT_GRACE_S:
                        e.dispatched.popleft()
                    self.metrics.endpoint_in_flight.labels(e.address).set(e.in_flight)
            if ok and not e.models:
                r = await self.client.get(f"http://{e.address}/v1/models", timeout=self.config.request_timeout_s)
                if r.status_code == 200:
                    e.models = {m["id"] for m in r.json().get("data", []) if isinstance(m, dict) and "id" in m}
        except (httpx.HTTPError, ValueError, KeyError, OSError) as exc:
            ok = False
            logger.debug("poll of %s failed: %r", e.address, exc)
        if ok:
            e.failures = 0
            if not e.healthy:
                self._set_health(e, True)
        else:
            e.failures += 1
            self.metrics.poll_failures.labels(e.address).inc()
            if e.healthy and e.failures >= self.config.failure_threshold:
                self._set_health(e, False)

    def _set_health(self, e: EndpointState, healthy: bool) -> None:
        e.healthy = healthy
        self.metrics.endpoint_healthy.labels(e.address).set(1 if healthy else 0)
        if healthy:
            logger.info("endpoint %s in rotation (models: %s)", e.address, ", ".join(sorted(e.models)) or "?")
        else:
            e.dispatched.clear()
            logger.warning("endpoint %s out of rotation after %d failed polls", e.address, e.failures)
        for cb in self.health_listeners:
            cb(e.address, healthy)
        e.ever_healthy = e.ever_healthy or healthy
