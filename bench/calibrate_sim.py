"""Calibrate `tidal serve --simulate`'s latency model from the real engine on this machine.

Owns: timing real engine steps of known shape and fitting the simulator's step model
(tidal/sim/latency.py: step ms = base_ms + prefill_ms_per_token x uncached prompt tokens +
prefill_ms_per_token_kctx x those tokens' context in thousands + decode_ms_per_seq x decoding sequences)
to them by least squares. The steps measured:
- decode steps at several batch sizes, each sequence with a context as long as the fleet benchmark's
  (a shared 2,048-token prefix, cached once, plus its own tail), so their attention costs what it costs there;
- prefill steps of one prompt: fresh prompts of a few lengths, and a 128-token question on top of a cached
  2,048-token prefix (the fleet workload's warm request).
Prints each measured step against the fit and writes the fit as a `--sim-config` JSON.
Must not: change the simulator's defaults itself (a person copies the figures, with the machine, into
tidal/sim/latency.py and docs/benchmarks.md).

    python bench/calibrate_sim.py [--model smollm2] [--device auto] [--dtype auto] [--out bench/out/sim_calibration.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tidal.bench import _wait_for_cpu_kernels
from tidal.bench_record import machine
from tidal.config import EngineConfig
from tidal.engine.llm_engine import LLMEngine
from tidal.sampling import SamplingParams
from tidal.sim.latency import prefill_kctx


class Timer:
    """Runs an engine to completion, timing every step whose shape is pure: all decode rows, or one prompt's
    prefill chunk. Mixed steps are run but not kept."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.steps = engine, []   # (prefill_tokens, decode_seqs, prefill_kctx, ms, label)
        self._n = 0

    def run(self, prompts: list[list[int]], max_tokens: int, label: str, cached: int = 0) -> None:
        """`cached`: the prompt tokens the prefix cache serves (a single prompt's one prefill step)"""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for ids in prompts:
            self._n += 1
            self.engine.add_request(f"cal-{self._n}", None, params, prompt_token_ids=ids)
        while self.engine.has_unfinished_requests():
            t0 = time.perf_counter()
            self.engine.step()
            ms = (time.perf_counter() - t0) * 1e3
            so = self.engine.core.last_scheduler_output
            n_req, total = len(so.num_scheduled_tokens), so.total_num_scheduled_tokens
            if n_req and total == n_req and n_req == len(prompts):
                self.steps.append((0, n_req, 0.0, ms, label))
            elif n_req == 1 and total > 1:
                self.steps.append((total, 0, prefill_kctx(total, cached), ms, label))


def fit(steps: list[tuple]) -> tuple[float, float, float, float]:
    """Least squares of ms = base + a * prefill_tokens + b * decode_seqs + c * prefill_kctx."""
    x = torch.tensor([[1.0, p, d, k] for p, d, k, _, _ in steps], dtype=torch.float64)
    y = torch.tensor([ms for _, _, _, ms, _ in steps], dtype=torch.float64)
    sol = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    return tuple(float(v) for v in sol)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--prefill-lens", default="128,512,1024")
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--out", default="bench/out/sim_calibration.json")
    a = ap.parse_args()
    kw = dict(model=a.model, device=a.device, dtype=a.dtype)
    _wait_for_cpu_kernels(kw)   # time the compiled kernels, not the fallback served while they build
    engine = LLMEngine(EngineConfig.from_kwargs(**kw))
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1000, 20000, (n,), generator=g).tolist()  # noqa: E731
    timer = Timer(engine)
    timer.run([ids(64)], 4, "warm-up")
    timer.steps.clear()
    prefix = ids(a.prefix_len)
    timer.run([prefix + ids(16)], 1, "prefix (cached from here on)")
    timer.steps.clear()
    for n in (int(v) for v in a.prefill_lens.split(",")):
        for _ in range(2):
            timer.run([ids(n)], 1, f"prefill {n} fresh tokens")
    for _ in range(3):
        timer.run([prefix + ids(128)], 1, f"prefill 128 tokens after a cached {a.prefix_len}", cached=a.prefix_len)
    for bs in (int(v) for v in a.batch_sizes.split(",")):
        timer.run([prefix + ids(64) for _ in range(bs)], 17, f"decode, batch {bs}, context ~{a.prefix_len + 72}")
    base, per_tok, per_seq, per_kctx = fit(timer.steps)
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load {m['load_average']}; "
          f"model {a.model}, dtype {a.dtype} ({engine.core.runner.dtype})")
    print(f"fit: base_ms {base:.1f}, prefill_ms_per_token {per_tok:.3f}, prefill_ms_per_token_kctx {per_kctx:.3f}, "
          f"decode_ms_per_seq {per_seq:.2f}")
    groups: dict[str, list] = {}
    for p, d, k, ms, label in timer.steps:
        groups.setdefault(label, []).append((p, d, k, ms))
    print(f"{'steps':58s} {'n':>3s} {'measured ms':>12s} {'fit ms':>8s}")
    for label, rows in groups.items():
        p, d, k = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{label:58s} {len(rows):3d} {statistics.median(r[3] for r in rows):12.1f} "
              f"{base + per_tok * p + per_seq * d + per_kctx * k:8.1f}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"base_ms": round(base, 1), "prefill_ms_per_token": round(per_tok, 3),
                   "prefill_ms_per_token_kctx": round(per_kctx, 3), "decode_ms_per_seq": round(per_seq, 2)}, f, indent=2)
    print(f"wrote {a.out} (use it with `tidal serve --simulate --sim-config {a.out}`)")


if __name__ == "__main__":
    main()
