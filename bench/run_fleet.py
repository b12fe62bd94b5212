"""Issue #13's fleet benchmark: `tidal bench serve --dataset shared-prefix` through `tidal gateway`,
prefix+load routing (the EPP's default weights) against round-robin, and precise (KV events) against
approximate (routing history) prefix index; then the same on real SmolLM2 replicas. One table at the end.

Every run starts fresh replicas (empty prefix caches) and a fresh gateway with that run's EPP config,
sends the same seeded workload, reads each replica's `tidal:prefix_cache_hits` / `queries` before and
after, and stops everything (replicas and gateway are children in their own sessions that die with
this script; an exit by signal or error still stops them).

    python bench/run_fleet.py                      # simulated 8 replicas, then real 2 replicas
    python bench/run_fleet.py --parts sim          # only the simulated part (sim, real, or both: sim,real)
    python bench/run_fleet.py --table-only         # the table of the runs recorded in --out
    python bench/run_fleet.py --parts sim --sim-policies prefix-precise,round-robin --sim-rate 2,3,inf
                                                   # a load sweep: each rate against round-robin at that rate

A burst (`--sim-rate inf`) measures the fleet at saturation (its best output tokens/s); a Poisson rate
that both fleets sustain measures the TTFT a user sees at that load. With several rates, each run's name
carries its rate (sim8@2-prefix-precise) and each is compared with round-robin at the same rate.

Policies (EPP configs): prefix-precise / prefix-approx = the default scorer weights with / without the
replicas' KV events; prefix6-approx = the prefix scorer at 6; round-robin = `picker: {type: round_robin}`.
Takes ~17 minutes on 2 shared cores (the simulated round-robin run ~4.5 of them).

Records (the bench's JSON, the EPP configs, replica and gateway logs) go to --out (bench/out/fleet/).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
_children: list[subprocess.Popen] = []

# Flow control off in both: round-robin's backlog would otherwise wait in the EPP past Envoy's 60-s ext_proc
# message timeout (504s); the replicas queue instead. The saturation filter still steers picks.
NO_HOLD = {"flow_control": {"enabled": False}}
PREFIX_LOAD = {**NO_HOLD}   # the EPP's default weights: prefix 3, queue 2, kv_cache 1, running 1, session 2
# The default weights with the prefix scorer at 6: a held prefix (up to 6 x 128/136 = 5.6) then outweighs
# the load scorers' largest spread (queue 2 + running 1 + kv_cache 1 = 4); saturation still spreads.
PREFIX_HEAVY = {**NO_HOLD, "scorers": {"prefix": 6}}
ROUND_ROBIN = {**NO_HOLD, "picker": {"type": "round_robin"},
               "scorers": {"prefix": 0, "queue": 0, "kv_cache": 0, "running": 0, "session": 0}}


def _die_with_parent():
    import ctypes
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


def start(cmd: list[str], log: str) -> subprocess.Popen:
    f = open(log, "w")
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                         start_new_session=True, preexec_fn=_die_with_parent)
    _children.append(p)
    return p


def stop(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        with contextlib.suppress(ValueError):
            _children.remove(p)


def get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_ok(url: str, timeout: float, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            get(url)
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise SystemExit(f"run_fleet: {what} exited (code {dead[0].returncode}) before {url} answered")
        if time.monotonic() > deadline:
            raise SystemExit(f"run_fleet: {url} ({what}) not up after {timeout:g} s")
        time.sleep(0.3)


def counter(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:_total)?(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M):
        total += float(m.group(1))
    return total


def replica_prefix(urls: list[str]) -> list[tuple[float, float]]:
    out = []
    for u in urls:
        text = get(u + "/metrics")
        out.append((counter(text, "tidal:prefix_cache_hits"), counter(text, "tidal:prefix_cache_queries")))
    return out


def ports_free(ports: list[int]) -> None:
    """Refuse to start over anything already listening on our ports (a stale run would answer for us)."""
    import socket
    for port in ports:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"run_fleet: port {port} is already in use; stop what holds it or pass --base-port")


def run_one(name: str, a, replicas_cmd, n: int, epp: dict, precise: bool, bench_args: list[str],
            start_timeout: float) -> dict:
    out = a.out
    base = a.base_port
    ports_free([base + i for i in range(2 * n)] + [base + 80 + i for i in range(4)])
    urls = [f"http://127.0.0.1:{base + i}" for i in range(n)]
    reps = [start(replicas_cmd(i), f"{out}/{name}.replica{i}.log") for i in range(n)]
    gw = None
    try:
        for u in urls:
            wait_ok(u + "/health", start_timeout, reps, "a replica")
        cfg = f"{out}/{name}.epp.json"
        with open(cfg, "w") as f:
            json.dump(epp, f, indent=1)
        gport = base + 80
        cmd = [PY, "-m", "tidal.cli", "gateway", "--config", cfg, "--port", str(gport),
               "--epp-port", str(base + 81), "--metrics-port", str(base + 82), "--admin-port", str(base + 83),
               "--envoy-concurrency", "1", "--log-level", os.environ.get("FLEET_EPP_LOG", "warning")]
        for i, u in enumerate(urls):
            cmd += ["--replica", u] + (["--kv-events", f"tcp://127.0.0.1:{base + n + i}"] if precise else [])
        gw = start(cmd, f"{out}/{name}.gateway.log")
        wait_ok(f"http://127.0.0.1:{base + 82}/health", 120, [gw], "the gateway")
        wait_ok(f"http://127.0.0.1:{gport}/v1/models", 60, [gw], "the gateway")
        before = replica_prefix(urls)
        rec_path = f"{out}/{name}.json"
        bench = [PY, "-m", "tidal.cli", "bench", "serve", "--url", f"http://127.0.0.1:{gport}", "--no-tqdm",
                 "--json", rec_path] + bench_args
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(bench[2:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(bench, cwd=ROOT).returncode
        wall = time.monotonic() - t0
        after = replica_prefix(urls)
        epp_text = get(f"http://127.0.0.1:{base + 82}/metrics")
    finally:
        stop([gw] if gw else [])
        stop(reps)
    with open(rec_path) as f:
        rec = json.load(f)
    hits = sum(x[0] - y[0] for x, y in zip(after, before))
    queries = sum(x[1] - y[1] for x, y in zip(after, before))
    routed = {m.group(1): float(m.group(2)) for m in
              re.finditer(r'^tidal_epp:routed_total\{endpoint="([^"]+)"\} ([0-9.eE+-]+)$', epp_text, re.M)}
    r = rec["results"]
    row = {"name": name, "rc": rc, "wall_s": round(wall, 1), "completed": r["completed"], "failed": r["failed"],
           "elapsed_s": r["elapsed_s"], "output_tok_s": r.get("output_tokens_per_s"),
           "ttft_p50": r["ttft_ms"]["p50"], "ttft_p90": r["ttft_ms"]["p90"], "ttft_p99": r["ttft_ms"]["p99"],
           "tpot_p50": r["tpot_ms"]["p50"], "hit_rate": hits / queries if queries else None,
           "hits": hits, "queries": queries,
           "per_replica_hit_rate": [round((x[0] - y[0]) / (x[1] - y[1]), 3) if x[1] > y[1] else None
                                    for x, y in zip(after, before)],
           "routed": [int(routed.get(u.split("//")[1], 0)) for u in urls],
           "epp_prefix_hit_blocks": counter(epp_text, "tidal_epp:prefix_hit_blocks"),
           "epp_prompt_blocks": counter(epp_text, "tidal_epp:prompt_blocks")}
    with open(f"{out}/{name}.row.json", "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ["run", "done", "out tok/s", "TTFT p50 s", "TTFT p90 s", "TTFT p99 s", "TPOT p50 ms", "hit rate",
            "elapsed s", "routed per replica"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = lambda v, d=2: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
        lines.append("| " + " | ".join([
            r["name"], f"{r['completed']}/{r['completed'] + r['failed']}", f(r["output_tok_s"], 1),
            f(r["ttft_p50"] / 1000 if r["ttft_p50"] is not None else None),
            f(r["ttft_p90"] / 1000 if r["ttft_p90"] is not None else None),
            f(r["ttft_p99"] / 1000 if r["ttft_p99"] is not None else None), f(r["tpot_p50"], 1),
            "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f} %", f(r["elapsed_s"], 1),
            " ".join(map(str, r["routed"]))]) + " |")
    return "\n".join(lines)


def ratios(rows: dict, fast: str, slow: str) -> str:
    a, b = rows.get(fast), rows.get(slow)
    if not a or not b or not a["output_tok_s"] or not b["output_tok_s"] or not a["ttft_p90"]:
        return ""
    return (f"{fast} vs {slow}: output tokens/s x{a['output_tok_s'] / b['output_tok_s']:.2f}, "
            f"TTFT p90 {b['ttft_p90'] / a['ttft_p90']:.2f}x lower")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sim,real", help="sim, real, or sim,real (default)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/out/fleet"))
    ap.add_argument("--base-port", type=int, default=18300, help="replica i on BASE+i, its KV events on BASE+N+i, "
                    "the gateway on BASE+80..83")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-only", action="store_true", help="print the table of the runs recorded in --out")
    # simulated part
    ap.add_argument("--sim-replicas", type=int, default=8)
    ap.add_argument("--sim-kv-blocks", type=int, default=640,
                    help="each simulated replica's KV pool in 16-token blocks (640 = 10,240 tokens: four 2048-token "
                         "prefixes + 128 blocks for the requests' own tokens)")
    ap.add_argument("--sim-workload", default="16,16,2048,128,128", help="groups,per-group,prefix,question,output")
    ap.add_argument("--sim-rate", default="inf", help="request rate, req/s (Poisson; inf = all at once); "
                    "a comma-separated list runs every policy at each rate")
    ap.add_argument("--sim-concurrency", default="0",
                    help="most requests in flight (default 0: no cap, as vLLM's benchmark_serving; "
                         "sessions 6-11 used 48)")
    ap.add_argument("--sim-policies", default="prefix-precise,prefix-approx,prefix6-approx,round-robin")
    ap.add_argument("--sim-serve-args", default="", help="extra flags for each simulated replica's tidal serve")
    # real part
    ap.add_argument("--real-replicas", type=int, default=2)
    ap.add_argument("--real-workload", default="8,8,512,128,128", help="groups,per-group,prefix,question,output")
    ap.add_argument("--real-rate", default="inf")
    ap.add_argument("--real-concurrency", default="16")
    ap.add_argument("--real-policies", default="prefix-precise,round-robin")
    ap.add_argument("--real-serve-args", default="--dtype bfloat16",
                    help="extra flags for each real replica's tidal serve")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(143))
    policies = {"prefix-precise": (PREFIX_LOAD, True), "prefix-approx": (PREFIX_LOAD, False),
                "prefix6-precise": (PREFIX_HEAVY, True), "prefix6-approx": (PREFIX_HEAVY, False),
                "round-robin": (ROUND_ROBIN, True)}

    def bench_args(spec: str, rate: str, conc: str) -> list[str]:
        g, p, pre, q, o = spec.split(",")
        return (["--max-concurrency", conc] if int(conc) > 0 else []) + ["--dataset", "shared-prefix", "--num-groups", g, "--prompts-per-group", p, "--prefix-len", pre,
                "--question-len", q, "--output-len", o, "--seed", str(a.seed), "--request-rate", rate]

    rows: list[dict] = []
    if a.table_only:
        order = list(policies)
        for path in sorted(os.listdir(a.out)):
            if path.endswith(".row.json"):
                with open(os.path.join(a.out, path)) as f:
                    rows.append(json.load(f))
        rows.sort(key=lambda r: (not r["name"].startswith("sim"), r["name"].split("-", 1)[0],
                                 order.index(r["name"].split("-", 1)[1]) if r["name"].split("-", 1)[1] in order else 99))
        a.parts = ""
    try:
        if "sim" in a.parts:
            n = a.sim_replicas

            def sim_cmd(i):
                return [PY, "-m", "tidal.cli", "serve", "--model", "smollm2", "--simulate", "--host", "127.0.0.1",
                        "--port", str(a.base_port + i), "--kv-events-endpoint", f"tcp://*:{a.base_port + n + i}",
                        "--num-kv-blocks", str(a.sim_kv_blocks), "--log-level", "warning"] + a.sim_serve_args.split()
            rates = a.sim_rate.split(",")
            for rate in rates:
                fleet = f"sim{n}" if len(rates) == 1 else f"sim{n}@{rate}"
                for pol in a.sim_policies.split(","):
                    epp, precise = policies[pol]
                    rows.append(run_one(f"{fleet}-{pol}", a, sim_cmd, n, epp, precise,
                                        bench_args(a.sim_workload, rate, a.sim_concurrency), 180))
        if "real" in a.parts:
            n = a.real_replicas

            def real_cmd(i):
                return [PY, "-m", "tidal.cli", "serve", "--model", "smollm2", "--host", "127.0.0.1",
                        "--port", str(a.base_port + i), "--kv-events-endpoint", f"tcp://*:{a.base_port + n + i}",
                        "--log-level", "warning"] + a.real_serve_args.split()
            for pol in a.real_policies.split(","):
                epp, precise = policies[pol]
                rows.append(run_one(f"real{n}-{pol}", a, real_cmd, n, epp, precise,
                                    bench_args(a.real_workload, a.real_rate, a.real_concurrency), 600))
    finally:
        stop(list(_children))
    print()
    print(table(rows))
    by = {r["name"]: r for r in rows}
    for r in rows:
        fleet, pol = r["name"].split("-", 1)
        line = ratios(by, r["name"], f"{fleet}-round-robin") if pol != "round-robin" else ""
        if line:
            print(line)
    with open(f"{a.out}/table.md", "w") as f:
        f.write(table(rows) + "\n")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
