"""Flow control: hold requests in the EPP while every candidate replica is saturated, and release
them by priority band and fairly across tenants.

Owns: `FlowController`. A request comes with a priority (an int; higher goes first; a header may
name a band from the config instead), a tenant and a deadline. It is dispatched at once when
nothing is queued and its `attempt()` finds an unsaturated candidate; otherwise it waits in its
band, in its tenant's queue. `dispatch()` (called on every metrics poll and every arrival) drains
the highest band first and, within a band, takes one request per tenant in turn (round-robin: each
tenant with waiting requests gets an equal share of the releases), until an `attempt()` finds
every candidate saturated (head-of-line: the next release waits for fresher load figures).
Refusals (`RejectedError`): 429 when the queue (all bands, or the band) is full, when a request
waits past its deadline, or at once for a sheddable request (priority < 0) while saturated; an
`attempt()` that raises (503: no healthy endpoint) fails that request.
Must not: know about endpoints or scores: `attempt` (the picker's closure) decides saturation and
picks in the same event-loop turn that releases the request, so no other release can see
load figures that omit it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from tidal.fleet.epp.config import FlowControlConfig
from tidal.fleet.epp.metrics import EPPMetrics
from tidal.fleet.epp.request import Decision, RejectedError

logger = logging.getLogger("tidal.fleet.epp")

Attempt = Callable[[], "Decision | None"]


@dataclass(eq=False)
class _Waiting:
    priority: int
    tenant: str
    enqueued: float
    timeout_s: float
    attempt: Attempt
    future: asyncio.Future
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Band:
    tenants: OrderedDict = field(default_factory=OrderedDict)   # tenant -> deque[_Waiting], next turn first
    size: int = 0


class FlowController:
    def __init__(self, config: FlowControlConfig, metrics: EPPMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.metrics = metrics or EPPMetrics()
        self.clock = clock
        self._bands: dict[int, _Band] = {}
        self._size = 0
        self._dispatching = False

    @property
    def queued(self) -> int:
        return self._size

    def priority_of(self, value: str | None) -> int:
        """A header value -> priority: an int, or a band name from the config; else the default."""
        if value is None:
            return self.config.default_priority
        if value in self.config.bands:
            return self.config.bands[value]
        try:
            return int(value)
        except ValueError:
            logger.debug("unknown priority %r; using the default", value)
            return self.config.default_priority

    async def submit(self, attempt: Attempt, priority: int = 0, tenant: str = "",
                     timeout_s: float | None = None) -> Decision:
        """Dispatch now or wait for a release; returns the Decision `attempt` made."""
        if self._size == 0:
            decision = attempt()
            if decision is not None:
                return decision
        if priority < 0:
            raise self._reject(429, "sheddable", "every replica is saturated and this request's priority "
                               f"({priority}) is sheddable; retry later")
        band = self._bands.get(priority)
        if self._size >= self.config.max_queue or (band is not None and band.size >= self.config.max_queue_per_band):
            raise self._reject(429, "queue_full", f"the gateway's request queue is full ({self._size} waiting); "
                               "every replica is saturated; retry later")
        timeout_s = self.config.queue_timeout_s if timeout_s is None else max(timeout_s, 0.0)
        loop = asyncio.get_running_loop()
        item = _Waiting(priority, tenant, self.clock(), timeout_s, attempt, loop.create_future())
        if band is None:
            band = self._bands[priority] = _Band()
        band.tenants.setdefault(tenant, deque()).append(item)
        band.size += 1
        self._size += 1
        self.metrics.queue_size.labels(str(priority)).set(band.size)
        item.timer = loop.call_later(timeout_s, self._expire, item)
        self.dispatch()
        try:
            return await item.future
        except asyncio.CancelledError:   # the client left while queued
            self._remove(item)
            raise

    def dispatch(self) -> None:
        """Release queued requests while their attempts find capacity (see the module docstring)."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._size:
                item = self._next()
                try:
                    decision = item.attempt()
                except RejectedError as e:
                    self._remove(item)
                    if not item.future.done():
                        item.future.set_exception(e)
                    continue
                if decision is None:
                    break
                self._remove(item, rotate=True)
                decision.queue_wait_s = self.clock() - item.enqueued
                self.metrics.queue_wait.observe(decision.queue_wait_s)
                if not item.future.done():
                    item.future.set_result(decision)
        finally:
            self._dispatching = False

    def _next(self) -> _Waiting:
        band = self._bands[max(p for p, b in self._bands.items() if b.size)]
        return next(iter(band.tenants.values()))[0]   # the tenant whose turn it is

    def _remove(self, item: _Waiting, rotate: bool = False) -> None:
        band = self._bands.get(item.priority)
        q = band.tenants.get(item.tenant) if band else None
        if q is None or item not in q:
            return
        q.remove(item)
        if rotate or not q:   # a tenant that had its turn goes to the back of the band's rotation
            del band.tenants[item.tenant]
            if q:
                band.tenants[item.tenant] = q
        band.size -= 1
        self._size -= 1
        self.metrics.queue_size.labels(str(item.priority)).set(band.size)
        if item.timer is not None:
            item.timer.cancel()

    def _expire(self, item: _Waiting) -> None:
        if item.future.done():
            return
        self._remove(item)
        waited = self.clock() - item.enqueued
        item.future.set_exception(self._reject(
            429, "deadline", f"the request waited {waited:.2f} s in the gateway queue, past its deadline "
            f"({item.timeout_s:.2f} s), while every replica was saturated; retry later"))

    def _reject(self, status: int, reason: str, message: str) -> RejectedError:
        self.metrics.rejections.labels(str(status), reason).inc()
        return RejectedError(status, message, code=reason)

    def fail_all(self, error: RejectedError) -> None:
        """Refuse everything queued (shutdown)."""
        for band in self._bands.values():
            for q in list(band.tenants.values()):
                for item in list(q):
                    self._remove(item)
                    if not item.future.done():
                        item.future.set_exception(error)
