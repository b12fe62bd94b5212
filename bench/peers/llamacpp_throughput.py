"""Peer runner: llama.cpp (llama-cpp-python) on tidal's throughput workload, one stream.

Owns: loading the same GGUF into llama.cpp, feeding each request's token ids, generating
exactly its out_len tokens greedily (EOS is not a stop: generation goes on until the count is
reached), one request after another, and writing the same JSON record as `tidal bench throughput`.
llama-cpp-python is a benchmark-only dependency: `pip install llama-cpp-python` (it compiles).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time

from tqdm import tqdm

from tidal.bench import add_workload_args, format_table, make_record, make_results, workload_from_args, write_record
from tidal.bench_latency import add_peer_latency_args, latency_results, latency_workload
from tidal.bench_record import format_latency_table
from tidal.weights.loader import open_checkpoint, resolve_model_path


def generate_exact(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy, exactly n tokens. reset() first so no KV prefix from the previous request is reused."""
    llm.reset()
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=False):
        out.append(token)
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--model", default="smollm2", help="a .gguf file or an alias")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-batch", type=int, default=512, help="llama.cpp prompt batch")
    add_peer_latency_args(p)
    args = p.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2
    path = resolve_model_path(args.model)
    if os.path.isdir(path):
        print(f"llama.cpp needs a .gguf file, not the directory {path}", file=sys.stderr)
        return 2
    # the context must hold the longest request; sized before the workload exists, from the ranges
    n_ctx = args.input_len[1] + args.output_len[1] + 16
    if args.latency:
        n_ctx = args.latency_input_len + args.latency_output_len + 16
    if args.dataset:
        n_ctx = 4096
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=args.n_batch, verbose=False)
    load_s = time.perf_counter() - t0
    engine = {"name": "llama.cpp", "model": args.model, "model_path": path, "dtype": "gguf-native",
              "device": "cpu", "args": {"n_threads": args.threads, "n_batch": args.n_batch, "n_ctx": n_ctx,
                                        "streams": 1, "sampling": "greedy (top_k=1)"}}
    versions = {"llama_cpp": importlib.metadata.version("llama_cpp_python")}
    if args.latency:
        return run_latency(llm, args, engine, versions, load_s)
    tokenizer = open_checkpoint(args.model).load_tokenizer() if args.dataset else None
    wl = workload_from_args(args, llm.n_vocab(), tokenizer)
    longest = max(len(q) + n for q, n in zip(wl.prompts, wl.output_lens))
    if longest > n_ctx:
        print(f"a request needs {longest} tokens of context, more than n_ctx={n_ctx}", file=sys.stderr)
        return 2
    generate_exact(llm, list(range(100, 116)), 4)  # warmup
    produced = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for prompt, n in tqdm(list(zip(wl.prompts, wl.output_lens)), desc="llama.cpp", unit=" req",
                          disable=args.no_tqdm):
        produced += len(generate_exact(llm, prompt, n))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    record = make_record(wl, engine, make_results(wl, elapsed, load_s, produced, cpu_s=round(cpu, 2)), versions)
    print(format_table([record]))
    write_record(record, args.json_path)
    return 0


def run_latency(llm, args, engine: dict, versions: dict, load_s: float) -> int:
    """TTFT (prompt eval + first token) and decode tokens/s, one request at a time, as tidal bench latency."""
    wl = latency_workload(args.latency_input_len, args.latency_output_len, args.num_iters, args.seed, llm.n_vocab())
    ttfts, decode_s = [], []
    for i, prompt in enumerate(wl.prompts):
        llm.reset()
        t0 = time.perf_counter()
        first, n = None, 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=False):
            n += 1
            first = first or time.perf_counter()
            if n == args.latency_output_len:
                break
        if i > 0:
            ttfts.append(first - t0)
            decode_s.append(time.perf_counter() - first)
    record = make_record(wl, engine, latency_results(ttfts, decode_s, args.latency_output_len,
                                                     args.latency_input_len, load_s), versions)
    record["benchmark"] = "latency"
    print(format_latency_table([record]))
    write_record(record, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
