"""`tidal gateway --replicas-file` (tidal/fleet/replica_set.py): the replica set changes while the gateway
runs. The file's format and its errors; a replica added to the file becomes routable through the real
Envoy (its EDS file follows) and a removed one is refused, never routed blindly; a malformed file keeps
the last good set; the real picker gains and loses the endpoints."""
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("envoy")
pytest.importorskip("grpclib")

from test_gateway import Loop, SteeredPicker, Stub, free_port  # noqa: E402
from tidal.errors import TidalError  # noqa: E402
from tidal.fleet import replica_set  # noqa: E402
from tidal.fleet.gateway import Gateway, GatewaySettings  # noqa: E402


def test_file_format(tmp_path):
    f = tmp_path / "replicas"
    f.write_text("# the fleet\nhttp://10.0.0.5:8000  tcp://10.0.0.5:5557\n\n10.0.0.6:8000 # no events\n"
                 "http://10.0.0.5:8000 tcp://10.0.0.5:5557\n")
    assert replica_set.read_replicas_file(f) == [("10.0.0.5:8000", "tcp://10.0.0.5:5557"),
                                                              ("10.0.0.6:8000", None)]
    for bad, why in (("http://a:1 b:2\n", "line 1"), ("\nhttp://nohost\n", "line 2.*no port"),
                     ("a:1 tcp://x:1 extra\n", "line 1")):
        f.write_text(bad)
        with pytest.raises(TidalError, match=why):
            replica_set.read_replicas_file(f)
    with pytest.raises(TidalError, match="replicas-file"):
        replica_set.read_replicas_file(tmp_path / "missing")
    doc = replica_set.eds_document("c", ["10.0.0.5:8000", "[::1]:9"], 3)
    eps = doc["resources"][0]["endpoints"][0]["lb_endpoints"]
    assert doc["version_info"] == "3" and doc["resources"][0]["cluster_name"] == "c"
    assert [e["endpoint"]["address"]["socket_address"] for e in eps] == [
        {"address": "10.0.0.5", "port_value": 8000}, {"address": "::1", "port_value": 9}]
    assert replica_set.eds_document("c", [], 1)["resources"][0]["endpoints"] == []


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_replicas_join_and_leave_through_envoy(tmp_path):
    a, b = Stub("a"), Stub("b")
    f = tmp_path / "replicas"
    f.write_text(f"http://{a.endpoint}\n")
    picker = SteeredPicker(lambda r: (a.endpoint, []))
    s = GatewaySettings(replicas=[], port=free_port(), epp_port=free_port(), metrics_port=free_port(),
                        admin_port=free_port(), envoy_concurrency=1, replicas_file=str(f))
    loop, gw = Loop(), Gateway(s, picker=picker)
    loop.run(gw.start())
    client = httpx.Client(base_url=gw.url, timeout=10)

    def served_by(target):
        picker.route = lambda r: (target.endpoint, [])
        r = client.post("/v1/completions", json={"prompt": "p"})
        return r.json().get("served_by") if r.status_code == 200 else r.status_code
    try:
        assert served_by(a) == "a"
        assert served_by(b) == 503                     # not in the file: refused, not routed
        f.write_text(f"http://{a.endpoint}\nhttp://{b.endpoint}\n")
        # Envoy must know b too: a host outside its cluster would go to another replica, not to b
        assert _wait(lambda: served_by(b) == "b"), "b never became routable"
        assert served_by(a) == "a"
        f.write_text(f"http://{b.endpoint}\n")
        assert _wait(lambda: served_by(a) == 503), "a was never taken out"
        n = len(a.requests)
        assert served_by(b) == "b" and len(a.requests) == n
        f.write_text("http://nohost\n")                # malformed: the last good set stays
        time.sleep(2.5)
        assert gw.s.replicas == [b.endpoint] and served_by(b) == "b"
    finally:
        client.close()
        loop.run(gw.stop())
        loop.close()
        a.close()
        b.close()


def test_the_real_picker_follows_the_file(tmp_path):
    from tidal.fleet.epp import EndpointPicker, EPPConfig
    picker = EndpointPicker(EPPConfig(), tokenizer=object())
    gw = Gateway(GatewaySettings(replicas=[], epp_only=True), picker=picker)
    gw._apply([("10.0.0.5:8000", None), ("10.0.0.6:8000", "tcp://10.0.0.6:5557")])
    assert set(picker.pool.endpoints) == {"10.0.0.5:8000", "10.0.0.6:8000"}
    gw._apply([("10.0.0.6:8000", "tcp://10.0.0.6:5558")])     # one gone, one with new KV events
    assert set(picker.pool.endpoints) == {"10.0.0.6:8000"}
    assert picker.pool.endpoints["10.0.0.6:8000"].kv_events == "tcp://10.0.0.6:5558"
    assert gw.s.replicas == ["10.0.0.6:8000"]


def test_tidal_gateway_cli_follows_the_file(tmp_path):
    from test_gateway import _tidal, _wait_for_line
    f = tmp_path / "replicas"
    port = free_port()
    with Stub("x") as stub:
        f.write_text(f"# one replica\nhttp://{stub.endpoint}\n")
        with _tidal("gateway", "--replicas-file", str(f), "--port", str(port), "--epp-port", str(free_port()),
                    "--metrics-port", str(free_port()), "--admin-port", str(free_port()),
                    "--envoy-concurrency", "1") as proc:
            line = _wait_for_line(proc, "tidal gateway: http://", 60)
            assert "1 replica(s), following" in line and str(f) in line
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "p"}, timeout=10)
            assert r.json()["served_by"] == "x"
            proc.send_signal(2)
            assert proc.wait(15) == 0
    with _tidal("gateway", "--replicas-file", str(f), "--replica", "http://127.0.0.1:1") as proc:
        assert proc.wait(30) != 0 and "not both" in proc.stderr.read()
