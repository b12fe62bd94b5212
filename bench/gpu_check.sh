#!/usr/bin/env bash
# One call on a lent GPU machine: correctness on CUDA, then timings, then one table.
# Here first:   python bench/gpu_prep.py        (writes .gpu/: config-only model dirs, see that file)
# Device call:  run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=420)
# The device image has torch, triton, transformers and pytest but no network, and the SmolLM2 GGUF
# (94 MiB) is over what a call may carry: the timings use SmolLM2's and a Llama-1B's shapes with
# random weights (--load-format dummy) in tidal and in HF transformers alike.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
tidal() { python -m tidal.cli "$@"; }
log() { echo "== $* ($(date +%T))" | tee -a "$OUT/log.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
status=0
log "correctness on CUDA: tiny Llama/Qwen2/OPT logits vs transformers (fp32, bf16), dummy SmolLM2 generation"
timeout 150 python -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt" || status=1
for model in smollm2 llama-1b; do
  log "throughput $model (dummy weights), default workload: 64 prompts, in 100-512, out 64-256, ignore_eos"
  timeout 90 python -m tidal.cli bench throughput --model .gpu/$model-cfg --load-format dummy --device cuda \
    --dtype bfloat16 --no-tqdm --json "$OUT/tidal-$model.json" 2>&1 | tail -4 || status=1
  timeout 90 python bench/peers/hf_throughput.py --model .gpu/$model-cfg --load-format dummy --device cuda \
    --dtype bfloat16 --batch-size 64 --no-tqdm --json "$OUT/hf-$model.json" 2>&1 | tail -4 || status=1
done
log "table"
python -m tidal.cli bench compare "$OUT"/*.json 2>&1 | tee "$OUT/table.txt"
exit $status
