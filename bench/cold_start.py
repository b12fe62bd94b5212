"""Cold-start timings of the default model, as a user sees them.

Measures, each in a fresh Python process: (1) loading smollm2 (open_checkpoint + every tensor
dequantized + tokenizer), cache warm and cache cold; (2) `tidal chat PROMPT` from process start
to the first streamed character on stdout; (3) transformers loading the same GGUF.
Usage: python bench/cold_start.py [--json PATH] [--skip-hf]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LOAD = """
import time, torch
t0 = time.perf_counter()
from tidal.weights.loader import open_checkpoint
ck = open_checkpoint("smollm2")
n = sum(1 for _ in ck.iter_tensors(torch.float32))
tok = ck.load_tokenizer()
print(time.perf_counter() - t0)
"""
HF = """
import os, time, torch, transformers
from tidal.weights.loader import resolve_model_path
p = resolve_model_path("smollm2")
t0 = time.perf_counter()
transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p), dtype=torch.float32)
transformers.AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))
print(time.perf_counter() - t0)
"""


def _py(code, env=None):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def chat_first_char(prompt="What is the capital of France?"):
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tidal.cli", "chat", prompt, "--max-tokens", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    rest = proc.stdout.read().decode()
    proc.wait()
    return first, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold = _py(LOAD, dict(os.environ, TIDAL_CACHE_DIR=cache))
    _py(LOAD)  # make sure the default cache is built
    warm = min(_py(LOAD) for _ in range(3))
    ttft, total = min(chat_first_char() for _ in range(2))
    rec = {"load_smollm2_cold_cache_s": round(cold, 2), "load_smollm2_warm_s": round(warm, 2),
           "chat_first_char_s": round(ttft, 2), "chat_total_s": round(total, 2)}
    if not args.skip_hf:
        rec["hf_transformers_load_s"] = round(_py(HF), 2)
    for k, v in rec.items():
        print(f"{k:28s} {v:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
