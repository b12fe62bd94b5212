# Shared by the bench/run_*.sh scripts (sourced): `run NAME COMMAND...` runs one engine unless
# NAME is in $SKIP, writes its JSON record to $OUT/NAME.json and collects it in `records`.
SKIP=" ${SKIP:-} "
records=()
run() {  # name, command...
  local name=$1; shift
  if [[ $SKIP == *" $name "* ]]; then return; fi
  echo "=== $name: $*" >&2
  if "$@" --json "$OUT/$name.json"; then records+=("$OUT/$name.json"); else echo "=== $name failed" >&2; fi
}

# vLLM's CPU build from its own venv, with both cores for its worker and Intel OpenMP
# (its default keeps one core for the scheduler process, which halves its throughput on 2 cores).
VLLM_PEER=${VLLM_PEER:-$HOME/vllm-peer}
run_vllm() {  # name, runner args...
  local name=$1; shift
  if [[ ! -x $VLLM_PEER/bin/python ]]; then echo "=== $name skipped: no vLLM venv at $VLLM_PEER (bench/peers/README.md)" >&2; return; fi
  run "$name" env HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND="0-$(( $(nproc) - 1 ))" \
    LD_PRELOAD="$VLLM_PEER/lib/libiomp5.so" "$VLLM_PEER/bin/python" bench/peers/vllm_cpu_throughput.py "$@"
}
