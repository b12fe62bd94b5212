"""The simulated replica's settings: the step latency model and the output model.

Owns: `SimConfig` (step time = `base_ms` + `prefill_ms_per_token` x uncached prompt tokens computed in
the step + `prefill_ms_per_token_kctx` x those tokens' attention context in thousands of tokens (a
prompt token's attention reads every token before it, cached or not) + `decode_ms_per_seq` x sequences
decoding in it; so TTFT grows with the prompt tokens the prefix cache does not serve and with the
context they sit on, and inter-token latency with the batch; plus `num_kv_blocks` and `eos_probability`),
its JSON file (`--sim-config FILE`: any subset of the fields) and the defaults, fitted by
bench/calibrate_sim.py to a real tidal replica of smollm2 on a 2-core AMD EPYC (docs/benchmarks.md,
"Simulated replica recalibrated", session 9).
Must not: sleep or schedule (sim/core.py does), or import torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from tidal.errors import TidalError


def prefill_kctx(tokens: int, computed_before: int) -> float:
    """A prompt chunk's context term: its tokens times their mean context (the tokens before each), in
    thousands; what `prefill_ms_per_token_kctx` multiplies (bench/calibrate_sim.py fits with it too)."""
    return tokens * (computed_before + tokens / 2) / 1000


@dataclass
class SimConfig:
    base_ms: float = 18.9                    # a step's fixed cost (the weights streamed once per step)
    prefill_ms_per_token: float = 0.527      # per prompt token computed (not served by the prefix cache)
    prefill_ms_per_token_kctx: float = 0.268  # per prompt token computed, per 1,000 tokens before it
    decode_ms_per_seq: float = 2.45          # per sequence decoding one token (at a ~2,100-token context)
    num_kv_blocks: int | None = None    # KV pool; None: --num-kv-blocks, else 4096 (65536 tokens at 16)
    eos_probability: float = 0.0        # chance per token of ending early (never with ignore_eos)
    time_scale: float = 1.0             # multiplies every step time (0: no sleeping at all)

    def __post_init__(self):
        for f in ("base_ms", "prefill_ms_per_token", "prefill_ms_per_token_kctx", "decode_ms_per_seq", "time_scale"):
            if not getattr(self, f) >= 0:
                raise TidalError(f"simulated replica: {f} must be >= 0 (got {getattr(self, f)})", param=f)
        if not 0 <= self.eos_probability <= 1:
            raise TidalError("simulated replica: eos_probability must be between 0 and 1", param="eos_probability")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise TidalError("simulated replica: num_kv_blocks must be at least 1", param="num_kv_blocks")

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, prefill_kctx: float = 0.0) -> float:
        """How long a step of this shape takes on the replica being simulated; `prefill_kctx` sums each
        prompt token's context (the tokens before it) in thousands."""
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        ms = self.base_ms + self.prefill_ms_per_token * prefill_tokens + self.decode_ms_per_seq * decode_seqs \
            + self.prefill_ms_per_token_kctx * prefill_kctx
        return ms * self.time_scale / 1000.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> "SimConfig":
        """Defaults, then the JSON file's fields, then the overrides that are not None."""
        values: dict = {}
        if path:
            try:
                with open(path) as f:
                    values = json.load(f)
            except (OSError, ValueError) as e:
                raise TidalError(f"--sim-config {path}: cannot read it ({e})", param="sim_config") from None
            if not isinstance(values, dict):
                raise TidalError(f"--sim-config {path}: expected a JSON object", param="sim_config")
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise TidalError(f"--sim-config {path}: unknown field(s) {unknown}; known: {sorted(known)}",
                                 param="sim_config")
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as e:
            raise TidalError(f"simulated replica settings: {e}", param="sim_config") from None
