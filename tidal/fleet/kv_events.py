"""KV events between replicas and the endpoint picker, in vLLM's wire format (docs/fleet.md, seam 1).

Owns: the consumer side: `decode_event_batch(payload)` and `KVEventSubscriber` (one ZeroMQ SUB socket
per replica endpoint, so each batch is known by the replica it came from; sequence gaps are counted
and, when the replica has a replay socket, filled from it). The producer side (the wire Structs and
`KVEventPublisher`) lives in tidal/kv/event_publisher.py, where the engine core can start it without
importing this package; it is re-exported here so the fleet has one module to import.
Wire: a multipart message `[topic, seq (8-byte big-endian), payload]`; payload = msgpack of
`KVEventBatch` = `[ts, [event...], data_parallel_rank]`, each event an array headed by its vLLM class
name: `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`,
`["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`. Hashes are
`tidal.kv.block_manager.hash_block` chains over full blocks.
Must not: keep the prefix index itself (the EPP's), or block an asyncio loop (its calls block for at
most the timeout it is given; run it in a thread).
"""
from __future__ import annotations

import logging

import msgspec
import zmq

from tidal.kv.event_publisher import (END_SEQ, KVEventBatch, KVEventPublisher, WireAllBlocksCleared,
                                      WireBlockRemoved, WireBlockStored, WireEvent, should_bind, to_wire)

logger = logging.getLogger("tidal.fleet")

# vLLM's names for the same Structs
BlockStored, BlockRemoved, AllBlocksCleared = WireBlockStored, WireBlockRemoved, WireAllBlocksCleared

_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def decode_event_batch(payload: bytes) -> KVEventBatch:
    """A publish's payload -> KVEventBatch (msgspec.DecodeError when it is not one)."""
    return _decoder.decode(payload)


class KVEventSubscriber:
    def __init__(self, endpoints: list[str] | tuple[str, ...] = (), topic: str = "",
                 replay_endpoints: dict[str, str] | None = None, context: zmq.Context | None = None):
        """endpoints: the replicas' publishers, e.g. tcp://10.0.0.5:5557 (connected; one with `*` is
        bound instead, for replicas that connect to us). topic: a prefix filter ("" = everything).
        replay_endpoints: endpoint -> its replica's replay ROUTER address, to fill sequence gaps."""
        self._ctx = context or zmq.Context.instance()
        self.topic = topic.encode()
        self._socks: dict[str, zmq.Socket] = {}
        self._by_sock: dict[zmq.Socket, str] = {}
        self._poller = zmq.Poller()
        self._replay = dict(replay_endpoints or {})
        self.last_seq: dict[str, int] = {}
        self.num_missed: dict[str, int] = {}   # batches lost to gaps the replay did not fill
        for e in endpoints:
            self.add_endpoint(e)

    def add_endpoint(self, endpoint: str, replay_endpoint: str | None = None) -> None:
        if endpoint in self._socks:
            return
        s = self._ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, self.topic)
        (s.bind if should_bind(endpoint) else s.connect)(endpoint)
        self._socks[endpoint], self._by_sock[s] = s, endpoint
        self._poller.register(s, zmq.POLLIN)
        if replay_endpoint:
            self._replay[endpoint] = replay_endpoint

    def remove_endpoint(self, endpoint: str) -> None:
        s = self._socks.pop(endpoint, None)
        if s is not None:
            self._poller.unregister(s)
            del self._by_sock[s]
            s.close(0)
        self.last_seq.pop(endpoint, None)

    @property
    def endpoints(self) -> list[str]:
        return list(self._socks)

    def poll(self, timeout: float | None = 0.1) -> list[tuple[str, int, KVEventBatch]]:
        """Batches that arrived within `timeout` seconds (None: wait for one): (endpoint, seq, batch),
        in order per endpoint. A payload that does not decode is logged and skipped."""
        ready = dict(self._poller.poll(None if timeout is None else int(timeout * 1000)))
        got: list[tuple[str, int, KVEventBatch]] = []
        for s in ready:
            endpoint = self._by_sock[s]
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 3:
                    logger.warning("KV events from %s: a message of %d frames, not 3", endpoint, len(frames))
                    continue
                seq = int.from_bytes(frames[1], "big")
                last = self.last_seq.get(endpoint)
                if last is not None and seq > last + 1:
                    got += self._fill_gap(endpoint, last + 1, seq)
                elif last is not None and seq <= last:   # the replica restarted: its numbering starts again
                    logger.info("KV events from %s: sequence went back from %d to %d", endpoint, last, seq)
                self.last_seq[endpoint] = seq
                try:
                    got.append((endpoint, seq, decode_event_batch(frames[2])))
                except msgspec.DecodeError as e:
                    logger.warning("KV events from %s: undecodable batch %d: %s", endpoint, seq, e)
        return got

    def _fill_gap(self, endpoint: str, first: int, upto: int) -> list[tuple[str, int, KVEventBatch]]:
        """Batches first..upto-1 from the replica's replay socket, when it has one (waits up to 1 s)."""
        address = self._replay.get(endpoint)
        got = []
        if address is not None:
            # DEALER, not REQ: the ROUTER streams many replies to one request; the empty frame is REQ's envelope
            req = self._ctx.socket(zmq.DEALER)
            req.setsockopt(zmq.LINGER, 0)
            req.setsockopt(zmq.RCVTIMEO, 1000)
            try:
                req.connect(address)
                req.send_multipart((b"", first.to_bytes(8, "big")))
                while True:
                    _, seq_b, payload = req.recv_multipart()
                    if seq_b == END_SEQ:
                        break
                    seq = int.from_bytes(seq_b, "big")
                    if first <= seq < upto:
                        got.append((endpoint, seq, decode_event_batch(payload)))
            except (zmq.ZMQError, ValueError) as e:
                logger.warning("KV events from %s: replay from %d failed: %s", endpoint, first, e)
            finally:
                req.close(0)
        missed = (upto - first) - len(got)
        if missed:
            self.num_missed[endpoint] = self.num_missed.get(endpoint, 0) + missed
        return got

    def close(self) -> None:
        for e in list(self._socks):
            self.remove_endpoint(e)


__all__ = ["KVEventBatch", "KVEventPublisher", "KVEventSubscriber", "BlockStored", "BlockRemoved",
           "AllBlocksCleared", "WireEvent", "decode_event_batch", "to_wire"]
