"""`tidal bench serve`: load an OpenAI-compatible server and measure TTFT, TPOT, ITL and throughput.

Owns: the workload (random-token prompts sent as token ids, so input length is exact, with
ignore_eos so output length is exact, like vLLM's random dataset), Poisson arrivals (rate inf =
all at once) under an optional concurrency cap, streaming clients on httpx, the percentiles, the
table, and the JSON record (workload, engine "tidal-serve", versions, results).
Must not: import the engine or server; it only speaks HTTP, so it measures any compatible server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field

import httpx


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a length; write 128 or a range like 64-256")
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"'{text}': lengths must be >= 1 and low <= high")
    return a, b


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: inf = all at once)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--input-len", type=_range, default=(128, 128), help="prompt tokens: N or LO-HI")
    p.add_argument("--output-len", type=_range, default=(128, 128), help="generated tokens: N or LO-HI")
    p.add_argument("--vocab-low", type=int, default=1000, help="random prompt token ids are drawn from [low, high)")
    p.add_argument("--vocab-high", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the JSON record here")


@dataclass
class _Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


async def _request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> _Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    res = _Result(prompt_tokens=len(prompt))
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
                    res.error = event["error"].get("message", "error event")
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
        if not res.ok:
            res.error = "no tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"mean": sum(ms) / len(ms) if ms else float("nan"), "p50": _pct(ms, 50), "p90": _pct(ms, 90),
            "p99": _pct(ms, 99)}


async def _run(args) -> tuple[dict, list[_Result], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=None, limits=limits) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        rng = random.Random(args.seed)
        work = [([rng.randrange(args.vocab_low, args.vocab_high) for _ in range(rng.randint(*args.input_len))],
                 rng.randint(*args.output_len)) for _ in range(args.num_prompts)]
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(work), desc="requests", unit=" req", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None

        async def one(prompt, out_len):
            if gate is None:
                res = await _request(client, model, prompt, out_len)
            else:
                async with gate:
                    res = await _request(client, model, prompt, out_len)
            if bar is not None:
                bar.update(1)
            return res

        tasks, t0 = [], time.perf_counter()
        for prompt, out_len in work:
            tasks.append(asyncio.ensure_future(one(prompt, out_len)))
            if math.isfinite(args.request_rate) and args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    return {"model": model}, results, duration


def summarize(results: list[_Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_tokens_per_s": out_tokens / duration if duration else 0.0,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]), "e2el_ms": _stats([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    v = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("tidal", "httpx"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return v


def _finite(x):
    """NaN (a percentile of nothing) is not JSON; write null instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def run_bench_serve(args) -> int:
    meta, results, duration = asyncio.run(_run(args))
    summary = summarize(results, duration)
    workload = {"kind": "serve", "url": args.url, "model": meta["model"], "num_prompts": args.num_prompts,
                "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
                "max_concurrency": args.max_concurrency, "input_len": list(args.input_len),
                "output_len": list(args.output_len), "dataset": "random token ids, ignore_eos", "seed": args.seed}
    print(f"\n{'tidal bench serve':=^60}")
    for label, key in (("completed / failed", None), ("duration (s)", "duration_s"),
                       ("request throughput (req/s)", "request_throughput"),
                       ("output throughput (tok/s)", "output_tokens_per_s"),
                       ("total throughput (tok/s)", "total_tokens_per_s")):
        value = f"{summary['completed']} / {summary['failed']}" if key is None else f"{summary[key]:.2f}"
        print(f"{label:<36}{value:>24}")
    print(f"{'':<12}{'mean':>12}{'p50':>12}{'p90':>12}{'p99':>12}")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = summary[name]
        print(f"{name:<12}" + "".join(f"{s[k]:>12.2f}" for k in ("mean", "p50", "p90", "p99")))
    for err in summary["errors"]:
        print(f"error: {err}", file=sys.stderr)
    if args.json:
        record = {"workload": workload, "engine": "tidal-serve", "versions": _versions(), "results": summary,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(args.json, "w") as f:
            json.dump(_finite(record), f, indent=2, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if summary["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tidal bench serve", description=__doc__.splitlines()[0])
    add_bench_serve_args(p)
    return run_bench_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
