"""KV events on the wire: a real BlockManager -> KVEventPublisher (ZeroMQ PUB) -> KVEventSubscriber,
decoded with the vLLM-format Structs; the raw payload is vLLM's array shape; the replay socket."""
import socket
import time

import msgspec
import pytest
import zmq

from tidal.fleet.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, KVEventPublisher,
                                   KVEventSubscriber, decode_event_batch)
from tidal.kv.block_manager import BlockManager, hash_block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect(sub: KVEventSubscriber, want: int, timeout: float = 5.0) -> list:
    """Events from the subscriber until `want` have come (or the timeout)."""
    events, deadline = [], time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        for _, _, batch in sub.poll(0.1):
            events += batch.events
    return events


def _subscribed(pub_port: int, **kw) -> KVEventSubscriber:
    """A subscriber that is surely connected (ZeroMQ drops what a PUB sends before the SUB joins)."""
    sub = KVEventSubscriber([f"tcp://127.0.0.1:{pub_port}"], **kw)
    time.sleep(0.3)
    return sub


@pytest.fixture
def pub_sub():
    port = _free_port()
    pub = KVEventPublisher(f"tcp://*:{port}", topic="kv-events")
    sub = _subscribed(port)
    yield pub, sub, port
    sub.close()
    pub.close()


def test_round_trip_stored_removed_cleared(pub_sub):
    pub, sub, _ = pub_sub
    bm = BlockManager(num_blocks=4, block_size=4)
    pub.attach(bm)
    prompt = list(range(1, 13))   # three full blocks
    assert bm.allocate_slots("a", prompt, 0, len(prompt))
    bm.cache_full_blocks("a", prompt, len(prompt))
    (stored,) = _collect(sub, 1)
    h0 = hash_block(None, prompt[0:4])
    h1 = hash_block(h0, prompt[4:8])
    h2 = hash_block(h1, prompt[8:12])
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [h0, h1, h2] and stored.parent_block_hash is None
    assert stored.token_ids == prompt and stored.block_size == 4 and stored.medium == "GPU"

    bm.free("a")
    other = list(range(100, 116))   # needs all four blocks: the three cached ones are evicted
    assert bm.allocate_slots("b", other, 0, len(other))
    (removed,) = _collect(sub, 1)
    assert isinstance(removed, BlockRemoved) and sorted(removed.block_hashes) == sorted([h0, h1, h2])

    bm.free("b")
    assert bm.reset_prefix_cache()
    (cleared,) = _collect(sub, 1)
    assert isinstance(cleared, AllBlocksCleared)
    assert sub.num_missed == {}


def test_payload_is_vllms_array_shape(pub_sub):
    """Decoded without our types: [ts, [[tag, ...fields]], dp_rank], as vLLM's msgspec Structs encode."""
    pub, _, port = pub_sub
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    raw.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)
    try:
        bm = BlockManager(num_blocks=8, block_size=2)
        pub.attach(bm)
        assert bm.allocate_slots("a", [5, 6, 7, 8], 0, 4)
        bm.cache_full_blocks("a", [5, 6, 7, 8], 4)
        assert raw.poll(5000)
        topic, seq, payload = raw.recv_multipart()
        assert topic == b"kv-events" and len(seq) == 8 and int.from_bytes(seq, "big") == 0
        ts, events, rank = msgspec.msgpack.decode(payload)
        assert abs(ts - time.time()) < 60 and rank == 0
        h0 = hash_block(None, [5, 6])
        assert events == [["BlockStored", [h0, hash_block(h0, [7, 8])], None, [5, 6, 7, 8], 2, None, "GPU"]]
        assert decode_event_batch(payload) == KVEventBatch(ts, [BlockStored([h0, hash_block(h0, [7, 8])], None,
                                                                            [5, 6, 7, 8], 2)], 0)
        # older vLLM (no medium) and newer vLLM (extra trailing fields) decode too
        old = msgspec.msgpack.encode([1.0, [["BlockRemoved", [1, 2]], ["BlockStored", [3], 1, [0, 0], 2, None]]])
        assert decode_event_batch(old).events[1].medium == "GPU"
        new = msgspec.msgpack.encode([1.0, [["BlockStored", [3], None, [0, 0], 2, None, "GPU", None, None, 0]], 0])
        assert decode_event_batch(new).events[0].block_hashes == [3]
    finally:
        raw.close(0)


def test_replay_fills_a_gap():
    port, replay_port = _free_port(), _free_port()
    pub = KVEventPublisher(f"tcp://*:{port}", replay_endpoint=f"tcp://*:{replay_port}", batch_window=0)
    try:
        bm = BlockManager(num_blocks=16, block_size=1)
        pub.attach(bm)
        for i in range(3):   # published before anyone listens: lost on the PUB socket, kept for replay
            assert bm.allocate_slots(f"r{i}", [i, i], 0, 2)
            bm.cache_full_blocks(f"r{i}", [i, i], 2)
            time.sleep(0.05)
        sub = _subscribed(port, replay_endpoints={f"tcp://127.0.0.1:{port}": f"tcp://127.0.0.1:{replay_port}"})
        sub.last_seq[f"tcp://127.0.0.1:{port}"] = -1   # as if it had seen the stream from its start
        try:
            assert bm.allocate_slots("late", [9, 9], 0, 2)
            bm.cache_full_blocks("late", [9, 9], 2)
            got, deadline = [], time.monotonic() + 5
            while len(got) < 4 and time.monotonic() < deadline:
                got += sub.poll(0.1)
            assert [seq for _, seq, _ in got] == [0, 1, 2, 3]
            assert got[0][2].events[0].token_ids == [0, 0] and sub.num_missed == {}
        finally:
            sub.close()
    finally:
        pub.close()
