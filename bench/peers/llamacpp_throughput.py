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
    if args.dataset:
        n_ctx = 4096
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=args.n_batch, verbose=False)
    load_s = time.perf_counter() - t0
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
    engine = {"name": "llama.cpp", "model": args.model, "model_path": path, "dtype": "gguf-native",
              "device": "cpu", "args": {"n_threads": args.threads, "n_batch": args.n_batch, "n_ctx": n_ctx,
                                        "streams": 1, "sampling": "greedy (top_k=1)"}}
    record = make_record(wl, engine, make_results(wl, elapsed, load_s, produced, cpu_s=round(cpu, 2)),
                         {"llama_cpp": importlib.metadata.version("llama_cpp_python")})
    print(format_table([record]))
    write_record(record, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
