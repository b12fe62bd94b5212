"""Validate the planner's cost model: predicted vs measured throughput on a few CPU scenarios.

For each scenario (memory limits and a workload) it asks `choose_policy` for a policy and its
predicted tokens/s, then runs `tidal bench throughput` with exactly that policy (same batch, same
prompt/generation lengths, the whole batch prefilled in one step) and compares. The issue's bar is
measured within 30% of predicted on at least three scenarios; the record goes to docs/benchmarks.md.

    python bench/plan_validate.py                      # the default CPU scenarios on smollm2
    python bench/plan_validate.py --only all-device    # one scenario
    python bench/plan_validate.py --dry-run            # predictions only (no engine runs)

Scenarios that offload need the offloading runner (`--policy`, `--device-mem`, `--host-mem`,
`--offload-dir` in the engine); an engine without it fails that scenario with its own message and
the others still run. The hardware profile is the cached one (`tidal plan --profile` measures it),
or --hardware PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (engine overrides, prompt_len, gen_len, max batch). On a CPU device and host are one RAM:
# the budget is --host-mem, and the layers that do not fit stream from --offload-dir (the GGUF cannot
# be mapped in place). SmolLM2's tied embedding (54 MiB in bf16) is always resident.
SCENARIOS = {
    "all-device": ({}, 128, 32, 16),
    "all-device-b64": ({}, 128, 32, 64),
    "ram-200MiB-disk": ({"host_mem": "200MiB", "offload_dir": "TMP"}, 128, 32, 16),
    "ram-120MiB-disk": ({"host_mem": "120MiB", "offload_dir": "TMP"}, 128, 32, 16),
    "ram-80MiB-disk-int4": ({"host_mem": "80MiB", "offload_dir": "TMP", "quant": "int4"}, 128, 32, 16),
}


def predict_scenario(name: str, model: str, dtype: str, profile, offload_dir: str) -> dict:
    from tidal.config import EngineConfig
    from tidal.plan.cli import _hf_config
    from tidal.plan.search import choose_policy
    overrides, prompt_len, gen_len, max_batch = SCENARIOS[name]
    overrides = {k: (offload_dir if v == "TMP" else v) for k, v in overrides.items()}
    cfg = EngineConfig(model=model, device="cpu", dtype=dtype, **overrides)
    policy, pred = choose_policy(_hf_config(model), cfg, prompt_len, gen_len, profile,
                                 max_batch=max_batch, allow_compression=False)
    return {"scenario": name, "engine": overrides, "prompt_len": prompt_len, "gen_len": gen_len,
            "policy": str(policy),
            "all_device": not (policy.offloads_weights or policy.kv[0] < 100 or policy.act[0] < 100),
            "batch": pred.batch, "predicted_tokens_per_s": pred.tokens_per_s,
            "predicted_prefill_s": pred.prefill_s, "predicted_decode_s": pred.decode_s,
            "bottleneck": pred.bottleneck, "quant": policy.quant, "kv_quant": policy.kv_quant}


def measure_scenario(row: dict, model: str, dtype: str, out_dir: str, load_format: str) -> dict:
    record = os.path.join(out_dir, f"{row['scenario']}.json")
    b, s, n = row["batch"], row["prompt_len"], row["gen_len"]
    cmd = [sys.executable, "-m", "tidal.cli", "bench", "throughput", "--model", model, "--device", "cpu",
           "--dtype", dtype, "--num-prompts", str(b), "--input-len", str(s), "--output-len", str(n),
           "--max-num-seqs", str(b), "--max-num-batched-tokens", str(max(b * s, 1024)), "--no-tqdm",
           "--max-model-len", str(s + n + 16),  # the KV pool then holds this batch, as the plan assumed
           "--load-format", load_format, "--json", record]
    if row["quant"] != "none":
        cmd += ["--quant", row["quant"]]
    if row["kv_quant"] != "none":
        cmd += ["--kv-quant", row["kv_quant"]]
    if not row["all_device"]:  # the runner gets exactly the policy that was predicted
        cmd += ["--policy", row["policy"]]
        for k, v in row["engine"].items():
            if k in ("device_mem", "host_mem", "offload_dir"):
                cmd += ["--" + k.replace("_", "-"), v]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    with open(record) as f:
        res = json.load(f)["results"]
    measured = res["output_tokens_per_s"]
    ratio = measured / row["predicted_tokens_per_s"]
    return {**row, "measured_tokens_per_s": measured, "measured_over_predicted": ratio,
            "within_30pct": abs(ratio - 1) <= 0.30, "elapsed_s": res["elapsed_s"], "cpu_s": res.get("cpu_s"),
            "log_tail": proc.stderr[-1500:]}  # with TIDAL_OFFLOAD_LOG=1: the runner's per-step times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run these scenarios only")
    ap.add_argument("--hardware", default=None, help="hardware profile JSON (default: the cached one)")
    ap.add_argument("--dry-run", action="store_true", help="predict only")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights (a config-only --model dir)")
    ap.add_argument("--json", dest="json_path", default="bench/out/plan_validate.json")
    args = ap.parse_args(argv)
    from tidal.bench_record import machine, versions
    from tidal.errors import TidalError
    from tidal.plan.hardware import get_profile, load_profile
    profile = load_profile(args.hardware) if args.hardware else get_profile("cpu")[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tidal-plan-validate-") as tmp:
        for name in args.only or SCENARIOS:
            try:
                row = predict_scenario(name, args.model, args.dtype, profile, os.path.join(tmp, "offload"))
            except TidalError as e:
                rows.append({"scenario": name, "error": e.message, "batch": 0, "predicted_tokens_per_s": 0.0,
                             "policy": "-"})
                continue
            if not args.dry_run:
                row = measure_scenario(row, args.model, args.dtype, tmp, args.load_format)
            rows.append(row)
    print(f"{'scenario':<20}{'batch':>6}{'predicted':>11}{'measured':>10}{'ratio':>7}  policy")
    for r in rows:
        meas = f"{r['measured_tokens_per_s']:.1f}" if "measured_tokens_per_s" in r else "-"
        ratio = f"{r['measured_over_predicted']:.2f}" if "measured_over_predicted" in r else "-"
        print(f"{r['scenario']:<20}{r['batch']:>6}{r['predicted_tokens_per_s']:>11.1f}{meas:>10}{ratio:>7}  "
              f"{r['policy']}" + (f"\n{'':<20}error: {r['error']}" if "error" in r else ""))
    ok = sum(bool(r.get("within_30pct")) for r in rows)
    print(f"{ok} of {len(rows)} scenarios within 30% (the bar: at least 3)")
    record = {"benchmark": "plan_validate", "model": args.model, "dtype": args.dtype,
              "load_format": args.load_format, "scenarios": rows,
              "hardware": profile.to_dict(), "machine": machine(), "versions": versions(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
    with open(args.json_path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
