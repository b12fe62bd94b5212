"""Feeds the replicas' KV events into the EPP's prefix index.

Owns: `KVEventFeed`, one background thread (`tidal-epp-kv-events`) that runs
`tidal.fleet.kv_events.KVEventSubscriber` (a blocking ZeroMQ SUB poller, one socket per replica) and
hands each decoded batch to the asyncio loop with `call_soon_threadsafe`, so the index is only ever
touched on the loop's thread; gap counts go to the EPP metrics.
Must not: decode the wire format itself (kv_events.py does) or decide what an event means for the
index (PrefixIndex.apply_event does).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading

from tidal.fleet.epp.metrics import EPPMetrics
from tidal.fleet.epp.prefix_index import PrefixIndex
from tidal.fleet.kv_events import KVEventSubscriber

logger = logging.getLogger("tidal.fleet.epp")


class KVEventFeed:
    def __init__(self, index: PrefixIndex, metrics: EPPMetrics, poll_timeout_s: float = 0.05):
        self.index, self.metrics = index, metrics
        self.poll_timeout_s = poll_timeout_s
        self._address: dict[str, str] = {}      # ZeroMQ endpoint -> replica address (host:port)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, address: str, zmq_endpoint: str) -> None:
        """Subscribe to `zmq_endpoint` as the events of replica `address` (precise mode for it)."""
        self.index.set_mode(address, precise=True)
        self._address[zmq_endpoint] = address
        self._commands.put(("add", zmq_endpoint))

    def remove(self, zmq_endpoint: str) -> None:
        self._address.pop(zmq_endpoint, None)
        self._commands.put(("remove", zmq_endpoint))

    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tidal-epp-kv-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2.0)
            self._thread = None

    def _run(self) -> None:
        sub = KVEventSubscriber()
        missed_seen: dict[str, int] = {}
        try:
            while not self._stop.is_set():
                while not self._commands.empty():
                    op, endpoint = self._commands.get()
                    (sub.add_endpoint if op == "add" else sub.remove_endpoint)(endpoint)
                if not sub.endpoints:
                    self._stop.wait(self.poll_timeout_s)
                    continue
                got = sub.poll(self.poll_timeout_s)
                if got:
                    self._loop.call_soon_threadsafe(self._apply, got)
                for endpoint, n in sub.num_missed.items():
                    if n != missed_seen.get(endpoint, 0):
                        address = self._address.get(endpoint, endpoint)
                        self._loop.call_soon_threadsafe(
                            self.metrics.kv_event_gaps.labels(address).inc, n - missed_seen.get(endpoint, 0))
                        logger.warning("KV events from %s: %d batches missed in all; its prefix view may be off",
                                       address, n)
                        missed_seen[endpoint] = n
        except RuntimeError:   # the loop closed under us during shutdown
            pass
        except Exception:
            logger.exception("the KV event feed stopped")
        finally:
            sub.close()

    def _apply(self, got: list) -> None:
        for endpoint, _seq, batch in got:
            address = self._address.get(endpoint)
            if address is None:
                continue
            for event in batch.events:
                kind = self.index.apply_event(address, event)
                self.metrics.kv_events.labels(address, kind).inc()
