"""The endpoint picker (tidal/fleet/epp): fake replicas over httpx.MockTransport (/metrics, /health,
/v1/models), KV events on real ZeroMQ PUB sockets in the fleet.md wire format, the real smollm2
tokenizer. No Envoy, no model."""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx
import msgspec
import pytest
import zmq
from prometheus_client import generate_latest

from tidal.fleet.epp import EndpointPicker, EPPConfig, RejectedError, RoutingRequest, load_config
from tidal.fleet.epp.config import ConfigError, FlowControlConfig, SaturationConfig
from tidal.fleet.epp.flow_control import FlowController
from tidal.fleet.epp.plugins import SaturationFilter, ScoringContext, SpreadScorer
from tidal.fleet.epp.pool import EndpointState
from tidal.fleet.epp.prefix_index import PrefixIndex, block_hashes, prompt_token_ids
from tidal.fleet.epp.request import Decision
from tidal.kv.block_manager import hash_block

CHAT = "/v1/chat/completions"
SYSTEM = ("You are a meticulous assistant for a shipping company. Answer questions about parcels, tariffs, "
          "customs forms and delivery windows. Quote the relevant rule number, keep answers under five "
          "sentences, and never invent tracking numbers. ") * 3


@pytest.fixture(scope="module")
def tokenizer():
    from tidal.weights.loader import open_checkpoint
    return open_checkpoint("smollm2", require_weights=False).load_tokenizer()


# ---- fake replicas ----------------------------------------------------------------------------
class Replica:
    def __init__(self, model="smollm2"):
        self.up, self.model = True, model
        self.waiting = self.running = 0
        self.kv_usage = 0.0

    def metrics(self) -> str:
        return (f"# TYPE tidal:num_requests_waiting gauge\ntidal:num_requests_waiting {self.waiting}\n"
                f"# TYPE tidal:num_requests_running gauge\ntidal:num_requests_running {self.running}\n"
                f"# TYPE tidal:kv_cache_usage_perc gauge\ntidal:kv_cache_usage_perc {self.kv_usage}\n")


class Fleet:
    def __init__(self, n: int):
        self.replicas = {f"10.0.0.{i + 1}:8000": Replica() for i in range(n)}

    @property
    def addresses(self) -> list[str]:
        return list(self.replicas)

    def handler(self, request: httpx.Request) -> httpx.Response:
        r = self.replicas[f"{request.url.host}:{request.url.port}"]
        if not r.up:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=r.metrics())
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": r.model, "object": "model"}]})
        return httpx.Response(404)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


class Publisher:
    """A replica's KV event PUB socket, speaking fleet.md seam 1 on the wire directly."""

    def __init__(self):
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.seq = 0

    def send(self, *events) -> None:
        self.seq += 1
        payload = msgspec.msgpack.encode([time.time(), list(events), 0])
        self.sock.send_multipart([b"kv-events", self.seq.to_bytes(8, "big"), payload])

    def close(self):
        self.sock.close(0)


def stored(ids: list[int], bs: int = 16) -> list:
    n = len(ids) // bs * bs
    hashes, parent = [], None
    for i in range(0, n, bs):
        parent = hash_block(parent, ids[i:i + bs])
        hashes.append(parent)
    return ["BlockStored", hashes, None, ids[:n], bs, None, "GPU"]


def chat(user: str, system: str = SYSTEM, **headers) -> RoutingRequest:
    body = {"model": "smollm2", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return RoutingRequest(CHAT, {k.replace("_", "-"): v for k, v in headers.items()}, body)


def chat_ids(tokenizer, req: RoutingRequest) -> list[int]:
    out = tokenizer.apply_chat_template(req.body["messages"], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def config(fleet: Fleet, kv: dict | None = None, **kw) -> EPPConfig:
    eps = [{"address": a, "kv_events": (kv or {}).get(a)} for a in fleet.addresses]
    return EPPConfig.from_dict({"endpoints": eps, "poll_interval_s": 0.02, "health_interval_s": 0.02, **kw})


async def wait_until(cond, timeout=5.0, each=None):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        if each:
            each()
        await asyncio.sleep(0.01)


async def send(picker: EndpointPicker, fleet: Fleet, req: RoutingRequest) -> Decision:
    """Pick, and have the chosen fake replica queue the request, as a real one would."""
    d = await picker.pick(req)
    fleet.replicas[d.endpoint].waiting += 1
    return d


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---- tokenization -------------------------------------------------------------------------------
def test_prompt_ids_match_the_servers_tokenization(tokenizer):
    req = chat("Where is my parcel?")
    assert prompt_token_ids(tokenizer, CHAT, req.body) == chat_ids(tokenizer, req)
    parts = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert prompt_token_ids(tokenizer, CHAT, parts) == chat_ids(
        tokenizer, RoutingRequest(CHAT, {}, {"messages": [{"role": "system", "content": "a\nb"}]}))
    assert prompt_token_ids(tokenizer, "/v1/completions", {"prompt": "hello world"}) == \
        list(tokenizer.encode("hello world", add_special_tokens=True))
    assert prompt_token_ids(tokenizer, "/v1/completions", {"prompt": [[5, 6, 7], [8]]}) == [5, 6, 7]
    assert prompt_token_ids(tokenizer, CHAT, {"messages": "nope"}) is None
    assert prompt_token_ids(tokenizer, "/v1/embeddings", {"input": "x"}) is None
    ids = list(range(40))
    assert block_hashes(ids, 16) == stored(ids)[1] and len(block_hashes(ids, 16)) == 2


# ---- precise prefix routing ---------------------------------------------------------------------
def test_precise_mode_routes_to_the_holder_and_forgets_evictions(tokenizer):
    async def main():
        fleet = Fleet(3)
        pubs = {a: Publisher() for a in fleet.addresses}
        holder = fleet.addresses[1]
        picker = EndpointPicker(config(fleet, {a: p.endpoint for a, p in pubs.items()}),
                                tokenizer=tokenizer, client=fleet.client(), rng=random.Random(0))
        async with picker:
            req = chat("Where is my parcel 1234?")
            event = stored(chat_ids(tokenizer, req))
            hashes = event[1]
            assert len(hashes) >= 8
            await wait_until(lambda: picker.index.match(hashes, [holder])[holder] == len(hashes),
                             each=lambda: pubs[holder].send(event))
            for _ in range(3):
                d = await picker.pick(chat("Where is my parcel 1234?"))
                assert d.endpoint == holder and d.prefix_blocks == len(hashes) == d.total_blocks
                assert d.scores[holder]["prefix"] == 1.0 and sorted(d.fallbacks) == sorted(set(fleet.addresses) - {holder})
                await asyncio.sleep(0.05)   # a poll sees these (the fake's queue stays 0)
            # the holder is busier now: without its prefix it would lose
            fleet.replicas[holder].waiting = 2
            await asyncio.sleep(0.05)
            assert (await picker.pick(req)).endpoint == holder
            pubs[holder].send(["BlockRemoved", hashes, "GPU"])
            await wait_until(lambda: picker.index.match(hashes, [holder])[holder] == 0,
                             each=lambda: pubs[holder].send(["BlockRemoved", hashes, "GPU"]))
            d = await picker.pick(req)
            assert d.endpoint != holder
            # the replica that just got it holds it speculatively; AllBlocksCleared drops its real ones
            other = d.endpoint
            assert picker.index.match(hashes, [other])[other] == len(hashes)
            pubs[other].send(event)
            await wait_until(lambda: picker.index._replicas[other].confirmed >= set(hashes),
                             each=lambda: pubs[other].send(event))
            await wait_until(lambda: picker.index.match(hashes, [other])[other] == 0,
                             each=lambda: pubs[other].send(["AllBlocksCleared"]))
            text = generate_latest(picker.metrics.registry).decode()
            assert "tidal_epp:routed_total" in text and 'tidal_epp:kv_events_total{endpoint="%s",kind="BlockRemoved"}' % holder in text
        for p in pubs.values():
            p.close()
    run(main())


def test_different_prefixes_spread(tokenizer):
    async def main():
        fleet = Fleet(3)
        async with EndpointPicker(config(fleet), tokenizer=tokenizer, client=fleet.client(),
                                  rng=random.Random(1)) as picker:
            reqs = [chat(f"Question {i}", system=f"Conversation {i}: " + SYSTEM[i:]) for i in range(6)]
            got = [(await send(picker, fleet, r)).endpoint for r in reqs]
            assert Counter(got) == Counter({a: 2 for a in fleet.addresses})
    run(main())


def test_a_burst_of_one_prefix_spreads_once_the_holder_saturates(tokenizer):
    async def main():
        fleet = Fleet(3)
        pubs = {a: Publisher() for a in fleet.addresses}
        cfg = config(fleet, {a: p.endpoint for a, p in pubs.items()},
                     saturation={"queue_depth": 4, "warm_queue_depth": 8})
        async with EndpointPicker(cfg, tokenizer=tokenizer, client=fleet.client(), rng=random.Random(2)) as picker:
            first = await picker.pick(chat("Track parcel 77"))
            decisions = await asyncio.gather(*(picker.pick(chat("Track parcel 77")) for _ in range(31)))
            counts = Counter([first.endpoint] + [d.endpoint for d in decisions])
            assert sum(counts.values()) == 32 and len(counts) == 3, counts
            assert max(counts.values()) < 32 and min(counts.values()) >= 4, counts
            # the speculative entries made the first replica win until it was saturated (at the warm limit:
            # it holds the prefix, so it takes more than a cold replica would)
            assert [d.endpoint for d in decisions[:7]] == [first.endpoint] * 7
            assert any(d.queue_wait_s > 0 for d in decisions)
        for p in pubs.values():
            p.close()
    run(main())


def test_a_warm_replica_is_saturated_only_at_the_warm_limits():
    limits = SaturationConfig(queue_depth=5, kv_cache=0.8, warm_queue_depth=12, warm_kv_cache=0.95, warm_fraction=0.5)
    busy = EndpointState("a:1", healthy=True, waiting=7, kv_usage=0.85)
    ctx = ScoringContext(RoutingRequest(CHAT, {}, None), hashes=[1, 2, 3, 4], prefix_blocks={"a:1": 2})
    assert SaturationFilter(limits)(ctx, [busy]) == [busy]          # holds half the prompt: still open
    ctx.prefix_blocks = {"a:1": 1}
    assert SaturationFilter(limits)(ctx, [busy]) == []              # a quarter: cold, full at 5 / 0.8
    ctx.prefix_blocks = {"a:1": 4}
    busy.waiting = 12
    assert SaturationFilter(limits)(ctx, [busy]) == []              # even a warm replica fills up
    busy.waiting, busy.kv_usage = 0, 0.96
    assert SaturationFilter(limits)(ctx, [busy]) == []
    # a warm limit set below the cold one counts as the cold one
    low = SaturationConfig(queue_depth=5, warm_queue_depth=2)
    busy.waiting, busy.kv_usage = 3, 0.0
    assert SaturationFilter(low)(ctx, [busy]) == [busy]
    with pytest.raises(ConfigError, match="warm_fraction"):
        EPPConfig.from_dict({"saturation": {"warm_fraction": 0}})


def test_a_new_prefix_goes_where_the_fewest_blocks_are_held():
    limits = SaturationConfig()
    eps = [EndpointState(a, healthy=True) for a in ("a:1", "b:1", "c:1")]
    ctx = ScoringContext(RoutingRequest(CHAT, {}, None), hashes=[1, 2, 3, 4],
                         held_blocks={"a:1": 300, "b:1": 150, "c:1": 0})
    assert SpreadScorer(limits).score(ctx, eps) == {"a:1": 0.0, "b:1": 0.5, "c:1": 1.0}
    ctx.prefix_blocks = {"a:1": 3}     # a holds this prompt: spreading must not pull it away
    assert SpreadScorer(limits).score(ctx, eps) == {"a:1": 0.0, "b:1": 0.0, "c:1": 0.0}
    ctx.prefix_blocks, ctx.held_blocks = {}, {}
    assert SpreadScorer(limits).score(ctx, eps) == {"a:1": 1.0, "b:1": 1.0, "c:1": 1.0}


def test_speculative_entries_expire_without_confirmation():
    now = [0.0]
    index = PrefixIndex(block_size=16, speculative_ttl_s=2.0, clock=lambda: now[0])
    index.set_mode("a:1", precise=True)
    index.record_routed("a:1", [1, 2, 3])
    assert index.match([1, 2, 3, 4], ["a:1"]) == {"a:1": 3}
    now[0] = 2.5
    assert index.match([1, 2, 3], ["a:1"]) == {"a:1": 0}
    index.prune()
    assert index.held_blocks("a:1") == 0


# ---- approximate mode ---------------------------------------------------------------------------
def test_approximate_mode_routes_repeats_to_the_same_replica(tokenizer):
    async def main():
        fleet = Fleet(3)
        async with EndpointPicker(config(fleet), tokenizer=tokenizer, client=fleet.client(),
                                  rng=random.Random(3)) as picker:
            reqs = [chat(f"Question {i}", system=f"Tenant {i} rules. " + SYSTEM) for i in range(3)]
            where = [(await send(picker, fleet, r)).endpoint for r in reqs]
            assert len(set(where)) == 3
            for _ in range(2):
                await asyncio.sleep(0.05)
                for r, w in zip(reqs, where):
                    d = await send(picker, fleet, r)
                    assert d.endpoint == w and d.prefix_blocks == d.total_blocks > 0
    run(main())


# ---- health ---------------------------------------------------------------------------------------
def test_a_dead_replica_leaves_rotation_and_returns(tokenizer):
    async def main():
        fleet = Fleet(2)
        a, b = fleet.addresses
        async with EndpointPicker(config(fleet, failure_threshold=2), tokenizer=tokenizer,
                                  client=fleet.client()) as picker:
            assert {e.address for e in picker.pool.healthy()} == {a, b}
            assert picker.pool.endpoints[a].models == {"smollm2"}
            fleet.replicas[a].up = False
            await wait_until(lambda: not picker.pool.endpoints[a].healthy)
            for i in range(4):
                assert (await picker.pick(chat(f"q{i}"))).endpoint == b
            fleet.replicas[b].up = False
            await wait_until(lambda: not picker.pool.healthy())
            with pytest.raises(RejectedError) as e:
                await picker.pick(chat("q"))
            assert e.value.status == 503 and e.value.body()["error"]["type"] == "service_unavailable_error"
            fleet.replicas[a].up = fleet.replicas[b].up = True
            await wait_until(lambda: len(picker.pool.healthy()) == 2)
            got = {(await picker.pick(chat(f"r{i}", system=f"{i} " + SYSTEM))).endpoint for i in range(4)}
            assert got == {a, b}
    run(main())


# ---- flow control ---------------------------------------------------------------------------------
class Gate:
    """An attempt() source: `capacity` releases left; records the order of releases."""

    def __init__(self):
        self.capacity, self.order = 0, []

    def attempt(self, label):
        def go():
            if self.capacity <= 0:
                return None
            self.capacity -= 1
            self.order.append(label)
            return Decision(label, {})
        return go


def test_flow_control_orders_bands_and_shares_across_tenants():
    async def main():
        fc, gate = FlowController(FlowControlConfig()), Gate()
        tasks = [asyncio.create_task(fc.submit(gate.attempt(f"low{i}"), priority=0)) for i in range(2)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(fc.submit(gate.attempt(f"high{i}"), priority=fc.priority_of("critical")))
                  for i in range(2)]
        await asyncio.sleep(0)
        assert fc.queued == 4
        gate.capacity = 4
        fc.dispatch()
        await asyncio.gather(*tasks)
        assert gate.order == ["high0", "high1", "low0", "low1"]

        gate.order.clear()
        tasks = [asyncio.create_task(fc.submit(gate.attempt(f"a{i}"), tenant="a")) for i in range(4)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(fc.submit(gate.attempt(f"b{i}"), tenant="b")) for i in range(2)]
        await asyncio.sleep(0)
        for _ in range(6):   # one release per round, as saturation would allow
            gate.capacity = 1
            fc.dispatch()
        await asyncio.gather(*tasks)
        assert gate.order == ["a0", "b0", "a1", "b1", "a2", "a3"]
    run(main())


def test_flow_control_rejects_a_full_queue_a_passed_deadline_and_sheddable_work():
    async def main():
        fc, gate = FlowController(FlowControlConfig(max_queue=2)), Gate()
        held = [asyncio.create_task(fc.submit(gate.attempt(i))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(RejectedError) as e:
            await fc.submit(gate.attempt("x"))
        assert e.value.status == 429 and "queue is full" in e.value.message
        assert e.value.body()["error"]["type"] == "rate_limit_error"
        with pytest.raises(RejectedError) as e:
            await fc.submit(gate.attempt("s"), priority=fc.priority_of("sheddable"))
        assert e.value.status == 429 and "sheddable" in e.value.message
        gate.capacity = 2
        fc.dispatch()
        await asyncio.gather(*held)

        t0 = time.monotonic()
        with pytest.raises(RejectedError) as e:
            await fc.submit(gate.attempt("late"), timeout_s=0.05)
        assert e.value.status == 429 and "deadline" in e.value.message and time.monotonic() - t0 < 1
        assert fc.queued == 0
    run(main())


def test_picker_holds_requests_while_saturated_and_honours_the_deadline_header(tokenizer):
    async def main():
        fleet = Fleet(2)
        for r in fleet.replicas.values():
            r.waiting = 9
        async with EndpointPicker(config(fleet), tokenizer=tokenizer, client=fleet.client()) as picker:
            with pytest.raises(RejectedError) as e:
                await picker.pick(chat("q", x_gateway_deadline_ms="60"))
            assert e.value.status == 429 and "deadline" in e.value.message
            pending = asyncio.create_task(picker.pick(chat("q", x_gateway_tenant="t1")))
            await asyncio.sleep(0.1)
            assert not pending.done() and picker.flow.queued == 1
            fleet.replicas[fleet.addresses[1]].waiting = 0
            d = await pending
            assert d.endpoint == fleet.addresses[1] and d.queue_wait_s > 0.05
    run(main())


def test_a_request_held_on_the_in_flight_estimate_gets_an_early_poll(tokenizer):
    """Requests dispatched since the last poll count as waiting until a later poll sees the replica; one
    held on that count alone is released by an extra poll round within milliseconds, not the next period's
    (10 s here). A pool saturated by its polled figures alone polls no more than its period."""
    async def main():
        fleet = Fleet(1)
        polls = []
        handler = fleet.handler
        fleet.handler = lambda request: (polls.append(request.url.path == "/metrics"), handler(request))[1]
        cfg = EPPConfig.from_dict({"endpoints": fleet.addresses, "poll_interval_s": 10, "health_interval_s": 10,
                                   "saturation": {"queue_depth": 2, "warm_queue_depth": 2}})
        async with EndpointPicker(cfg, tokenizer=tokenizer, client=fleet.client()) as picker:
            for q in ("a", "b"):                       # dispatched; the replica finishes them at once
                await picker.pick(chat(q))
            t0 = time.monotonic()
            d = await picker.pick(chat("c"))           # held: 2 in flight by the estimate
            assert d.queue_wait_s > 0 and time.monotonic() - t0 < 1.0
            fleet.replicas[d.endpoint].waiting = 5     # now saturated by its polled figures
            await asyncio.sleep(0.05)
            await picker.pool.refresh()                # the in-flight count cleared: only the figures hold
            before = sum(polls)
            pending = asyncio.create_task(picker.pick(chat("d")))
            await asyncio.sleep(0.2)
            assert not pending.done() and sum(polls) == before
            fleet.replicas[d.endpoint].waiting = 0
            await picker.pool.refresh()
            await pending
    run(main())


# ---- config and scoring ---------------------------------------------------------------------------
def test_weights_from_a_config_file_change_the_choice(tmp_path, tokenizer):
    async def choose(path) -> str:
        fleet = Fleet(2)
        a, b = fleet.addresses
        fleet.replicas[a].kv_usage, fleet.replicas[a].waiting = 0.7, 0     # short queue, full cache
        fleet.replicas[b].kv_usage, fleet.replicas[b].waiting = 0.1, 3     # long queue, empty cache
        cfg = load_config(path, endpoints=fleet.addresses, poll_interval_s=0.02)
        async with EndpointPicker(cfg, tokenizer=tokenizer, client=fleet.client()) as picker:
            return fleet.addresses.index((await picker.pick(chat("q"))).endpoint)

    queue_heavy = tmp_path / "queue.json"
    queue_heavy.write_text(json.dumps({"scorers": {"queue": 5, "kv_cache": 0, "running": 0}}))
    kv_heavy = tmp_path / "kv.yaml"
    kv_heavy.write_text("scorers:\n  queue: 0\n  kv_cache: 5\n  running: 0\nsaturation:\n  kv_cache: 0.9\n")
    assert asyncio.run(choose(queue_heavy)) == 0
    assert asyncio.run(choose(kv_heavy)) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("scorer:\n  queue: 1\n")
    with pytest.raises(ConfigError, match="scorer"):
        load_config(bad)
    with pytest.raises(ConfigError, match="host:port"):
        EPPConfig.from_dict({"endpoints": ["nohost"]})


def test_session_affinity_and_role_filter(tokenizer):
    async def main():
        fleet = Fleet(3)
        cfg = config(fleet, scorers={"prefix": 0, "session": 5})
        cfg.endpoints[2].role = "prefill"
        cfg.role = "decode"
        picker = EndpointPicker(cfg, tokenizer=tokenizer, client=fleet.client(), rng=random.Random(4))
        async with picker:
            first = (await picker.pick(chat("hi", x_session_id="s1"))).endpoint
            assert first != fleet.addresses[2]
            for i in range(4):
                d = await picker.pick(chat(f"turn {i}", x_session_id="s1"))
                assert d.endpoint == first and d.scores[first]["session"] == 1.0
                assert fleet.addresses[2] not in d.scores and fleet.addresses[2] not in d.fallbacks
    run(main())
