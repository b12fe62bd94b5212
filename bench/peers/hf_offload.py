"""Peer runner: Hugging Face accelerate's disk offload (`device_map` under `max_memory`) on tidal's workload.

Owns: loading an HF safetensors directory with `device_map="auto", max_memory={"cpu": --host-mem},
offload_folder=--offload-dir` (CPU only: what does not fit goes to "disk"), summarising where
accelerate put each module, and writing the same JSON record as `tidal bench throughput`.
Must not: import tidal's engine; batching and counting are hf_throughput.py's `sweep_batch_sizes`
(static batches sorted by length, left padding, min_new_tokens = max_new_tokens, greedy).

Where the weights live: modules mapped to "disk" stay on the meta device, and accelerate's
AlignDevicesHook reads their tensors before every forward call of that module, i.e. once per
generated token. For a safetensors checkpoint transformers 5.x points the offload index at the
checkpoint's own shards (read with `safe_open`) instead of copying them into --offload-dir,
so that folder stays empty; the record counts its files. `max_memory` caps weights only: the KV
cache and activations come on top (tidal's --host-mem counts its KV cache too).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import torch

from hf_throughput import sweep_batch_sizes
from tidal.bench import add_workload_args, format_table, make_record, workload_from_args, write_record
from tidal.config import parse_size
from tidal.weights.loader import resolve_model_path


def load_offloaded(path: str, dtype: torch.dtype, host_mem: int, offload_dir: str):
    from transformers import AutoModelForCausalLM
    os.makedirs(offload_dir, exist_ok=True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory={"cpu": host_mem},
                                                offload_folder=offload_dir).eval()


def device_map_summary(model, offload_dir: str) -> dict:
    """Modules and weight bytes per tier ("cpu" or "disk"), from model.hf_device_map."""
    device_map = getattr(model, "hf_device_map", None) or {"": "cpu"}  # absent when everything fits
    nbytes: Counter = Counter()
    for name, p in model.named_parameters():  # a parameter belongs to the longest mapped prefix
        owner = max((m for m in device_map if m == "" or name == m or name.startswith(m + ".")), key=len)
        nbytes[str(device_map[owner])] += p.numel() * p.element_size()
    total = sum(nbytes.values())
    return {"modules": dict(Counter(str(d) for d in device_map.values())),
            "weight_bytes": dict(nbytes), "disk_weight_pct": round(100 * nbytes["disk"] / total, 1),
            "disk_modules": [m for m, d in device_map.items() if d == "disk"],
            "offload_folder_files": len(os.listdir(offload_dir))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--model", required=True, help="HF safetensors directory (e.g. from bench/make_dummy_llama.py)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host-mem", required=True, help="max_memory for 'cpu', e.g. 1GiB; weights beyond it go to disk")
    p.add_argument("--offload-dir", required=True, help="accelerate's offload_folder")
    p.add_argument("--batch-size", default="64", help="comma list; every size runs, the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    host_mem = parse_size(args.host_mem, "host_mem")
    path = resolve_model_path(args.model)
    t0 = time.perf_counter()
    model = load_offloaded(path, getattr(torch, args.dtype), host_mem, args.offload_dir)
    load_s = time.perf_counter() - t0
    placement = device_map_summary(model, args.offload_dir)
    gib = {k: f"{v / 2**30:.2f} GiB" for k, v in placement["weight_bytes"].items()}
    print(f"hf device map: modules {placement['modules']}, weights {gib} "
          f"({placement['disk_weight_pct']}% on disk)", file=sys.stderr)
    if "cpu" not in placement["modules"]:  # model.device is then "meta" and generate() fails on it
        sys.exit(f"hf_offload: --host-mem {args.host_mem} puts every module on disk, which generate() cannot run; "
                 "give at least the embeddings' size")
    wl = workload_from_args(args, model.config.vocab_size)
    results, best_bs = sweep_batch_sizes(model, wl, args.batch_size, load_s, not args.no_tqdm)
    engine = {"name": "hf-accelerate-disk-offload", "model": args.model, "model_path": path, "dtype": args.dtype,
              "device": "cpu", "batch_size": best_bs,
              "args": {"host_mem": args.host_mem, "max_memory": {"cpu": host_mem}, "offload_folder": args.offload_dir,
                       "device_map": placement, "batching": "static, sorted by output length, left padding",
                       "min_new_tokens": "= max_new_tokens", "do_sample": False,
                       "batch_sizes_tried": [r["batch_size"] for r in results["sweep"]]}}
    import accelerate
    record = make_record(wl, engine, results, extra_versions={"accelerate": accelerate.__version__})
    print(format_table([record]))
    write_record(record, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
