"""Where `tidal bench throughput`'s time goes: the default workload, with every op the CPU backend runs
(matmuls, attention, norms, SiLU, rotary, KV writes), the LM head and sampling timed and summed apart
for prefill steps (any prompt token in the step) and all-decode steps.

Owns: nothing the engine uses; it wraps the backend's methods with timers for one run. The timers add
a little per call; compare configurations with each other, not with `tidal bench throughput`.

    python bench/profile_throughput.py [--quant w8a8 --quant-head w8a8] [--kv-quant int8] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import collections
import time

from tidal import LLM, SamplingParams
from tidal.bench import _wait_for_cpu_kernels, make_workload
from tidal.kernels import get_backend

OPS = ("linear", "quant_linear", "paged_attention", "rms_norm", "rotary", "silu_and_mul", "write_kv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--quant-head", default="none")
    ap.add_argument("--kv-quant", default="none")
    a = ap.parse_args()
    kw = dict(model=a.model, device="cpu", dtype=a.dtype, quant=a.quant, quant_head=a.quant_head, kv_quant=a.kv_quant)
    _wait_for_cpu_kernels(kw)
    llm = LLM(**kw)
    runner = llm.engine.runner
    spent: dict[tuple[str, str], float] = collections.defaultdict(float)
    kind = ["prefill"]

    def timed(obj, name: str, label: str | None = None) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[(kind[0], label or name)] += time.perf_counter() - t0
        setattr(obj, name, wrapper)

    backend = get_backend("cpu")
    for op in OPS:
        timed(backend, op)
    timed(runner.model, "compute_logits", "LM head (inside sampling)")
    timed(runner, "_sample", "sampling, head included")
    execute = runner.execute_model

    def step(so):
        kind[0] = "decode" if so.total_num_scheduled_tokens == len(so.num_scheduled_tokens) else "prefill"
        t0 = time.perf_counter()
        try:
            return execute(so)
        finally:
            spent[(kind[0], "STEP (all of it)")] += time.perf_counter() - t0
    runner.execute_model = step
    wl = make_workload(vocab_size=runner.vocab_size)
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in wl.output_lens]
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    print(f"{a.model} {a.dtype} quant={a.quant} quant_head={a.quant_head} kv_quant={a.kv_quant}: {elapsed:.2f} s, "
          f"{sum(wl.output_lens) / elapsed:.1f} output tok/s (with timers)")
    for k in ("prefill", "decode"):
        for (kk, name), s in sorted(spent.items(), key=lambda x: -x[1]):
            if kk == k:
                print(f"  {k:8s} {name:28s} {s:7.2f} s")


if __name__ == "__main__":
    main()
