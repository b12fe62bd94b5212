"""The `tidal` command: chat, generate, bench (later: serve, batch, plan, gateway).

Owns: argparse for every subcommand (engine flags come from config.ENGINE_FLAGS, so names
match `LLM(...)` and the server), streaming text to the terminal, and turning a TidalError
into one clear line on stderr with exit code 2 instead of a traceback.
Must not: implement engine behaviour; it only calls the engine and prints.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from tidal.errors import TidalError


def _add_engine_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ("seed",)) -> None:
    from tidal.config import add_engine_flags   # config imports torch: not at `tidal --help` time
    add_engine_flags(p, skip)


def engine_kwargs(args: argparse.Namespace) -> dict:
    from tidal.config import engine_kwargs as kwargs_of
    return kwargs_of(args)


# What `tidal chat` samples with when neither a flag nor the model's generation config says:
# moderate sampling (greedy decoding of small chat models loops), a reply of a screen or so.
_CHAT_FALLBACK = {"temperature": 0.7, "top_p": 0.9}


def _add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int, fallback: str) -> None:
    g = p.add_argument_group("sampling (unset: the model's generation config, else " + fallback + ")")
    p.set_defaults(default_max_tokens=max_tokens)
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens in the reply (default {max_tokens}); it also stops at the end of its turn")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy; higher = more varied")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: sample from the smallest set of tokens whose probability reaches this")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="above 1 discourages repeating tokens (HF semantics; default 1 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for a reproducible reply")


def _sampling(args, engine, fallback: dict):
    """Flags given on the command line, then the model's generation config, then `fallback`."""
    from tidal.sampling import SamplingParams
    kw = {**fallback, "max_tokens": args.default_max_tokens, **engine.default_sampling, "seed": args.seed}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return SamplingParams(**kw)


def _make_engine(args):
    from tidal.config import EngineConfig
    from tidal.engine.llm_engine import LLMEngine
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)), verbose=True)
    if os.environ.get("TIDAL_VERBOSE"):
        print(f"[tidal] model ready in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return engine


def _stream(engine, prompt_token_ids: list[int], params, out=None) -> str:
    """Run one request to completion, printing each text delta as it arrives (to sys.stdout as it
    is at call time, not at import time)."""
    out = out or sys.stdout
    rid = engine.add_request(None, None, params, prompt_token_ids=prompt_token_ids)
    text = ""
    try:
        while True:
            for o in engine.step():
                if o.request_id != rid:
                    continue
                delta = o.outputs[0].delta_text
                if delta:
                    out.write(delta)
                    out.flush()
                if o.finished:
                    out.write("\n")
                    return o.outputs[0].text
    except KeyboardInterrupt:
        engine.abort_request(rid)
        out.write("\n")
        return text


def _light_tokenizer() -> None:
    """chat and generate only encode, decode and apply the chat template, so a GGUF model's tokenizer
    need not import transformers (weights/light_tokenizer.py): about 1.5 s of the start-up."""
    from tidal.weights.loader import use_light_tokenizer
    use_light_tokenizer(True)


def cmd_chat(args) -> int:
    _light_tokenizer()
    engine = _make_engine(args)
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise TidalError("this model has no chat template; use `tidal generate --prompt ...` instead")
    params = _sampling(args, engine, _CHAT_FALLBACK)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def ask(text: str) -> None:
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        reply = _stream(engine, ids, params)
        messages.append({"role": "assistant", "content": reply})

    if args.prompt:
        ask(" ".join(args.prompt))
        return 0
    print("tidal chat — type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            del messages[1 if args.system else 0:]
            continue
        if line:
            ask(line)


def cmd_generate(args) -> int:
    _light_tokenizer()
    engine = _make_engine(args)
    ids = engine.tokenizer.encode(args.prompt)
    if args.echo:
        sys.stdout.write(args.prompt)
    _stream(engine, ids, _sampling(args, engine, {"temperature": 0.0}))
    return 0


def cmd_bench(args) -> int:
    from tidal.bench import run_bench_cli
    return run_bench_cli(args, engine_kwargs(args))


# The subcommands whose parsers are built here, without importing another module's parser.
_CORE_COMMANDS = ("chat", "generate")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser; `only="chat"` / `"generate"` builds just that one (start-up: the others
    import the server, the batch runner and the benchmarks' HTTP client, about 0.1-0.2 s)."""
    parser = argparse.ArgumentParser(prog="tidal", description="tidal: LLM inference engine and server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat with a model (streams the reply; interactive without a prompt)")
    p.add_argument("prompt", nargs="*", help="one message; omit for an interactive session")
    p.add_argument("--system", default=None, help="system message")
    _add_engine_flags(p)
    _add_sampling_flags(p, max_tokens=256, fallback="temperature 0.7, top-p 0.9")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="raw text completion of a prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    _add_engine_flags(p)
    _add_sampling_flags(p, max_tokens=128, fallback="greedy")
    p.set_defaults(func=cmd_generate)
    if only in _CORE_COMMANDS:
        return parser

    try:
        from tidal.bench import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        p = sub.add_parser("bench", help="benchmarks: throughput (offline engine)")
        add_bench_parser(p, _add_engine_flags)
        p.set_defaults(func=cmd_bench)
    from tidal.batch import add_batch_parser, run_batch
    p = add_batch_parser(sub, _add_engine_flags)
    p.set_defaults(func=lambda a: run_batch(a, engine_kwargs(a)))
    from tidal.server.cli import add_serve_parser, run_serve
    p = add_serve_parser(sub, _add_engine_flags)
    p.set_defaults(func=lambda a: run_serve(a, engine_kwargs(a)))
    from tidal.quantize import add_quantize_parser, run_quantize
    add_quantize_parser(sub).set_defaults(func=run_quantize)
    from tidal.plan.cli import add_parser as add_plan_parser
    add_plan_parser(sub)  # sets func=tidal.plan.cli.run
    from tidal.fleet.gateway_cli import add_gateway_parser
    add_gateway_parser(sub)  # sets func=tidal.fleet.gateway_cli.run_gateway
    from tidal.fleet.cluster import add_cluster_parser
    add_cluster_parser(sub)  # `tidal cluster up`: sets func=tidal.fleet.cluster.run_cluster_up
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in _CORE_COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        return args.func(args) or 0
    except TidalError as e:
        print(f"tidal: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
