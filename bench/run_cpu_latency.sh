#!/usr/bin/env bash
# One stream, the chat case: TTFT of a 512-token prompt and decode tokens/s over 128 tokens, for tidal
# (bf16, int8, int4 weights; int4 with an int8 LM head (llama.cpp's own Q4_1 + Q8_0 mix) and with an int4 head),
# llama.cpp (the same GGUF) and vLLM's CPU build, back to back.
# Environment: OUT (default bench/out), SKIP (names among tidal-bf16-lat tidal-int8-lat tidal-int4-lat tidal-int4h8-lat
# tidal-int4h-lat llamacpp-lat vllm-cpu-lat),
# VLLM_PEER (vLLM's venv, default ~/vllm-peer), INPUT_LEN (512), OUTPUT_LEN (128), ITERS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
IN=${INPUT_LEN:-512} GEN=${OUTPUT_LEN:-128} ITERS=${ITERS:-3}
mkdir -p "$OUT"
source bench/run_lib.sh
lat=(--input-len "$IN" --output-len "$GEN" --num-iters "$ITERS")
peer=(--latency --latency-input-len "$IN" --latency-output-len "$GEN" --num-iters "$ITERS")
run tidal-bf16-lat tidal bench latency --device cpu --dtype bfloat16 "${lat[@]}"
run tidal-int8-lat tidal bench latency --device cpu --dtype bfloat16 --quant int8 "${lat[@]}"
run tidal-int4-lat tidal bench latency --device cpu --dtype bfloat16 --quant int4 "${lat[@]}"
run tidal-int4h8-lat tidal bench latency --device cpu --dtype bfloat16 --quant int4 --quant-head int8 "${lat[@]}"
run tidal-int4h-lat tidal bench latency --device cpu --dtype bfloat16 --quant int4 --quant-head int4 "${lat[@]}"
if python -c "import llama_cpp" 2>/dev/null; then
  run llamacpp-lat python bench/peers/llamacpp_throughput.py --threads "$(nproc)" "${peer[@]}"
else
  echo "=== llamacpp skipped: pip install llama-cpp-python (bench/peers/README.md has the flags for this CPU)" >&2
fi
run_vllm vllm-cpu-lat "${peer[@]}"
echo
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ ${#records[@]} -gt 0 ]]; then tidal bench compare "${records[@]}"; fi
