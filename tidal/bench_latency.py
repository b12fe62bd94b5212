"""`tidal bench latency`: one request at a time, the chat case (TTFT and decode tokens/s).

Owns: the single-stream workload (random token ids of one prompt length, a fresh prompt per
iteration so no prefix is reused), timing time-to-first-token and the decode rate of each
iteration with the engine's own step loop, and the JSON record (`benchmark: "latency"`) that the
peer runners in bench/peers/ write too.
Must not: change engine behaviour; it only adds one request and steps until it finishes.
"""
from __future__ import annotations

import random
import statistics
import time

from tidal.bench import MIN_TOKEN_ID, Workload, _wait_for_cpu_kernels, register_bench_command
from tidal.bench_record import format_latency_table, make_record, write_record
from tidal.errors import TidalError


def latency_workload(prompt_len: int, output_len: int, iters: int, seed: int, vocab_size: int) -> Workload:
    """`iters` prompts of exactly `prompt_len` random ids (one per timed iteration, plus one warmup)."""
    if prompt_len < 1 or output_len < 2 or iters < 1:
        raise TidalError("--input-len must be >= 1, --output-len >= 2 and --num-iters >= 1", param="input_len")
    rng = random.Random(seed)
    prompts = [[rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(prompt_len)] for _ in range(iters + 1)]
    return Workload(prompts, [output_len] * (iters + 1), seed, (prompt_len, prompt_len), (output_len, output_len),
                    source="latency")


def latency_results(ttfts: list[float], decode_s: list[float], output_len: int, prompt_len: int,
                    load_s: float | None, **extra) -> dict:
    """Medians over iterations: TTFT (prefill + first token), decode tok/s after the first token."""
    decode_rates = [(output_len - 1) / d for d in decode_s]
    ttft = statistics.median(ttfts)
    return {"ttft_s": round(ttft, 4), "prefill_tokens_per_s": round(prompt_len / ttft, 1),
            "decode_tokens_per_s": round(statistics.median(decode_rates), 2),
            "tpot_ms": round(1000 / statistics.median(decode_rates), 2),
            "ttft_all_s": [round(t, 4) for t in ttfts], "decode_tokens_per_s_all": [round(r, 2) for r in decode_rates],
            "output_tokens": output_len, "load_s": None if load_s is None else round(load_s, 3), **extra}


def add_peer_latency_args(p) -> None:
    """The flags with which a peer runner in bench/peers/ replays this benchmark's workload."""
    p.add_argument("--latency", action="store_true", help="one stream: tidal bench latency's workload")
    p.add_argument("--num-iters", type=int, default=3, help="--latency: timed requests")
    p.add_argument("--latency-input-len", type=int, default=512)
    p.add_argument("--latency-output-len", type=int, default=128)


def _latency_args(p, add_engine_flags) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--input-len", type=int, default=512, help="prompt tokens (default 512)")
    g.add_argument("--output-len", type=int, default=128, help="generated tokens, EOS ignored (default 128)")
    g.add_argument("--num-iters", type=int, default=3, help="timed requests, one after another (default 3)")
    g.add_argument("--seed", type=int, default=0, help="workload seed")
    g.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the JSON record here")
    add_engine_flags(p)


def run_latency(args, engine_kwargs: dict) -> int:
    from tidal import LLM, SamplingParams
    _wait_for_cpu_kernels(engine_kwargs)
    llm = LLM(**{"prompt_len": args.input_len, "gen_len": args.output_len, **engine_kwargs})
    engine, cfg = llm.engine, llm.config
    wl = latency_workload(args.input_len, args.output_len, args.num_iters, args.seed, engine.runner.vocab_size)
    if args.input_len + args.output_len > engine.max_model_len:
        raise TidalError(f"prompt + output = {args.input_len + args.output_len} tokens, more than the model's "
                         f"{engine.max_model_len}; lower --input-len / --output-len", param="input_len")
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    ttfts, decode_s = [], []
    for i, prompt in enumerate(wl.prompts):   # the first one warms up and is not counted
        rid = engine.add_request(None, None, params, prompt_token_ids=prompt)
        t0 = time.perf_counter()
        first = None
        done = False
        while not done:
            for o in engine.step():
                if o.request_id == rid:
                    if first is None and o.outputs[0].token_ids:
                        first = time.perf_counter()
                    done = o.finished
        if i > 0:
            ttfts.append(first - t0)
            decode_s.append(time.perf_counter() - first)
    record = make_record(wl, {"name": "tidal", "model": cfg.model, "dtype": str(cfg.torch_dtype).removeprefix("torch."),
                              "device": str(cfg.torch_device), "args": {"quant": cfg.quant, "quant_head": cfg.quant_head,
                                                                        "kv_quant": cfg.kv_quant}},
                         latency_results(ttfts, decode_s, args.output_len, args.input_len, engine.runner.load_seconds))
    record["benchmark"] = "latency"
    print(format_latency_table([record]))
    write_record(record, args.json_path)
    return 0


register_bench_command("latency", _latency_args, run_latency,
                       "one request at a time: time to first token for --input-len, then decode tokens/s")
