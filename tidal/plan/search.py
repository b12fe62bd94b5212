"""The policy search: a grid over batching and compression, and a linear program for placement.

Owns: `choose_policy` (what `--policy auto` and `tidal plan` call), `search` (every candidate's
best placement, best first) and the LP. The memory limits per tier, and the error when nothing
fits, are limits.py's.
For each candidate (micro-batch size, number of micro-batches, weight and KV compression, CPU
attention) scipy's HiGHS solves, over the nine placement fractions x and per-layer time bounds
T_pre, T_1..T_K (one per decode segment):
    minimise   L * (T_pre + sum_k steps_k * T_k)      (+ a tiny preference for faster tiers)
    subject to resource_time(stage, x) <= T_stage      for every resource and stage (epigraph of the max)
               memory(tier, x) <= limit(tier)          device, host, disk (and device + host <= RAM
                                                       when they are the same memory)
               fractions of each kind sum to 1, 0 <= x <= 1
The LP's objective is exactly the cost model's time (cost_model.py), so more memory never predicts less.
Each candidate is solved twice: with every layer resident, and with streaming allowed (which costs
two layer slots on the device). Shares of weights and KV are then rounded to whole layers, as the
runner places them, and only tiers the runner can use are offered (RUNNER_TIERS).
Must not: run or import the engine; measure hardware (microbench.py).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.optimize import linprog

from tidal.config import weight_format
from tidal.errors import TidalError
from tidal.plan.cost_model import CostModel, Prediction, predict
from tidal.plan.hardware import HardwareProfile
from tidal.plan.limits import KINDS, RUNNER_TIERS, budget_flag, fits, limits_for, nothing_fits
from tidal.plan.model_spec import ModelSpec, model_spec
from tidal.policy import TIERS, Policy

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MICRO_BATCHES = (1, 2, 4, 8, 16)
_QUANT_ORDER = {"none": 0, "int8": 1, "int4": 2}


def solve_placement(cm: CostModel, limits: dict[str, float | None], tiers: dict = RUNNER_TIERS) -> np.ndarray | None:
    """The LP's best fractions x for this candidate (resident or streaming, whichever is faster), or None
    when no placement fits the limits."""
    best = None
    for streaming in (False, True):
        sol = _solve(cm, limits, tiers, streaming)
        if sol is not None and (best is None or sol[1] < best[1] - 1e-12):
            best = sol
    return None if best is None else best[0]


def _solve(cm: CostModel, limits, tiers, streaming: bool) -> tuple[np.ndarray, float] | None:
    segments = cm.decode_segments()
    L, nt = cm.spec.num_layers, 1 + len(segments)
    a_ub, b_ub = [], []

    def time_rows(terms, col):
        for const, coef in terms.values():
            row = np.zeros(9 + nt)
            row[:9], row[9 + col] = coef, -1.0
            a_ub.append(row)
            b_ub.append(-const)
    time_rows(cm.stage_terms("prefill"), 0)
    for k, (_, ctx) in enumerate(segments):
        time_rows(cm.stage_terms("decode", ctx), 1 + k)
    mem = cm.memory_terms(streaming)
    rows = [(mem[t], limits.get(t)) for t in TIERS]
    if limits.get("ram") is not None:
        rows.append(((mem["device"][0] + mem["host"][0], mem["device"][1] + mem["host"][1]), limits["ram"]))
    for (const, coef), cap in rows:
        if cap is None:
            continue
        scale = max(cap, const, 1e6)  # bytes -> O(1) so HiGHS's tolerances mean the same on every row
        a_ub.append(np.concatenate([coef, np.zeros(nt)]) / scale)
        b_ub.append((cap - const) / scale)
    a_eq = np.zeros((3, 9 + nt))
    for k in range(3):
        a_eq[k, 3 * k:3 * k + 3] = 1.0
    bounds = [(0, 1 if t in tiers[kind] else 0) for kind in KINDS for t in TIERS] + [(0, None)] * nt
    if not streaming:  # every layer resident: no weights stream in (on unified memory, host is resident)
        for t in (("disk",) if cm.hw.unified_memory else ("host", "disk")):
            bounds[TIERS.index(t)] = (0, 0)
    steps = [L] + [L * n for n, _ in segments]
    # tie-break: a millionth of the compute-only time per unit of fraction off the device
    floor = L * cm.stage_terms("prefill")["compute"][0]
    obj = np.concatenate([cm.tie_break() * 1e-6 * max(floor, 1e-9), steps])
    res = linprog(obj, A_ub=np.array(a_ub), b_ub=np.array(b_ub), A_eq=a_eq, b_eq=np.ones(3), bounds=bounds,
                  method="highs")
    return (res.x[:9], res.fun) if res.status == 0 else None


def _to_percent(x: np.ndarray, num_layers: int, floor: bool) -> list[tuple[float, float, float]]:
    """Fractions -> percentages summing to 100: weights and KV on whole-layer boundaries (the runner
    places whole layers), activations to 0.01%. `floor` rounds the device and host shares down."""
    out = []
    for k in range(3):
        d, h = float(x[3 * k]), float(x[3 * k + 1])
        steps = num_layers if k < 2 else 10000
        snap = (lambda v: math.floor(v * steps + 1e-6) / steps) if floor else (lambda v: round(v * steps) / steps)
        cd, ch = snap(d), max(snap(d + h), snap(d))
        pd, ph = round(100 * cd, 2), round(100 * ch, 2)
        out.append((pd, round(ph - pd, 2), round(100 - ph, 2)))
    return out


def candidates(max_batch: int, quants, kv_quants, cpu_attention: bool):
    for bs, mb in itertools.product(BATCH_SIZES, MICRO_BATCHES):
        if bs * mb > max_batch:
            continue
        for q, kq, ca in itertools.product(quants, kv_quants, (False, True) if cpu_attention else (False,)):
            yield Policy(batch_size=bs, num_micro_batches=mb, quant=q, kv_quant=kq, cpu_attention=ca)


def search(spec: ModelSpec, hw: HardwareProfile, dtype: torch.dtype, prompt_len: int, gen_len: int,
           limits: dict[str, float | None], max_batch: int, quants=("none",), kv_quants=("none",),
           progress: bool = False, tiers: dict = RUNNER_TIERS) -> list[Prediction]:
    """Every feasible candidate's best placement, best predicted throughput first."""
    from tqdm import tqdm
    cands = list(candidates(max_batch, quants, kv_quants, not hw.unified_memory))
    found = []
    for cand in tqdm(cands, desc="tidal plan: search", disable=not progress, unit="LP", leave=False):
        cm = CostModel(spec, hw, dtype, prompt_len, gen_len, cand, limits.get("spare_ram") or 0.0)
        x = solve_placement(cm, limits, tiers)
        if x is None:
            continue
        for floor in (False, True):   # to whole layers, nearest; if that broke a limit, round down instead
            w, kv, act = _to_percent(x, spec.num_layers, floor)
            pred = predict(spec, hw, dtype, prompt_len, gen_len, cand.with_(weights=w, kv=kv, act=act), limits)
            if fits(pred, limits):
                found.append(pred)
                break
    # ties: less compression, no CPU attention, fewer micro-batches
    found.sort(key=lambda p: (-p.tokens_per_s, _QUANT_ORDER[p.policy.quant], _QUANT_ORDER[p.policy.kv_quant],
                              p.policy.cpu_attention, p.policy.num_micro_batches))
    return found


def choose_policy(hf_config, engine_config, prompt_len: int, gen_len: int, profile: HardwareProfile, *,
                  max_batch: int | None = None, allow_compression: bool = True, disk_limit: int | None = None,
                  progress: bool = False) -> tuple[Policy, Prediction]:
    """The policy `--policy auto` runs: all-device when it fits, else the search's best.

    max_batch: most sequences in flight (bs x mb); default --max-num-seqs. Compression is searched
    (none/int8/int4) unless the config fixes --quant / --kv-quant or allow_compression is False.
    """
    spec = model_spec(hf_config)
    if prompt_len < 1 or gen_len < 1:
        raise TidalError("--prompt-len and --gen-len must be at least 1", param="prompt_len")
    if prompt_len + gen_len > spec.max_position:
        raise TidalError(f"prompt {prompt_len} + generation {gen_len} tokens exceed the model's "
                         f"{spec.max_position}-token context; lower --prompt-len or --gen-len", param="prompt_len")
    dtype = engine_config.torch_dtype
    max_batch = max_batch or engine_config.max_num_seqs
    limits = limits_for(engine_config, profile, disk_limit)
    wq = weight_format(engine_config.quant)
    full = Policy(batch_size=max_batch, quant=wq, kv_quant=engine_config.kv_quant)
    pred = predict(spec, profile, dtype, prompt_len, gen_len, full, limits)
    if fits(pred, limits):
        return full, pred
    comp = ("none", "int8", "int4") if allow_compression else ("none",)
    quants = (wq,) if wq != "none" else comp
    kv_quants = (engine_config.kv_quant,) if engine_config.kv_quant != "none" else comp
    # weights may stream from a safetensors checkpoint mapped in place, but KV files need --offload-dir
    tiers = RUNNER_TIERS if engine_config.offload_dir else {**RUNNER_TIERS, "kv": ("device", "host")}
    found = search(spec, profile, dtype, prompt_len, gen_len, limits, max_batch, quants, kv_quants, progress, tiers)
    if not found:
        flag = budget_flag(engine_config, profile)
        raise TidalError(nothing_fits(spec, profile, dtype, prompt_len, gen_len, limits, quants[-1], kv_quants[-1],
                                       flag), param=flag[2:].replace("-", "_"))
    return found[0].policy, found[0]


