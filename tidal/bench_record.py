"""The record every benchmark writes, and the side-by-side table of records.

Owns: `make_results` (rates over the timed part), `make_record` (workload, engine, versions, machine,
results, date), `write_record`, and `format_table` / `format_latency_table`. tidal.bench and the peer runners in bench/peers/
all write through these, so their JSON files compare.
Must not: run anything it times; import the engine.
"""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone


def versions(**extra) -> dict:
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), **{d: version(d) for d in ("torch", "transformers", "tidal")}, **extra}


def machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    # load average at the end of the run: on a shared machine it says how noisy the figures are
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def make_results(workload, elapsed_s: float, load_s: float | None, output_tokens: int | None = None,
                 **extra) -> dict:
    """Rates over the timed generation only (load excluded); output_tokens defaults to the workload's.
    Runners also pass cpu_s (process CPU time while timed): on a shared machine, elapsed/cpu shows contention."""
    out = workload.summary()["total_output_tokens"] if output_tokens is None else output_tokens
    total = out + workload.summary()["total_input_tokens"]
    return {"elapsed_s": round(elapsed_s, 3), "requests_per_s": round(len(workload.prompts) / elapsed_s, 4),
            "output_tokens_per_s": round(out / elapsed_s, 2), "total_tokens_per_s": round(total / elapsed_s, 2),
            "output_tokens": out, "load_s": None if load_s is None else round(load_s, 3), **extra}


def make_record(workload, engine: dict, results: dict, extra_versions: dict | None = None) -> dict:
    return {"benchmark": "throughput", "workload": workload.summary(), "engine": engine,
            "versions": versions(**(extra_versions or {})), "machine": machine(), "results": results,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_record(record: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


def _label(r: dict) -> str:
    e = r["engine"]
    extra = f" bs={e['batch_size']}" if e.get("batch_size") else ""
    args = e.get("args") or {}
    quant, head, kv = args.get("quant"), args.get("quant_head"), args.get("kv_quant")
    extra += f" {quant}" if quant not in (None, "none") else ""
    extra += f" head={head}" if head not in (None, "none") else ""
    extra += f" kv={kv}" if kv not in (None, "none") else ""
    return f"{e['name']} {e.get('dtype', '')}{extra}".strip()


def format_table(records: list[dict]) -> str:
    """One column per record, one row per figure: the side-by-side view."""
    w = records[0]["workload"]
    head = (f"workload: {w['num_prompts']} prompts, input {w['input_len'][0]}-{w['input_len'][1]} "
            f"({w['total_input_tokens']} tok), output {w['output_len'][0]}-{w['output_len'][1]} "
            f"({w['total_output_tokens']} tok), seed {w['seed']}, fingerprint {w['fingerprint']}")
    if any(r["workload"]["fingerprint"] != w["fingerprint"] for r in records):
        head += "\nWARNING: the records ran different workloads; they do not compare"
    rows = [("", [_label(r) for r in records])]
    for key, name in (("output_tokens_per_s", "output tok/s"), ("total_tokens_per_s", "total tok/s"),
                      ("requests_per_s", "requests/s"), ("elapsed_s", "elapsed s"), ("cpu_s", "cpu s"),
                      ("load_s", "load s")):
        rows.append((name, ["-" if r["results"].get(key) is None else f"{r['results'][key]:,.2f}" for r in records]))
    width = max(12, *(len(c) for _, cells in rows for c in cells))
    lines = [f"{name:<14}" + "".join(f"{c:>{width + 2}}" for c in cells) for name, cells in rows]
    return "\n".join([head] + lines)


def format_latency_table(records: list[dict]) -> str:
    w = records[0]["workload"]
    lines = [f"latency: prompt {w['input_len'][0]} tokens, {w['output_len'][0]} generated, greedy, one stream, "
             f"median of {w['num_prompts'] - 1}"]
    label = [_label(r) for r in records]
    width = max(14, *(len(x) for x in label))
    lines.append(f"{'':<22}" + "".join(f"{x:>{width + 2}}" for x in label))
    for key, name in (("ttft_s", "TTFT s"), ("prefill_tokens_per_s", "prefill tok/s"),
                      ("decode_tokens_per_s", "decode tok/s"), ("tpot_ms", "TPOT ms")):
        lines.append(f"{name:<22}" + "".join(f"{r['results'].get(key, '-'):>{width + 2},}" for r in records))
    return "\n".join(lines)
