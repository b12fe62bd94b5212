#!/usr/bin/env bash
# One call on a lent GPU machine. 1) The planner's CUDA path: measure the hardware profile (CUDA
# events, pinned copies; about a minute), then plan OPT-30B (config only, no weights) under FlexGen-like
# limits. 2) The cost model's CPU validation on that machine's host CPU (quiet, unlike the shared dev
# VM): bench/plan_validate.py with SmolLM2's shapes and random weights (the GGUF is over the carry limit).
# Here first:   mkdir -p bench/out/plan-model && cp -r .gpu/smollm2-cfg bench/out/plan-model/
#               (config.json + tokenizer of SmolLM2; bench/gpu_prep.py writes .gpu/)
# Device call:  run(command="bash bench/plan_gpu_check.sh", carry=["bench/out/plan-model"], timeout_s=480)
#               (PLAN_SKIP_GPU=1 bash bench/plan_gpu_check.sh: the CPU validation only)
# Back here: $OUT/hardware-cuda.json is the GPU profile; predict FlexGen's anchor policies from it with
#   python bench/plan_flexgen_anchors.py --hardware <that file>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/plan-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TIDAL_CACHE_DIR=/tmp/tidal-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'EOF'
from transformers import OPTConfig
OPTConfig(hidden_size=7168, ffn_dim=28672, num_attention_heads=56, num_hidden_layers=48, vocab_size=50272,
          max_position_embeddings=2048, word_embed_proj_dim=7168, architectures=["OPTForCausalLM"]).save_pretrained("/tmp/opt-30b")
EOF
status=0
[ -n "${PLAN_SKIP_GPU:-}" ] || timeout 300 python3 -m tidal.plan.cli plan --profile --model /tmp/opt-30b --device cuda --dtype float16 \
  --device-mem 10GiB --host-mem 100GiB --offload-dir /tmp/tidal-offload --max-num-seqs 256 \
  --json "$OUT/plan-opt30b.json" 2>/tmp/plan.err | tee "$OUT/plan.txt" || status=1
tail -c 600 /tmp/plan.err
[ -n "${PLAN_SKIP_GPU:-}" ] || cp /tmp/tidal-cache/hardware-*cuda0.json "$OUT/hardware-cuda.json" || status=1
if [ -d bench/out/plan-model/smollm2-cfg ]; then
  # torch's reference ops, not the compiled CPU kernels: no compiler wait, and profile and runs agree
  TIDAL_CPU_KERNELS=0 TIDAL_OFFLOAD_LOG=1 timeout 300 python3 bench/plan_validate.py --model bench/out/plan-model/smollm2-cfg \
    --load-format dummy --json "$OUT/plan_validate_cpu.json" 2>/tmp/validate.err | tee "$OUT/validate.txt" || status=1
  tail -c 400 /tmp/validate.err
  cp /tmp/tidal-cache/hardware-*-cpu.json "$OUT/hardware-hostcpu.json" 2>/dev/null || status=1
fi
exit $status
