"""Predicted time of one generation job under a Policy: FlexGen's zig-zag schedule, costed per layer.

Owns: `CostModel`, which writes each resource's busy time per layer, and each tier's memory, as a
linear function `const + coef @ x` of the nine placement fractions x (weights, KV cache, activations
over device / host / disk), so the LP in search.py and `predict` share one formula; `predict`.
Must not: search over policies (search.py), measure hardware (microbench.py), or import the engine.

The schedule (FlexGen, Sheng et al. 2023, section 4): the effective batch bs x mb runs layer by
layer; each layer's weights are loaded once and used by all mb micro-batches, and loads of the next
layer and stores of the previous one overlap this layer's compute. So per layer
    time = max(compute, host->device, device->host, disk read, disk write)
where compute = mb x (linear layers: FLOP time + weight-streaming time; attention; the LM head's share
+ the layer's dispatch overhead), plus CPU attention over host KV when cpu_attention is on. A job is
one prefill (prompt_len tokens a sequence) and gen_len - 1 decode steps (the prefill yields the first
token); decode steps are costed at DECODE_SEGMENTS context lengths. Throughput = bs x mb x gen_len
/ (prefill + decode), FlexGen's formula. On a CPU-only machine (unified memory) host<->device moves
are free and only the disk shares stream.
Layout, as engine/offload_runner.py and weights/placement.py run it: the policy's weight shares are
of the decoder layers (whole layers); embeddings, LM head and final norm stay on the device; when
any layer streams, two whole-layer slots on the device hold the one computing and the one loading.
Disk reads run at the page-cache rate when the RAM nobody budgeted can hold all the weights and KV
(the offload files stay cached after their first read), else at the measured uncached rate; on a
CPU-only machine a page-cache read is a memcpy on the compute cores, so it adds to compute.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tidal.plan.hardware import HardwareProfile
from tidal.plan.model_spec import ModelSpec
from tidal.policy import TIERS, Policy

KINDS = ("weights", "kv", "act")
RESOURCES = ("compute", "h2d", "d2h", "disk_read", "disk_write")
DECODE_SEGMENTS = 4
# where the LP is indifferent, keep tensors on the faster tier (a tiny cost per fraction off device)
_TIER_PREFERENCE = np.array([0.0, 1.0, 2.0] * 3)


def x_of(policy: Policy) -> np.ndarray:
    """The nine fractions (0..1): weights device/host/disk, KV device/host/disk, activations device/host/disk."""
    return np.array([*policy.weights, *policy.kv, *policy.act], dtype=float) / 100.0


def _x(kind: str, *tiers_and_factor) -> np.ndarray:
    """coef vector putting factor on the named tiers of one kind: _x("kv", "host", "disk", 3.0)."""
    *tiers, factor = tiers_and_factor
    v = np.zeros(9)
    for t in tiers:
        v[3 * KINDS.index(kind) + TIERS.index(t)] = factor
    return v


@dataclass
class Prediction:
    policy: Policy
    tokens_per_s: float
    prefill_s: float
    decode_s: float
    batch: int
    memory: dict[str, float]                 # bytes per tier
    memory_parts: dict[str, dict[str, float]] = field(default_factory=dict)  # tier -> weights/kv/act/buffers
    bottleneck: dict[str, str] = field(default_factory=dict)                  # stage -> resource
    limits: dict[str, float | None] = field(default_factory=dict)
    disk_cached: bool = False                # disk reads costed at the page-cache rate

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy"] = str(self.policy)
        d["total_s"] = self.total_s
        return d


class CostModel:
    """Costs of one (model, machine, dtype, workload, batching/compression) combination; placement is x."""

    def __init__(self, spec: ModelSpec, hw: HardwareProfile, dtype: torch.dtype, prompt_len: int, gen_len: int,
                 policy: Policy, spare_ram: float = 0.0):
        self.spec, self.hw, self.dtype, self.policy = spec, hw, dtype, policy
        self.s, self.n = prompt_len, gen_len
        self.bs, self.mb = max(1, policy.batch_size), policy.num_micro_batches
        self.batch = self.bs * self.mb
        db = dtype.itemsize
        self.dtype_fmt = str(dtype).removeprefix("torch.")
        self.fmt = policy.quant if policy.quant != "none" else self.dtype_fmt
        L = spec.num_layers
        self.layer_w = spec.layer_weight_bytes(db, policy.quant)
        self.other_w = spec.other_weight_bytes(db, policy.quant)   # always on the device
        self.total_w = L * self.layer_w                            # what the weight shares divide
        self.kv_tok = spec.kv_bytes_per_token(dtype, policy.kv_quant)
        self.act_tok = spec.act_bytes_per_token(db)
        self.total_kv = self.kv_tok * L * self.batch * (self.s + self.n)
        self.total_act = self.act_tok * self.batch * self.s
        self.head_bytes = spec.vocab_size * spec.head_dim_in * db
        self.cpu_attn = policy.cpu_attention and not hw.unified_memory
        self.disk_cached = spare_ram >= self.total_w + self.total_kv
        self.disk_read_bw = hw.disk_read_cached_bw if self.disk_cached else hw.disk_read_bw

    # ---- time ---------------------------------------------------------------------------------
    def _compute_const(self, stage: str, context: float) -> float:
        """Device compute of one layer for all micro-batches, the part that does not depend on placement."""
        spec, hw, bs = self.spec, self.hw, self.bs
        rows = bs * self.s if stage == "prefill" else bs
        # a matmul: FLOP time plus weight-streaming time (exact at one row and at many; at the knee in
        # between, CPUs and small matmuls overlap the two poorly, so a max would be optimistic)
        linear = spec.layer_flops_per_token * rows / hw.flops(self.fmt) + self.layer_w / hw.stream_bw(self.fmt)
        head_rows = bs  # logits only for each sequence's last token
        head = (spec.head_flops_per_token * head_rows / hw.flops(self.dtype_fmt)
                + self.head_bytes / hw.stream_bw(self.dtype_fmt)) / spec.num_layers
        if stage == "prefill":   # causal: token i attends to i + 1 tokens; scores in fp32
            attn = spec.attn_flops_per_token(1) * bs * self.s * (self.s + 1) / 2 / hw.flops("float32")
        elif self.cpu_attn:
            attn = 0.0           # placement-dependent: in stage_terms
        else:                    # decode attention reads the whole context's KV: bandwidth-bound
            attn = self.kv_tok * context * bs / hw.attn_bw
        return self.mb * (linear + head + attn + hw.layer_overhead_s)

    def stage_terms(self, stage: str, context: float = 0.0) -> dict[str, tuple[float, np.ndarray]]:
        """Per-layer busy time of each resource as (const, coef) with time = const + coef @ x."""
        hw, B = self.hw, self.batch
        tokens = self.s if stage == "prefill" else 1
        terms = {r: [0.0, np.zeros(9)] for r in RESOURCES}
        terms["compute"][0] = self._compute_const(stage, context)
        act_bytes = self.act_tok * tokens * B
        new_kv = self.kv_tok * tokens * B
        # weights: every byte not on the device crosses host->device once per layer; disk bytes also disk->host
        terms["h2d"][1] += _x("weights", "host", "disk", self.layer_w / hw.h2d_bw)
        terms["disk_read"][1] += _x("weights", "disk", self.layer_w / self.disk_read_bw)
        # activations: stored after the layer and loaded before the next when not on the device
        terms["d2h"][1] += _x("act", "host", "disk", act_bytes / hw.d2h_bw)
        terms["h2d"][1] += _x("act", "host", "disk", act_bytes / hw.h2d_bw)
        terms["disk_write"][1] += _x("act", "disk", act_bytes / hw.disk_write_bw)
        terms["disk_read"][1] += _x("act", "disk", act_bytes / self.disk_read_bw)
        # KV cache: new entries stored to their tier; a decode step reads the whole context
        terms["disk_write"][1] += _x("kv", "disk", new_kv / hw.disk_write_bw)
        if stage == "decode":
            ctx_kv = self.kv_tok * context * B
            terms["disk_read"][1] += _x("kv", "disk", ctx_kv / self.disk_read_bw)
            if self.cpu_attn:    # host KV never moves: attention runs on the CPU; q/k/v go down, outputs up
                terms["compute"][1] += _x("kv", "host", "disk", ctx_kv / hw.cpu_attn_bw)
                terms["compute"][1] += _x("kv", "device", ctx_kv / hw.attn_bw)
                sp = self.spec
                db = self.dtype.itemsize
                terms["d2h"][0] += (sp.num_heads + 2 * sp.num_kv_heads) * sp.head_dim * db * B / hw.d2h_bw
                terms["h2d"][0] += sp.num_heads * sp.head_dim * db * B / hw.h2d_bw
            else:
                terms["h2d"][1] += _x("kv", "host", "disk", ctx_kv / hw.h2d_bw)
                terms["d2h"][1] += _x("kv", "host", "disk", new_kv / hw.d2h_bw)
        else:
            terms["d2h"][1] += _x("kv", "host", "disk", new_kv / hw.d2h_bw)
        if hw.unified_memory:    # device memory is host RAM: nothing crosses a host<->device link
            terms["h2d"], terms["d2h"] = [0.0, np.zeros(9)], [0.0, np.zeros(9)]
            if self.disk_cached:  # a page-cache read is a memcpy by the same cores that compute: no overlap
                terms["compute"][1] += terms["disk_read"][1]
                terms["disk_read"][1] = np.zeros(9)
        return {r: (c, v) for r, (c, v) in terms.items()}

    def decode_segments(self) -> list[tuple[int, float]]:
        """(number of decode steps, mean context length) for DECODE_SEGMENTS chunks of the gen_len - 1 steps."""
        steps = np.arange(1, self.n)      # step t attends over s + t tokens (the prefill gave token 1)
        return [(len(c), float(self.s + c.mean())) for c in np.array_split(steps, DECODE_SEGMENTS) if len(c)]

    # ---- memory -------------------------------------------------------------------------------
    def streams(self, x: np.ndarray) -> bool:
        """Whether any decoder layer streams in (host or disk; on unified memory only disk)."""
        return bool(x[2] > 1e-9 if self.hw.unified_memory else x[1] + x[2] > 1e-9)

    def memory_parts(self, streaming: bool) -> dict[str, dict[str, tuple[float, np.ndarray]]]:
        """Peak bytes per tier and part (weights, kv, act, buffers) as (const, coef); `streaming`: some
        layers stream, so the device holds two layer slots."""
        spec, bs, unified = self.spec, self.bs, self.hw.unified_memory
        db = self.dtype.itemsize
        parts = {t: {} for t in TIERS}
        for tier in TIERS:
            parts[tier]["weights"] = (self.other_w if tier == "device" else 0.0, _x("weights", tier, self.total_w))
            parts[tier]["kv"] = (0.0, _x("kv", tier, self.total_kv))
            parts[tier]["act"] = (0.0, _x("act", tier, self.total_act))
            parts[tier]["buffers"] = (0.0, np.zeros(9))
        # device working set: one micro-batch's transient tensors, one sequence's prefill scores, logits
        work = (spec.work_bytes_per_token(db) * bs * self.s + spec.attn_scores_bytes(self.s)
                + bs * spec.vocab_size * 4)
        slots = 2 * self.layer_w if streaming else 0.0
        # KV that is not on the device is copied up a layer at a time for one micro-batch (double-buffered),
        # unless attention runs where it lies; disk KV is staged through host memory
        kv_mb = 2 * self.kv_tok * bs * (self.s + self.n)
        kv_buf = np.zeros(9) if self.cpu_attn or unified else _x("kv", "host", "disk", kv_mb)
        parts["device"]["buffers"] = (work + slots, kv_buf)
        if not unified:  # disk data is staged in pinned host memory: one layer's weights, one micro-batch's KV
            parts["host"]["buffers"] = (self.layer_w if streaming else 0.0, _x("kv", "disk", kv_mb))
        return parts

    def memory_terms(self, streaming: bool) -> dict[str, tuple[float, np.ndarray]]:
        return {t: (sum(c for c, _ in p.values()), sum(v for _, v in p.values()))
                for t, p in self.memory_parts(streaming).items()}

    def tie_break(self) -> np.ndarray:
        return _TIER_PREFERENCE


def predict(spec: ModelSpec, hw: HardwareProfile, dtype: torch.dtype, prompt_len: int, gen_len: int,
            policy: Policy, limits: dict[str, float | None] | None = None) -> Prediction:
    """Throughput, time split and memory per tier of `policy` on this workload."""
    limits = dict(limits or {})
    cm = CostModel(spec, hw, dtype, prompt_len, gen_len, policy, limits.get("spare_ram") or 0.0)
    x, L = x_of(policy), spec.num_layers

    def layer_time(stage, ctx=0.0):
        times = {r: c + v @ x for r, (c, v) in cm.stage_terms(stage, ctx).items()}
        worst = max(times, key=times.get)
        return times[worst], worst

    t_pre, b_pre = layer_time("prefill")
    decode_s, b_dec = 0.0, "-"
    for steps, ctx in cm.decode_segments():
        t, b_dec = layer_time("decode", ctx)
        decode_s += steps * L * float(t)
    prefill_s = L * float(t_pre)
    parts = {t: {k: float(c + v @ x) for k, (c, v) in p.items()} for t, p in cm.memory_parts(cm.streams(x)).items()}
    return Prediction(policy=policy, tokens_per_s=cm.batch * gen_len / (prefill_s + decode_s),
                      prefill_s=prefill_s, decode_s=decode_s, batch=cm.batch,
                      memory={t: sum(p.values()) for t, p in parts.items()}, memory_parts=parts,
                      bottleneck={"prefill": b_pre, "decode": b_dec}, limits=limits, disk_cached=cm.disk_cached)
