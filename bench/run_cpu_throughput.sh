#!/usr/bin/env bash
# tidal (bf16, fp32), vLLM's CPU build, HF transformers (fp32, bf16; best batch size) and llama.cpp (one
# stream) on one workload, back to back. JSON records go to bench/out/; a side-by-side table is printed at the end.
# Every argument is passed to all runners, e.g.:  bench/run_cpu_throughput.sh --num-prompts 32
# Environment: OUT (default bench/out), HF_BATCH_SIZES (default 8,16,32,64), SKIP (space-separated
# names among tidal-bf16 tidal-w8a8 tidal-w8a8-kv8 tidal-w8a8-kv8-bf16head tidal-fp32 vllm-cpu vllm-cpu-fp8kv hf-fp32 hf-bf16 llamacpp), VLLM_PEER (vLLM's own venv,
# default ~/vllm-peer; bench/peers/README.md says how to make it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
HF_BATCH_SIZES=${HF_BATCH_SIZES:-8,16,32,64}
mkdir -p "$OUT"
source bench/run_lib.sh
run tidal-bf16 tidal bench throughput --device cpu --dtype bfloat16 "$@"
run tidal-w8a8 tidal bench throughput --device cpu --dtype bfloat16 --quant w8a8 --quant-head w8a8 "$@"
run tidal-w8a8-kv8 tidal bench throughput --device cpu --dtype bfloat16 --quant w8a8 --quant-head w8a8 --kv-quant int8 "$@"
# the same with the LM head left in bf16: the head's activation rounding is most of w8a8's remaining error
run tidal-w8a8-kv8-bf16head tidal bench throughput --device cpu --dtype bfloat16 --quant w8a8 --kv-quant int8 "$@"
run tidal-fp32 tidal bench throughput --device cpu --dtype float32 "$@"
run_vllm vllm-cpu "$@"
run_vllm vllm-cpu-fp8kv --kv-cache-dtype fp8 "$@"
run hf-fp32 python bench/peers/hf_throughput.py --dtype float32 --batch-size "$HF_BATCH_SIZES" "$@"
run hf-bf16 python bench/peers/hf_throughput.py --dtype bfloat16 --batch-size "$HF_BATCH_SIZES" "$@"
if python -c "import llama_cpp" 2>/dev/null; then
  run llamacpp python bench/peers/llamacpp_throughput.py --threads 2 "$@"
else
  echo "=== llamacpp skipped: pip install llama-cpp-python" >&2
fi
echo
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ ${#records[@]} -gt 0 ]]; then tidal bench compare "${records[@]}"; fi
