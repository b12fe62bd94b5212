"""`tidal serve`: flags, engine start-up, and uvicorn.

Owns: `add_serve_parser(subparsers, add_engine_flags)` (the serve subcommand's flags plus every
engine flag) and `run_serve(args, engine_kwargs)` (load the engine, build the app, run uvicorn
until SIGINT/SIGTERM; uvicorn's graceful shutdown lets in-flight requests finish, then the app's
lifespan drains and stops the engine).
Must not: define routes (app.py) or parse engine flags itself (config.ENGINE_FLAGS via tidal/cli.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def add_serve_parser(subparsers, add_engine_flags) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat and completions, streaming)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("TIDAL_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $TIDAL_API_KEY; /health stays open)")
    g.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    g.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB (bigger: 413)")
    g.add_argument("--shutdown-timeout", type=float, default=None,
                   help="on SIGTERM, seconds to wait for in-flight requests (default: until they finish)")
    g.add_argument("--engine-process", action="store_true",
                   help="run the engine in its own process (ZeroMQ), so HTTP work never competes with it for the GIL")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_flags(p, skip=())   # the server has no per-command sampling seed, so --seed is the engine's
    return p


def run_serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    import uvicorn

    from tidal.config import EngineConfig
    from tidal.engine.async_engine import AsyncEngine
    from tidal.server.app import build_app

    kwargs = dict(engine_kwargs)
    if getattr(args, "seed", None) is not None:
        kwargs.setdefault("seed", args.seed)
    config = EngineConfig.from_kwargs(**kwargs)
    t0 = time.perf_counter()
    engine = AsyncEngine.from_config(config, verbose=True, process=args.engine_process)
    name = args.served_model_name or config.model
    app = build_app(engine, name, args.api_key, model_aliases=(config.model,),
                    max_body_bytes=int(args.max_body_mb * 2**20), drain_timeout=args.shutdown_timeout)
    print(f"[tidal] serving `{name}` (max_model_len {engine.max_model_len}, KV cache "
          f"{engine.kv_capacity_tokens} tokens) on http://{args.host}:{args.port}/v1 "
          f"after {time.perf_counter() - t0:.1f} s{' with an API key' if args.api_key else ''}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout,
                                           timeout_keep_alive=5))
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tidal.server.cli [flags]`, the same as `tidal serve [flags]`."""
    from tidal.cli import _add_engine_flags, engine_kwargs
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
