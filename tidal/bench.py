"""Benchmarks: the shared workload and the `tidal bench ...` subcommands (the JSON record and the
table: bench_record.py).

Owns: generating a throughput workload (random token ids from a seed, or a JSONL dataset) that
tidal and the peer runners in bench/peers/ all replay, and the registry of `tidal bench`
subcommands (`throughput`, `compare`; `register_bench_command` adds more, e.g. `serve`).
Must not: change engine behaviour; it only drives `LLM.generate` and times it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

from tidal.bench_record import format_latency_table, format_table, make_record, make_results, write_record
from tidal.errors import TidalError

DEFAULT_NUM_PROMPTS, DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN = 64, (100, 512), (64, 256)
MIN_TOKEN_ID = 100  # random ids stay clear of the special tokens at the bottom of the vocabulary


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    seed: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    source: str = "random"

    def summary(self) -> dict:
        digest = hashlib.sha256(json.dumps([self.prompts, self.output_lens]).encode()).hexdigest()[:16]
        return {"num_prompts": len(self.prompts), "input_len": list(self.input_len),
                "output_len": list(self.output_len), "seed": self.seed, "source": self.source,
                "total_input_tokens": sum(map(len, self.prompts)), "total_output_tokens": sum(self.output_lens),
                "fingerprint": digest}


def make_workload(num_prompts: int = DEFAULT_NUM_PROMPTS, input_len=DEFAULT_INPUT_LEN, output_len=DEFAULT_OUTPUT_LEN,
                  seed: int = 0, vocab_size: int = 49152, dataset: str | None = None, tokenizer=None) -> Workload:
    """Same arguments -> the same token ids on every machine (Python's Mersenne Twister, not torch)."""
    if num_prompts < 1:
        raise TidalError("--num-prompts must be at least 1", param="num_prompts")
    for name, (lo, hi) in (("input-len", input_len), ("output-len", output_len)):
        if not 1 <= lo <= hi:
            raise TidalError(f"--{name} {lo}-{hi} must satisfy 1 <= low <= high", param=name)
    if vocab_size <= MIN_TOKEN_ID:
        raise TidalError(f"vocabulary of {vocab_size} is too small for random prompts (ids from {MIN_TOKEN_ID})")
    rng = random.Random(seed)
    out_lens = [rng.randint(*output_len) for _ in range(num_prompts)]
    if dataset is None:
        in_lens = [rng.randint(*input_len) for _ in range(num_prompts)]
        prompts = [[rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(n)] for n in in_lens]
        return Workload(prompts, out_lens, seed, tuple(input_len), tuple(output_len))
    prompts = _read_dataset(dataset, num_prompts, tokenizer)
    lens = [len(p) for p in prompts]
    return Workload(prompts, out_lens, seed, (min(lens), max(lens)), tuple(output_len), source=dataset)


def _read_dataset(path: str, num_prompts: int, tokenizer) -> list[list[int]]:
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise TidalError(f"cannot read --dataset '{path}' ({e.strerror})", param="dataset")
    except ValueError as e:
        raise TidalError(f"--dataset '{path}' is not JSONL ({e}); write one {{\"prompt\": ...}} per line")
    texts = [r["prompt"] for r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), str) and r["prompt"]]
    if len(texts) < num_prompts:
        raise TidalError(f"--dataset '{path}' has {len(texts)} usable {{\"prompt\": ...}} lines; "
                         f"lower --num-prompts to {len(texts)} or add prompts", param="dataset")
    return [list(tokenizer.encode(t)) for t in texts[:num_prompts]]


def parse_range(text: str) -> tuple[int, int]:
    """'100-512', '100:512' or '128' -> (low, high)."""
    parts = text.replace(":", "-").split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = None
    if lo is None or not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"'{text}' is not a length range; write LOW-HIGH (e.g. 100-512) or N")
    return lo, hi


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS)
    g.add_argument("--input-len", type=parse_range, default=DEFAULT_INPUT_LEN, help="LOW-HIGH, uniform (random ids)")
    g.add_argument("--output-len", type=parse_range, default=DEFAULT_OUTPUT_LEN, help="LOW-HIGH, uniform; EOS ignored")
    g.add_argument("--seed", type=int, default=0, help="workload seed")
    g.add_argument("--dataset", default=None, help='JSONL of {"prompt": ...} lines instead of random ids')
    g.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the JSON record here")
    g.add_argument("--no-tqdm", action="store_true", help="no progress bar")


def workload_from_args(args, vocab_size: int, tokenizer=None) -> Workload:
    return make_workload(args.num_prompts, args.input_len, args.output_len, args.seed, vocab_size,
                         args.dataset, tokenizer)


# ---- `tidal bench` subcommands ---------------------------------------------------------------
_COMMANDS: dict[str, tuple] = {}
# Modules that register more subcommands when imported; a missing one is skipped (built in parallel).
PLUGIN_MODULES = ["tidal.bench_latency", "tidal.server.bench"]


def register_bench_command(name: str, add_args, run, help: str = "") -> None:
    """`add_args(parser, add_engine_flags)` declares the flags; `run(args, engine_kwargs) -> int` runs it."""
    _COMMANDS[name] = (add_args, run, help)


def add_bench_parser(parser: argparse.ArgumentParser, add_engine_flags) -> None:
    import importlib
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:  # the plugin itself absent: skip; its dependency absent: say so, keep the rest
            if not (e.name and (mod == e.name or mod.startswith(e.name + "."))):
                print(f"tidal bench: {mod} not loaded ({e})", file=sys.stderr)
    sub = parser.add_subparsers(dest="bench_command", required=True)
    for name, (add_args, run, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p, add_engine_flags)
        p.set_defaults(bench_run=run)


def run_bench_cli(args, engine_kwargs: dict) -> int:
    return args.bench_run(args, engine_kwargs) or 0


def _throughput_args(p, add_engine_flags) -> None:
    add_workload_args(p)
    p.add_argument("--warmup", type=int, default=1, help="short warmup requests before timing (default 1)")
    p.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="constrain every request by this JSON schema (a file, inline JSON, or 'default': a list of "
                        "records), to measure what structured output costs; a request then ends where its JSON does")
    add_engine_flags(p)


def run_throughput(args, engine_kwargs: dict) -> int:
    from tidal import LLM, SamplingParams
    if not args.dataset:  # --policy auto plans for this workload's mean lengths, unless told otherwise
        engine_kwargs = {"prompt_len": round(sum(args.input_len) / 2), "gen_len": round(sum(args.output_len) / 2),
                         **engine_kwargs}
    _wait_for_cpu_kernels(engine_kwargs)
    llm = LLM(**engine_kwargs)
    runner, cfg = llm.engine.runner, llm.config
    wl = workload_from_args(args, runner.vocab_size, llm.tokenizer)
    limit = max(len(p) + n for p, n in zip(wl.prompts, wl.output_lens))
    if limit > llm.engine.max_model_len:
        raise TidalError(f"the workload needs {limit} tokens of context but the model allows "
                         f"{llm.engine.max_model_len}; lower --input-len / --output-len", param="input_len")
    prompts = [{"prompt_token_ids": p} for p in wl.prompts]
    schema = _bench_schema(args.json_schema)
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0,
                             structured_outputs={"json": schema} if schema else None) for n in wl.output_lens]
    if args.warmup > 0:
        llm.generate([{"prompt_token_ids": list(range(MIN_TOKEN_ID, MIN_TOKEN_ID + 16))}] * args.warmup,
                     SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0), use_tqdm=False)
    t0, c0, jumped0 = time.perf_counter(), time.process_time(), llm.engine.stats["jump_forward_tokens"]
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_tqdm)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    extra = {"jump_forward_tokens": llm.engine.stats["jump_forward_tokens"] - jumped0} if schema else {}
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != sum(wl.output_lens) and not schema:
        print(f"tidal bench: warning: {produced} output tokens, the workload asked for {sum(wl.output_lens)}",
              file=sys.stderr)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("model",)}
    placement = getattr(runner, "placement", None)  # only when the policy offloads weights
    engine = {"name": "tidal", "model": cfg.model, "model_path": runner.checkpoint.path,
              "dtype": str(cfg.torch_dtype).removeprefix("torch."), "device": str(cfg.torch_device),
              "args": {**settings, "num_kv_blocks": runner.num_blocks, "resolved_policy": str(runner.policy),
                       "json_schema": schema,
                       "weight_placement": placement.summary() if placement else None}}
    record = make_record(wl, engine, make_results(wl, elapsed, runner.load_seconds, produced, cpu_s=round(cpu, 2), **extra))
    print(format_table([record]))
    write_record(record, args.json_path)
    return 0


# Long enough to fill most output lengths of the default workload: records of three bounded fields.
_DEFAULT_SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
                                     "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
    "required": ["id", "name", "tags"]}}}, "required": ["records"]}


def _bench_schema(value: str | None) -> dict | None:
    if value is None:
        return None
    if value == "default":
        return _DEFAULT_SCHEMA
    try:
        if os.path.isfile(value):
            with open(value) as f:
                return json.load(f)
        return json.loads(value)
    except (OSError, ValueError) as e:
        raise TidalError(f"--json-schema '{value[:60]}' is neither a JSON file nor inline JSON ({e})",
                         param="json_schema")


def _wait_for_cpu_kernels(engine_kwargs: dict) -> None:
    """Time the compiled CPU kernels, not the torch fallback the engine serves with while they build
    in the background (a cold first run would otherwise measure ~2.5x too slow, with the compiler
    competing for the cores). Called before the model is built: layers pick their kernels then
    (kernels/quant_ops.py's int4 GEMV). cpu.load() says what it waits for, and gives up after a bound."""
    from tidal.config import resolve_device
    if resolve_device(engine_kwargs.get("device") or "auto").type != "cpu" \
            or os.environ.get("TIDAL_CPU_KERNELS", "1") == "0":
        return  # =0: the user asked to time the torch ops
    from tidal.kernels import cpu
    if cpu.load() is None:
        raise TidalError("the CPU kernels are not available (the 'CPU kernels unavailable' line above says why), "
                         "so this benchmark would time the slower torch reference ops; fix the build, or set "
                         "TIDAL_CPU_KERNELS=0 to benchmark the torch ops knowingly")


def _compare_args(p, add_engine_flags) -> None:
    p.add_argument("records", nargs="+", help="JSON records written by --json")


def read_record(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TidalError(f"cannot read benchmark record '{path}' ({e})")


def run_compare(args, engine_kwargs: dict) -> int:
    records = [read_record(p) for p in args.records]
    kinds = {r.get("benchmark", "throughput") for r in records}
    if len(kinds) > 1:
        raise TidalError(f"these records are of different benchmarks ({', '.join(sorted(kinds))}); compare like with like")
    if kinds == {"latency"}:
        print(format_latency_table(records))
    else:
        print(format_table(records))
    return 0


register_bench_command("throughput", _throughput_args, run_throughput,
                       "offline throughput: replay a fixed workload through LLM.generate and time it")
register_bench_command("compare", _compare_args, run_compare, "print JSON records side by side")
