"""`tidal bench serve`: load an OpenAI-compatible server and measure TTFT, TPOT, ITL and throughput.

Owns: the serving benchmark (Poisson arrivals, rate inf = all at once, under an optional
concurrency cap; streaming clients on httpx; per-request TTFT / TPOT / ITL / end-to-end latency
and their p50/p90/p99), and its registration as the `serve` subcommand of `tidal bench`. The
workload and the record come from tidal.bench, so with the same seed and lengths the prompts are
the ones `tidal bench throughput` replays (same fingerprint) and `tidal bench compare` reads both.
Prompts go out as token ids (exact input length) with ignore_eos (exact output length).
`--dataset shared-prefix` is a built-in prefix-caching workload instead (`make_shared_prefix_workload`):
G groups x P prompts, each prompt = its group's shared system prompt (--prefix-len ids) + its own
question (--question-len ids), sent in a seeded shuffle so the groups arrive interleaved.
Must not: import the engine or the server app; it only speaks HTTP, so it measures any
OpenAI-compatible server that accepts token-id prompts and `ignore_eos`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field

import httpx

from tidal.bench import (MIN_TOKEN_ID, Workload, add_workload_args, format_table, make_record, make_results,
                         workload_from_args, write_record)
from tidal.errors import TidalError


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL, without /v1")
    g.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: inf = all at once)")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="random prompt ids are drawn below this (default: the server's vocab_size)")
    add_workload_args(p)
    g = p.add_argument_group("shared-prefix workload (--dataset shared-prefix)",
                             "groups of prompts sharing a system prompt, arriving interleaved; "
                             "--num-prompts is then groups x prompts per group")
    g.add_argument("--num-groups", type=int, default=16, help="groups, each with its own shared prefix (default 16)")
    g.add_argument("--prompts-per-group", type=int, default=16, help="prompts per group (default 16)")
    g.add_argument("--prefix-len", type=int, default=2048, help="shared prefix (system prompt) tokens (default 2048)")
    g.add_argument("--question-len", type=int, default=128, help="each prompt's own tokens after it (default 128)")


SHARED_PREFIX = "shared-prefix"


def make_shared_prefix_workload(num_groups: int = 16, prompts_per_group: int = 16, prefix_len: int = 2048,
                                question_len: int = 128, output_len=(128, 128), seed: int = 0,
                                vocab_size: int = 49152) -> Workload:
    """`num_groups` shared prefixes of `prefix_len` random ids, each followed by `prompts_per_group`
    questions of `question_len` ids; the prompts shuffled (groups interleaved). Token-exact and the
    same for the same arguments on every machine. `groups` gives each prompt's group, in send order."""
    for name, v in (("num-groups", num_groups), ("prompts-per-group", prompts_per_group),
                    ("prefix-len", prefix_len), ("question-len", question_len)):
        if v < 1:
            raise TidalError(f"--{name} must be at least 1", param=name.replace("-", "_"))
    if not 1 <= output_len[0] <= output_len[1]:
        raise TidalError(f"--output-len {output_len[0]}-{output_len[1]} must satisfy 1 <= low <= high",
                         param="output_len")
    if vocab_size <= MIN_TOKEN_ID:
        raise TidalError(f"vocabulary of {vocab_size} is too small for random prompts (ids from {MIN_TOKEN_ID})")
    import random
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(n)]  # noqa: E731
    prefixes = [ids(prefix_len) for _ in range(num_groups)]
    items = [(g, prefixes[g] + ids(question_len)) for g in range(num_groups) for _ in range(prompts_per_group)]
    rng.shuffle(items)
    out_lens = [rng.randint(*output_len) for _ in items]
    n = prefix_len + question_len
    w = Workload([p for _, p in items], out_lens, seed, (n, n), tuple(output_len),
                 source=f"{SHARED_PREFIX}:{num_groups}x{prompts_per_group},prefix={prefix_len},question={question_len}")
    w.groups = [g for g, _ in items]
    return w


@dataclass
class _Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0


async def _request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> _Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    res = _Result()
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"].get("message", "error event"))
                    return res
                if event.get("usage"):
                    res.output_tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", ())):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = res.output_tokens > 0
        res.error = "" if res.ok else "no tokens came back"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(seconds: list[float]) -> dict:
    ms = [v * 1000 for v in seconds]
    return {"mean": round(sum(ms) / len(ms), 3) if ms else None,
            **{f"p{q}": None if _pct(ms, q) is None else round(_pct(ms, q), 3) for q in (50, 90, 99)}}


class _ServerTokenizer:
    """`encode` through the server's /tokenize, so --dataset works without a local tokenizer."""

    def __init__(self, url: str, headers: dict):
        self.url, self.headers = url, headers

    def encode(self, text: str) -> list[int]:
        r = httpx.post(self.url + "/tokenize", json={"prompt": text}, headers=self.headers, timeout=60)
        r.raise_for_status()
        return r.json()["tokens"]


async def _run(args, model: str, workload) -> tuple[list[_Result], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    n = len(workload.prompts)
    limits = httpx.Limits(max_connections=args.max_concurrency or n + 8, max_keepalive_connections=64)
    bar = None
    if not args.no_tqdm:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="requests", unit=" req", file=sys.stderr, dynamic_ncols=True)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=None, limits=limits) as client:
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(prompt, out_len):
            if gate is None:
                res = await _request(client, model, prompt, out_len)
            else:
                async with gate:
                    res = await _request(client, model, prompt, out_len)
            if bar is not None:
                bar.update(1)
            return res

        import random
        gaps = random.Random(args.seed + 1)   # arrival times from their own stream: prompts stay the same
        tasks, t0 = [], time.perf_counter()
        for prompt, out_len in zip(workload.prompts, workload.output_lens):
            tasks.append(asyncio.ensure_future(one(prompt, out_len)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(gaps.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return results, elapsed


def run_bench_serve(args) -> int:
    if not args.request_rate > 0:
        raise TidalError("--request-rate must be > 0 (inf = all at once)", param="request_rate")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise TidalError("--max-concurrency must be at least 1", param="max_concurrency")
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        card = httpx.get(url + "/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise TidalError(f"cannot list models at {url}/v1/models ({e}); is the server up (tidal serve)?",
                         param="url")
    model = args.model or card["id"]
    vocab = args.vocab_size or card.get("vocab_size") or 32000
    if args.dataset == SHARED_PREFIX:
        workload = make_shared_prefix_workload(args.num_groups, args.prompts_per_group, args.prefix_len,
                                               args.question_len, args.output_len, args.seed, vocab)
    else:
        workload = workload_from_args(args, vocab, _ServerTokenizer(url, headers) if args.dataset else None)
    results, elapsed = asyncio.run(_run(args, model, workload))
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    latency = {"completed": len(ok), "failed": len(results) - len(ok),
               "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
               "itl_ms": _stats([x for r in ok for x in r.itl]), "e2el_ms": _stats([r.e2e for r in ok]),
               "errors": sorted({r.error for r in results if not r.ok})[:5]}
    engine = {"name": "tidal-serve", "model": model, "url": url, "max_model_len": card.get("max_model_len"),
              "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
              "max_concurrency": args.max_concurrency}
    record = make_record(workload, engine, make_results(workload, elapsed, None, sum(r.output_tokens for r in ok),
                                                        **latency))
    record["benchmark"] = "serve"
    if args.dataset == SHARED_PREFIX:
        record["workload"]["shared_prefix"] = {"num_groups": args.num_groups, "prompts_per_group": args.prompts_per_group,
                                               "prefix_len": args.prefix_len, "question_len": args.question_len}
    print(format_table([record]))
    print(f"{'':<14}{'mean':>12}{'p50':>12}{'p90':>12}{'p99':>12}")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        cells = ["-" if latency[name][k] is None else f"{latency[name][k]:,.2f}" for k in ("mean", "p50", "p90", "p99")]
        print(f"{name:<14}" + "".join(f"{c:>12}" for c in cells))
    print(f"completed {len(ok)} / {len(results)}")
    for err in latency["errors"]:
        print(f"error: {err}", file=sys.stderr)
    write_record(record, args.json_path)
    return 0 if ok and len(ok) == len(results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tidal bench serve", description=__doc__.splitlines()[0])
    add_bench_serve_args(p)
    try:
        return run_bench_serve(p.parse_args(argv))
    except TidalError as e:
        print(f"tidal: error: {e.message}", file=sys.stderr)
        return 2


def _register() -> None:
    from tidal.bench import register_bench_command
    register_bench_command("serve", lambda p, add_engine_flags: add_bench_serve_args(p),
                           lambda args, engine_kwargs: run_bench_serve(args),
                           "online serving: stream requests to a running server (tidal serve), TTFT/TPOT/ITL")


_register()

if __name__ == "__main__":
    sys.exit(main())
