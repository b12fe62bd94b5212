"""`tidal serve`: flags, engine start-up, and uvicorn.

Owns: `add_serve_parser(subparsers, add_engine_flags)` (the serve subcommand's flags plus every
engine flag, each server flag checked by argparse so a bad value is one line and exit code 2) and
`run_serve(args, engine_kwargs)` (load the engine, or with --simulate a simulated core
(tidal/sim/) with the model's tokenizer only, build the app, run uvicorn until SIGINT/SIGTERM;
uvicorn's graceful shutdown lets in-flight requests finish, --shutdown-timeout ends the ones still
running with an error, then the app's lifespan drains and stops the engine).
Must not: define routes (app.py), set up uvicorn's protocol (uvicorn_server.py) or parse engine
flags itself (config.ENGINE_FLAGS via tidal/cli.py).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time

_LOOPBACK_NAMES = ("localhost",)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0..65535)")
    return value


def _number(kind: type, low: float, allow_none: bool = False):
    def parse(text: str):
        if allow_none and text.lower() in ("none", "off"):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value >= low:   # also rejects NaN
            raise argparse.ArgumentTypeError(f"{text} must be at least {low:g}")
        return value
    return parse


def _hosts(text: str) -> list[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


def is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_serve_parser(subparsers, add_engine_flags) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat and completions, streaming)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=_port, default=8000)
    g.add_argument("--api-key", default=os.environ.get("TIDAL_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $TIDAL_API_KEY; /health stays open)")
    g.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    g.add_argument("--allowed-hosts", type=_hosts, default=None, metavar="HOST[,HOST...]",
                   help="Host header values to accept besides loopback names (`*`: any); without it a server on "
                        "loopback with no API key accepts only loopback names (DNS rebinding: 400), others any")
    g.add_argument("--max-body-mb", type=_number(float, 0.001), default=8.0,
                   help="largest request body in MiB (bigger: 413)")
    g.add_argument("--max-seqs-per-request", type=_number(int, 1), default=256,
                   help="most sequences (prompts x n) one request may ask for (more: 400; default 256)")
    g.add_argument("--timeout-keep-alive", type=_number(int, 1), default=5,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    g.add_argument("--header-timeout", type=_number(float, 0.1, allow_none=True), default=10.0,
                   help="seconds a client has to send a request's headers, from connecting or from its first byte "
                        "(slow: 408 and closed; default 10, `none`: no limit)")
    g.add_argument("--body-timeout", type=_number(float, 0.1, allow_none=True), default=60.0,
                   help="seconds a client has to send a request's body (slow: 408; default 60, `none`: no limit)")
    g.add_argument("--max-connections", type=_number(int, 1), default=1024,
                   help="open connections at most; a request on one past it gets a 503 (default 1024)")
    g.add_argument("--shutdown-timeout", type=_number(float, 0), default=None,
                   help="on SIGTERM, seconds to wait for in-flight requests before ending them with an error "
                        "(default: until they finish)")
    g.add_argument("--engine-process", action="store_true",
                   help="run the engine in its own process (ZeroMQ), so HTTP work never competes with it for the GIL")
    g.add_argument("--tool-parser", default="auto", choices=["auto", "hermes", "llama3_json"],
                   help='how tool_choice "auto" finds tool calls in the text: hermes (<tool_call>{...}</tool_call>), '
                        "llama3_json ({\"name\": ..., \"parameters\": ...}), auto: by the chat template (default)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    f = p.add_argument_group("fleet")
    f.add_argument("--kv-events-endpoint", default=None, metavar="ENDPOINT",
                   help="publish the KV cache's block events on this ZeroMQ PUB endpoint in vLLM's format, e.g. "
                        "tcp://*:5557 (bound; tcp://HOST:PORT connects); default: off")
    f.add_argument("--simulate", action="store_true",
                   help="a replica with no model: the real server, scheduler and KV cache over a latency model "
                        "(only --model's tokenizer is loaded); for fleet and router tests")
    f.add_argument("--sim-config", default=None, metavar="FILE",
                   help="--simulate's settings as JSON: base_ms, prefill_ms_per_token, prefill_ms_per_token_kctx, "
                        "decode_ms_per_seq, num_kv_blocks, eos_probability, time_scale (defaults: "
                        "tidal/sim/latency.py, fitted by bench/calibrate_sim.py)")
    f.add_argument("--sim-base-ms", type=_number(float, 0), default=None, help="--simulate: a step's fixed ms")
    f.add_argument("--sim-prefill-ms-per-token", type=_number(float, 0), default=None,
                   help="--simulate: ms per uncached prompt token in a step")
    f.add_argument("--sim-prefill-ms-per-token-kctx", type=_number(float, 0), default=None,
                   help="--simulate: ms per uncached prompt token per 1,000 tokens of context before it")
    f.add_argument("--sim-decode-ms-per-seq", type=_number(float, 0), default=None,
                   help="--simulate: ms per decoding sequence in a step")
    add_engine_flags(p, skip=())   # the server has no per-command sampling seed, so --seed is the engine's
    return p


def run_serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from tidal.config import EngineConfig
    from tidal.engine.async_engine import AsyncEngine
    from tidal.server.app import build_app
    from tidal.server.uvicorn_server import make_server

    kwargs = dict(engine_kwargs)
    if getattr(args, "seed", None) is not None:
        kwargs.setdefault("seed", args.seed)
    if getattr(args, "kv_events_endpoint", None):
        kwargs["kv_events_endpoint"] = args.kv_events_endpoint
    config = EngineConfig.from_kwargs(**kwargs)
    t0 = time.perf_counter()
    if getattr(args, "simulate", False):
        from tidal.errors import TidalError
        from tidal.sim import SimConfig, SimulatedCore
        if args.engine_process:
            raise TidalError("--simulate runs its core in a thread; drop --engine-process", param="simulate")
        sim = SimConfig.load(args.sim_config, base_ms=args.sim_base_ms, decode_ms_per_seq=args.sim_decode_ms_per_seq,
                             prefill_ms_per_token=args.sim_prefill_ms_per_token,
                             prefill_ms_per_token_kctx=args.sim_prefill_ms_per_token_kctx)
        engine = AsyncEngine(SimulatedCore(config, sim))
    else:
        engine = AsyncEngine.from_config(config, verbose=True, process=args.engine_process)
    name = args.served_model_name or config.model
    allowed_hosts = args.allowed_hosts
    if allowed_hosts is None and is_loopback(args.host) and not args.api_key:
        allowed_hosts = []   # loopback names only
    app = build_app(engine, name, args.api_key, model_aliases=(config.model,),
                    max_body_bytes=int(args.max_body_mb * 2**20), drain_timeout=args.shutdown_timeout,
                    allowed_hosts=allowed_hosts, body_timeout=args.body_timeout,
                    max_seqs_per_request=args.max_seqs_per_request,
                    default_sampling=getattr(engine, "default_sampling", None), tool_parser=args.tool_parser)
    print(f"[tidal] serving `{name}` (max_model_len {engine.max_model_len}, KV cache "
          f"{engine.kv_capacity_tokens} tokens) on http://{args.host}:{args.port}/v1 "
          f"after {time.perf_counter() - t0:.1f} s{' with an API key' if args.api_key else ''}", file=sys.stderr)
    server = make_server(app, args.host, args.port, log_level=args.log_level,
                         timeout_keep_alive=args.timeout_keep_alive, header_timeout=args.header_timeout,
                         max_connections=args.max_connections, shutdown_timeout=args.shutdown_timeout)
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tidal.server.cli [flags]`, the same as `tidal serve [flags]`."""
    from tidal.config import add_engine_flags as _add_engine_flags
    from tidal.config import engine_kwargs
    from tidal.errors import TidalError
    parser = argparse.ArgumentParser(prog="tidal")
    add_serve_parser(parser.add_subparsers(dest="command"), _add_engine_flags)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_serve(args, engine_kwargs(args))
    except TidalError as e:
        print(f"tidal: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
