#!/usr/bin/env bash
# One call on a lent GPU machine: correctness on CUDA, then timings, then one table.
# Here first:   python bench/gpu_prep.py        (writes .gpu/: config-only model dirs, see that file)
# Device call:  run(command="bash bench/gpu_check.sh", carry=[".gpu", ".whl"], timeout_s=600)
#               (.whl/ holds flexgen-0.1.8-py3-none-any.whl: `pip download --no-deps flexgen==0.1.8 -d .whl`)
# PARTS (default "tests throughput offload") picks the parts; each step has its own timeout, so
# the table is written whatever hangs.
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
PARTS=${PARTS:-tests throughput offload}
has() { [[ " $PARTS " == *" $1 "* ]]; }
if has tests; then
log "correctness on CUDA: tiny Llama/Qwen2/OPT logits vs transformers (fp32, bf16), dummy SmolLM2 generation"
timeout 120 python -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt" || status=1
fi
has throughput && for model in smollm2 llama-1b; do
  log "throughput $model (dummy weights), default workload: 64 prompts, in 100-512, out 64-256, ignore_eos"
  timeout 90 python -m tidal.cli bench throughput --model .gpu/$model-cfg --load-format dummy --device cuda \
    --dtype bfloat16 --no-tqdm --json "$OUT/tidal-$model.json" 2>&1 | tail -4 || status=1
  timeout 90 python bench/peers/hf_throughput.py --model .gpu/$model-cfg --load-format dummy --device cuda \
    --dtype bfloat16 --batch-size 64 --no-tqdm --json "$OUT/hf-$model.json" 2>&1 | tail -4 || status=1
done
if has offload; then
  # issue #5's GPU target: OPT-30B (dummy weights), 64 x (512 -> 32), FlexGen's T4 policy for it (its
  # 48 x 3 paper batch does not fit this host's RAM) against tidal's planner under the same budgets
  log "offloading: OPT-30B, FlexGen 0.1.8 --percent 20 80 0 100 0 100 --cpu-cache-compute, bs 32 x 2"
  pip install -q --no-deps --no-index .whl/flexgen-0.1.8-py3-none-any.whl 2>&1 | tail -2
  timeout 200 python bench/peers/flexgen_run.py --json "$OUT/flexgen-opt30b.json" -- --model facebook/opt-30b \
    --path _DUMMY_ --percent 20 80 0 100 0 100 --gpu-batch-size 32 --num-gpu-batches 2 --cpu-cache-compute \
    --prompt-len 512 --gen-len 32 2>&1 | tail -6 || status=1
  log "offloading: OPT-30B, tidal --device-mem 16GiB --host-mem 100GiB --policy auto"
  TIDAL_OFFLOAD_LOG=1 timeout 220 python -m tidal.cli bench throughput --model .gpu/opt-30b-cfg --load-format dummy \
    --device cuda --dtype float16 --device-mem 16GiB --host-mem 100GiB --policy auto --num-prompts 64 \
    --input-len 512-512 --output-len 32-32 --max-num-seqs 64 --max-model-len 544 --no-tqdm \
    --json "$OUT/tidal-opt30b.json" 2>&1 | grep -v "^\[offload\] step" | tail -8 || status=1
fi
log "table"
python -m tidal.cli bench compare "$OUT"/*.json 2>&1 | tee "$OUT/table.txt"
exit $status
