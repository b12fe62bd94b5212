"""`tidal bench serve --dataset shared-prefix` (issue #13's fleet benchmark workload) and the EPP's
round-robin baseline picker. Pure functions only: fast, no server."""
import argparse

import pytest

from tidal.bench import MIN_TOKEN_ID
from tidal.errors import TidalError
from tidal.server.bench import SHARED_PREFIX, add_bench_serve_args, make_shared_prefix_workload


def test_shared_prefix_workload_shape_and_determinism():
    w = make_shared_prefix_workload(4, 3, prefix_len=32, question_len=8, output_len=(5, 5), seed=7, vocab_size=500)
    assert len(w.prompts) == 12 and w.output_lens == [5] * 12
    assert all(len(p) == 40 for p in w.prompts)
    assert all(MIN_TOKEN_ID <= t < 500 for p in w.prompts for t in p)
    assert sorted(w.groups) == sorted(list(range(4)) * 3)
    prefixes = {}
    for g, p in zip(w.groups, w.prompts):
        assert prefixes.setdefault(g, p[:32]) == p[:32]        # one shared prefix per group
    assert len({tuple(v) for v in prefixes.values()}) == 4      # and the groups' prefixes differ
    assert len({tuple(p[32:]) for p in w.prompts}) == 12        # every question its own
    assert w.groups != sorted(w.groups)                          # interleaved, not group after group
    again = make_shared_prefix_workload(4, 3, prefix_len=32, question_len=8, output_len=(5, 5), seed=7, vocab_size=500)
    assert again.summary()["fingerprint"] == w.summary()["fingerprint"]
    other = make_shared_prefix_workload(4, 3, prefix_len=32, question_len=8, output_len=(5, 5), seed=8, vocab_size=500)
    assert other.summary()["fingerprint"] != w.summary()["fingerprint"]
    s = w.summary()
    assert s["input_len"] == [40, 40] and s["total_input_tokens"] == 480 and s["source"].startswith(SHARED_PREFIX)


def test_shared_prefix_flags_and_errors():
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    a = p.parse_args(["--dataset", "shared-prefix", "--num-groups", "16", "--prompts-per-group", "16",
                      "--prefix-len", "2048", "--question-len", "128", "--output-len", "128"])
    assert (a.dataset, a.num_groups, a.prompts_per_group, a.prefix_len, a.question_len, a.output_len) == \
        (SHARED_PREFIX, 16, 16, 2048, 128, (128, 128))
    with pytest.raises(TidalError, match="num-groups"):
        make_shared_prefix_workload(0, 1)
    with pytest.raises(TidalError, match="prefix-len"):
        make_shared_prefix_workload(1, 1, prefix_len=0)


def test_round_robin_picker_config_and_turns():
    from tidal.fleet.epp.config import ConfigError, EPPConfig
    from tidal.fleet.epp.plugins import RoundRobinPicker
    from tidal.fleet.epp.pool import EndpointState
    assert EPPConfig.from_dict({"picker": {"type": "round_robin"}}).picker.type == "round_robin"
    with pytest.raises(ConfigError, match="picker.type"):
        EPPConfig.from_dict({"picker": {"type": "fastest"}})
    eps = [EndpointState(f"127.0.0.1:{port}") for port in (8010, 8002, 8001)]
    rr = RoundRobinPicker()
    picks = [rr.rank(eps, {e.address: 9.0 if e.address.endswith("8010") else 0.0 for e in eps})[0].address
             for _ in range(4)]
    assert picks == ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8010", "127.0.0.1:8001"]   # scores ignored
    assert rr.rank(eps[:2], {})[0].address == "127.0.0.1:8002"                        # 8001 filtered out: skipped
    assert rr.rank(eps[:1], {})[0].address == "127.0.0.1:8010"
