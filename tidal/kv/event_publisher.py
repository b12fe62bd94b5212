"""KV events on the wire: vLLM's event Structs and a ZeroMQ publisher fed by a `BlockManager`.

Owns: the wire Structs (`KVEventBatch`, `WireBlockStored`, `WireBlockRemoved`, `WireAllBlocksCleared`:
msgspec Structs encoded as msgpack arrays, each event tagged with vLLM's class name, so a vLLM
subscriber or llm-d's indexer reads tidal's stream unchanged), `to_wire` (tidal.kv.events -> wire),
and `KVEventPublisher`: a PUB socket (bind when the endpoint has `*`, `::`, `ipc://` or `inproc://`,
else connect: vLLM's rule) sending `[topic, seq (8-byte big-endian), msgpack(KVEventBatch)]`, plus an
optional ROUTER replay socket (request: `[identity, b"", start seq 8-byte big-endian]`; answer: one
`[identity, b"", seq, payload]` per buffered batch from that seq on, then `[identity, b"", -1, b""]`).
The block manager's callback only appends to a list (the engine never waits on a socket); a
background thread (`tidal-kv-events`) wakes on the first event, waits `batch_window` seconds for the
rest of the step, and publishes what came as one batch. Idle, it sleeps without waking.
It lives in tidal/kv, not tidal/fleet, so the engine core can start it where it runs (thread or child
process) without importing the fleet package; tidal/fleet/kv_events.py re-exports it with the
subscriber side.
Must not: touch the block manager's state (it only listens), block the caller, or import the engine.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import msgspec
import zmq

from tidal.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger("tidal.kv")

MEDIUM_GPU = "GPU"   # vLLM's name for the device tier; tidal's paged pool is the one tier it reports
END_SEQ = (-1).to_bytes(8, "big", signed=True)


# ---- vLLM's wire format -------------------------------------------------------------------------
# Arrays, not maps: [tag, field, field, ...]. Trailing fields have defaults so older streams (no
# `medium`) decode too, and msgspec ignores extra trailing fields, so newer vLLM streams decode as well.
class _WireEvent(msgspec.Struct, array_like=True, gc=False, tag=True):
    """Base of the tagged wire events (tag: the subclass's vLLM name)."""


class WireBlockStored(_WireEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU


class WireBlockRemoved(_WireEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


class WireAllBlocksCleared(_WireEvent, tag="AllBlocksCleared"):
    pass


WireEvent = WireBlockStored | WireBlockRemoved | WireAllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, gc=False):
    """One publish: [ts (unix seconds), [events...], data_parallel_rank]."""
    ts: float
    events: list[WireEvent]
    data_parallel_rank: int | None = None


def to_wire(event: KVEvent) -> WireEvent:
    if isinstance(event, BlockStored):
        return WireBlockStored(list(event.block_hashes), event.parent_block_hash, list(event.token_ids),
                               event.block_size)
    if isinstance(event, BlockRemoved):
        return WireBlockRemoved(list(event.block_hashes))
    if isinstance(event, AllBlocksCleared):
        return WireAllBlocksCleared()
    raise TypeError(f"not a KV event: {type(event).__name__}")


def should_bind(endpoint: str) -> bool:
    """vLLM's rule: a wildcard or local transport binds (stable side), anything else connects."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    def __init__(self, endpoint: str, topic: str = "kv-events", replay_endpoint: str | None = None,
                 batch_window: float = 0.002, replay_buffer: int = 10_000, hwm: int = 100_000,
                 max_pending: int = 1_000_000, data_parallel_rank: int = 0,
                 context: zmq.Context | None = None):
        """endpoint: e.g. tcp://*:5557 (bind) or tcp://epp-host:5557 (connect). batch_window: seconds the
        thread waits after the first event of a batch for the rest of that engine step's events.
        max_pending: events held while the thread is behind; past it the oldest are dropped (and counted)."""
        self.endpoint, self.topic = endpoint, topic.encode()
        self.batch_window = batch_window
        self.data_parallel_rank = data_parallel_rank
        self.max_pending = max_pending
        self.seq = 0                 # the next batch's sequence number
        self.num_dropped = 0
        self._ctx = context or zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        (self._pub.bind if should_bind(endpoint) else self._pub.connect)(endpoint)
        self._replay = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
        self._sent: deque[tuple[int, bytes]] = deque(maxlen=replay_buffer)
        self._encoder = msgspec.msgpack.Encoder()
        self._cond = threading.Condition()
        self._pending: list[KVEvent] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tidal-kv-events", daemon=True)
        self._thread.start()

    # ---- the engine's side: cheap, never blocks on I/O ------------------------------------------
    def attach(self, block_manager) -> "KVEventPublisher":
        """Publish block_manager's events (call before it serves requests)."""
        block_manager.subscribe(self.add)
        return self

    def add(self, event: KVEvent) -> None:
        with self._cond:
            if self._closing:
                return
            self._pending.append(event)
            if len(self._pending) > self.max_pending:
                drop = len(self._pending) - self.max_pending
                del self._pending[:drop]
                self.num_dropped += drop
            if len(self._pending) == 1:
                self._cond.notify()

    # ---- the publishing thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                # with a replay socket, wake now and then to answer it; else sleep until an event comes
                self._cond.wait_for(lambda: self._pending or self._closing, None if self._replay is None else 0.05)
                closing = self._closing
            if self._replay is not None:
                self._serve_replay()
            if not closing and self.batch_window > 0:
                time.sleep(self.batch_window)   # the rest of this step's events
            with self._cond:
                events, self._pending = self._pending, []
            if events:
                try:
                    self._publish(events)
                except Exception:   # noqa: BLE001 - a bad event must not stop the stream
                    logger.exception("KV event publisher: dropping a batch of %d events", len(events))
            if closing:
                return

    def _publish(self, events: list[KVEvent]) -> None:
        batch = KVEventBatch(time.time(), [to_wire(e) for e in events], self.data_parallel_rank)
        payload = self._encoder.encode(batch)
        seq = self.seq.to_bytes(8, "big")
        try:
            self._pub.send_multipart((self.topic, seq, payload), flags=zmq.NOBLOCK)
        except zmq.Again:   # the send queue is full (a stuck subscriber): that subscriber misses it
            pass
        self._sent.append((self.seq, payload))
        self.seq += 1

    def _serve_replay(self) -> None:
        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3:
                logger.warning("KV event replay: bad request of %d frames", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._sent):
                if seq >= first:
                    self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((client, b"", END_SEQ, b""))

    def close(self, timeout: float = 1.0) -> None:
        """Publish what is pending, stop the thread and close the sockets."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        self._pub.close(linger=int(timeout * 1000))
        if self._replay is not None:
            self._replay.close(0)
