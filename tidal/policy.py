"""An offloading policy: where weights, KV cache and activations live, and how a step is batched.

Owns: `Policy` (placement fractions over the tiers device / host / disk, micro-batching,
compression, CPU attention), its validation, and its string form for `--policy`.
Must not: pick a policy (the planner does) or move tensors (weights/placement.py does).

String forms accepted by `Policy.parse` (the same keys `str(policy)` writes):
  "w=20,80,0 kv=0,100,0 act=100,0,0 bs=32 mb=2 quant=int4 kv-quant=none cpu-attn=on"
  FlexGen's six `--percent` numbers, "20 80 0 100 0 100" (weights, KV, activations:
  device% host% each; the rest goes to disk), optionally followed by key=value pairs.
Percentages per kind sum to 100. On a CPU-only machine device and host are the same RAM:
a tensor "on device" and "on host" both sit in memory, and only the disk share streams.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from tidal.errors import TidalError

TIERS = ("device", "host", "disk")
_QUANT = ("none", "int8", "int4")


@dataclass(frozen=True)
class Policy:
    weights: tuple[float, float, float] = (100.0, 0.0, 0.0)   # % of weight bytes on device / host / disk
    kv: tuple[float, float, float] = (100.0, 0.0, 0.0)        # % of the KV cache
    act: tuple[float, float, float] = (100.0, 0.0, 0.0)       # % of activations (hidden states between layers)
    batch_size: int = 0            # sequences per micro-batch; 0: the scheduler's --max-num-seqs
    num_micro_batches: int = 1     # micro-batches that share one load of each layer's weights (zig-zag)
    quant: str = "none"            # weight compression
    kv_quant: str = "none"         # KV cache compression
    cpu_attention: bool = False    # attend over host-resident KV on the CPU instead of copying it

    def __post_init__(self):
        for name in ("weights", "kv", "act"):
            fr = getattr(self, name)
            if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 100.0) > 1e-6:
                raise TidalError(f"policy {name}={','.join(f'{f:g}' for f in fr)}: give three non-negative "
                                 "percentages (device, host, disk) that sum to 100", param="policy")
        if self.batch_size < 0 or self.num_micro_batches < 1:
            raise TidalError("policy bs must be >= 0 and mb >= 1", param="policy")
        for name in ("quant", "kv_quant"):
            if getattr(self, name) not in _QUANT:
                raise TidalError(f"policy {name.replace('_', '-')}={getattr(self, name)}: use none, int8 or int4",
                                 param="policy")

    @property
    def offloads_weights(self) -> bool:
        return self.weights[0] < 100.0

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.num_micro_batches

    def __str__(self) -> str:
        pct = lambda fr: ",".join(f"{f:g}" for f in fr)  # noqa: E731
        return (f"w={pct(self.weights)} kv={pct(self.kv)} act={pct(self.act)} bs={self.batch_size} "
                f"mb={self.num_micro_batches} quant={self.quant} kv-quant={self.kv_quant} "
                f"cpu-attn={'on' if self.cpu_attention else 'off'}")

    @classmethod
    def parse(cls, text: str) -> "Policy":
        """A policy string (module docstring) -> Policy; TidalError with the accepted forms if malformed."""
        tokens = text.replace(";", " ").split()
        kw: dict = {}
        nums = []
        while tokens and re.fullmatch(r"[0-9.]+", tokens[0]):
            nums.append(float(tokens.pop(0)))
        if nums:
            if len(nums) != 6:
                raise TidalError(f"policy '{text}': FlexGen's --percent form needs six numbers "
                                 "(w_device w_host kv_device kv_host act_device act_host)", param="policy")
            for i, name in enumerate(("weights", "kv", "act")):
                d, h = nums[2 * i], nums[2 * i + 1]
                kw[name] = (d, h, 100.0 - d - h)
        keys = {"w": "weights", "weights": "weights", "kv": "kv", "act": "act", "bs": "batch_size",
                "mb": "num_micro_batches", "quant": "quant", "kv-quant": "kv_quant", "cpu-attn": "cpu_attention"}
        for tok in tokens:
            key, sep, value = tok.partition("=")
            if not sep or key not in keys:
                raise TidalError(f"policy '{text}': cannot read '{tok}'; write key=value with keys "
                                 f"{sorted(keys)}, e.g. 'w=20,80,0 kv=0,100,0 bs=32 mb=2'", param="policy")
            field = keys[key]
            try:
                if field in ("weights", "kv", "act"):
                    parts = [float(x) for x in value.split(",")]
                    kw[field] = tuple(parts + [100.0 - sum(parts)]) if len(parts) == 2 else tuple(parts)
                elif field in ("batch_size", "num_micro_batches"):
                    kw[field] = int(value)
                elif field == "cpu_attention":
                    if value not in ("on", "off", "1", "0", "true", "false"):
                        raise ValueError(value)
                    kw[field] = value in ("on", "1", "true")
                else:
                    kw[field] = value
            except ValueError:
                raise TidalError(f"policy '{text}': bad value in '{tok}'", param="policy") from None
        return cls(**kw)

    def with_(self, **changes) -> "Policy":
        return replace(self, **changes)
