"""Where a batch-1 decode step's time goes (docs/performance.md): one request with a 512-token prompt,
then timed decode steps (step / execute_model / forward), then torch.profiler's top ops over 20 steps.

    python bench/profile_decode.py [--quant int4] [--quant-head int4] [--threads N] [--steps 100]
"""
import argparse
import time

import torch

from tidal import LLM, SamplingParams
from tidal.bench import _wait_for_cpu_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="none")
    ap.add_argument("--quant-head", default="none")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _wait_for_cpu_kernels({"device": "cpu"})
    llm = LLM("smollm2", dtype=args.dtype, quant=args.quant, quant_head=args.quant_head)
    eng, runner = llm.engine, llm.engine.runner
    params = SamplingParams(temperature=0, max_tokens=args.steps + 60, ignore_eos=True)
    eng.add_request("r", None, params, prompt_token_ids=list(range(1000, 1512)))
    for _ in range(11):   # prefill, then warm decode steps
        eng.step()
    t = {"step": 0.0, "execute_model": 0.0, "forward": 0.0}
    execute, forward = runner.execute_model, runner.forward

    def timed(name, fn):
        def wrapper(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            t[name] += time.perf_counter() - t0
            return out
        return wrapper
    runner.execute_model, runner.forward = timed("execute_model", execute), timed("forward", forward)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        s0 = time.perf_counter()
        eng.step()
        t["step"] += time.perf_counter() - s0
    total = time.perf_counter() - t0
    runner.execute_model, runner.forward = execute, forward
    print(f"{args.dtype} quant={args.quant} head={args.quant_head} threads={torch.get_num_threads()}: "
          f"{args.steps / total:.1f} tok/s; ms per step: " + ", ".join(f"{k} {v / args.steps * 1e3:.2f}" for k, v in t.items()))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            eng.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
