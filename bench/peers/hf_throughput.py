"""Peer runner: Hugging Face transformers batched `generate` on tidal's throughput workload.

Owns: loading the same checkpoint (GGUF or HF directory) into transformers, replaying the
workload from `tidal.bench.make_workload` in static batches, and writing the same JSON record
as `tidal bench throughput`.
Must not: import tidal's engine (only tidal.bench and the model-path resolver).

Counting (see README.md): requests are sorted by (output length, input length) and cut into
batches of --batch-size; each batch is left-padded and generates max(out_len) tokens with
min_new_tokens = max_new_tokens (EOS never stops it). Only each request's own out_len tokens
count as output; the extra tokens a shorter request generates to keep its batch going, and
the padding, count as waste (reported as generated_tokens_incl_waste).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch
from tqdm import tqdm

from tidal.bench import add_workload_args, format_table, make_record, make_results, workload_from_args, write_record
from tidal.weights.loader import open_checkpoint, resolve_model_path


def load_model(model: str, dtype: torch.dtype, device: str = "cpu", dummy: bool = False, gguf_packed: bool = False):
    """The model in transformers. A GGUF is dequantized into a dense model of `dtype` unless `gguf_packed`:
    transformers 5.2x otherwise keeps its weights in GGUF blocks and casts around float32 matmul kernels."""
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig
    path = resolve_model_path(model)
    if dummy:  # random weights from config.json alone, like tidal's --load-format dummy
        config = AutoConfig.from_pretrained(path if os.path.isdir(path) else os.path.dirname(path))
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), path
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device), path
    if importlib.util.find_spec("accelerate") is None:   # transformers needs it to load a GGUF file
        raise SystemExit("hf_throughput.py: transformers loads a GGUF only with accelerate installed: "
                         "pip install accelerate (the test extra has it: pip install -e '.[test]')")
    qc = None if gguf_packed else GgufConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=dtype, quantization_config=qc).eval().to(device), path


@torch.inference_mode()
def run_batches(model, prompts: list[list[int]], out_lens: list[int], batch_size: int, pad_id: int,
                progress: bool = True) -> tuple[float, float, int]:
    """Time the whole workload at one batch size; returns (elapsed s, CPU s, tokens generated incl. waste)."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (out_lens[i], len(prompts[i])))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    generated = 0
    bar = tqdm(total=len(prompts), desc=f"hf bs={batch_size}", unit=" req", disable=not progress)
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in batches:
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every row's last prompt token sits in the last column
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        n = max(out_lens[i] for i in idx)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] - width == n, f"generate stopped after {out.shape[1] - width} of {n} tokens"
        if device.type == "cuda":
            torch.cuda.synchronize()
        generated += len(idx) * n
        bar.update(len(idx))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    bar.close()
    return elapsed, cpu, generated


def sweep_batch_sizes(model, wl, batch_sizes: str, load_s: float, progress: bool) -> tuple[dict, int]:
    """Warm up, run the workload at each batch size in the comma list, and return (the best run's
    results with a "sweep" list of every size, the best batch size)."""
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    run_batches(model, [list(range(100, 116))], [4], 1, pad_id, progress=False)  # warmup
    sweep = []
    for bs in [int(b) for b in batch_sizes.split(",")]:
        elapsed, cpu, generated = run_batches(model, wl.prompts, wl.output_lens, bs, pad_id, progress)
        sweep.append({"batch_size": bs, **make_results(wl, elapsed, load_s, cpu_s=round(cpu, 2),
                                                       generated_tokens_incl_waste=generated)})
        print(f"batch {bs}: {sweep[-1]['output_tokens_per_s']} output tok/s", file=sys.stderr)
    best = max(sweep, key=lambda r: r["output_tokens_per_s"])
    results = {k: v for k, v in best.items() if k != "batch_size"}
    results["sweep"] = [{k: r[k] for k in ("batch_size", "elapsed_s", "output_tokens_per_s", "total_tokens_per_s")}
                        for r in sweep]
    return results, best["batch_size"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", default="8,16,32,64", help="comma list; every size runs, the best is reported")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights built from the model's config.json (no weight files)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--gguf-packed", action="store_true",
                   help="keep a GGUF's weights in its quantized blocks (transformers' default) instead of a dense --dtype model")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, path = load_model(args.model, dtype, args.device, args.load_format == "dummy", args.gguf_packed)
    load_s = time.perf_counter() - t0
    tokenizer = open_checkpoint(args.model, require_weights=False).load_tokenizer() if args.dataset else None
    wl = workload_from_args(args, model.config.vocab_size, tokenizer)
    results, best_bs = sweep_batch_sizes(model, wl, args.batch_size, load_s, not args.no_tqdm)
    engine = {"name": "hf-transformers", "model": args.model, "model_path": path, "dtype": args.dtype,
              "device": args.device, "load_format": args.load_format, "batch_size": best_bs,
              "gguf_weights": "packed" if args.gguf_packed else "dense",
              "args": {"batching": "static, sorted by output length, left padding", "min_new_tokens": "= max_new_tokens",
                       "do_sample": False, "batch_sizes_tried": [r["batch_size"] for r in results["sweep"]]}}
    record = make_record(wl, engine, results)
    print(format_table([record]))
    write_record(record, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
