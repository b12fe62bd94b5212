"""The planner's memory side: which tiers the runner can use, each tier's limit, and what to say
when nothing fits.

Owns: `RUNNER_TIERS`, `limits_for` (bytes allowed per tier from the flags and the hardware profile;
on a CPU one RAM budget), `disk_limit_for` (a safetensors checkpoint mapped in place counts as disk
room), `fits`, `nothing_fits` (the error text: what the smallest job needs, which flag to raise),
`budget_flag`, and `format_bytes`.
Must not: search or solve (search.py), cost time (cost_model.py), or import the engine.
"""
from __future__ import annotations

import numpy as np

from tidal.plan.cost_model import CostModel, Prediction
from tidal.plan.hardware import HardwareProfile, disk_free
from tidal.policy import TIERS, Policy

# what engine/offload_runner.py can place today: weights and KV on every tier (KV on disk: memory-
# mapped files), activations on the device; widen these when the runner learns more (the LP and
# cost model cover all nine)
RUNNER_TIERS = {"weights": ("device", "host", "disk"), "kv": ("device", "host", "disk"), "act": ("device",)}
KINDS = ("weights", "kv", "act")


def limits_for(engine_config, profile: HardwareProfile, disk_limit: int | None = None) -> dict[str, float | None]:
    """Bytes allowed per tier: the flags, else what the profile found free; disk only with --offload-dir
    (or `disk_limit`, see disk_limit_for).

    On a CPU-only machine (unified memory) device and host are one RAM, and the runner keeps every
    layer it does not stream resident in it: the budget is the smaller of --device-mem / --host-mem
    (either one alone, or free RAM), all of it "device"; only the disk tier streams."""
    if profile.unified_memory:
        given = [b for b in (engine_config.device_mem_bytes, engine_config.host_mem_bytes) if b]
        lim = {"device": min(given) if given else profile.device_capacity, "host": 0}
    else:
        lim = {"device": engine_config.device_mem_bytes or profile.device_capacity,
               "host": engine_config.host_mem_bytes or profile.host_capacity}
    lim["disk"] = disk_limit if disk_limit is not None else disk_free(engine_config.offload_dir)
    lim["ram"] = profile.host_capacity if profile.unified_memory else None
    # RAM nobody budgeted: the page cache that keeps offloaded files in memory after a first read
    lim["spare_ram"] = max(0, profile.host_capacity - lim["host"] - (lim["device"] if profile.unified_memory else 0))
    return lim


def budget_flag(engine_config, profile: HardwareProfile) -> str:
    """The flag that set the device budget: on a CPU, the smaller of the two given (limits_for)."""
    host, dev = engine_config.host_mem_bytes, engine_config.device_mem_bytes
    return "--host-mem" if profile.unified_memory and host and not (dev and dev < host) else "--device-mem"


def disk_limit_for(engine_config, checkpoint) -> int | None:
    """The disk tier's room when no --offload-dir is given but the runner can stream layers anyway:
    a plain safetensors checkpoint (not quantized at load, not dummy) is mapped in place, so its
    layers may all go to "disk" at no extra space. None otherwise (limits_for's default)."""
    import shutil

    from tidal.weights.loader import plain_safetensors
    if engine_config.offload_dir or checkpoint is None:
        return None
    if engine_config.load_format != "dummy" and engine_config.quant == "none" \
            and plain_safetensors(checkpoint) is not None:
        return shutil.disk_usage(checkpoint.path).total
    return None


def fits(pred: Prediction, limits: dict[str, float | None], rtol: float = 1e-6) -> bool:
    ok = all(limits.get(t) is None or pred.memory[t] <= limits[t] * (1 + rtol) + 1 for t in TIERS)
    if limits.get("ram") is not None:
        ok = ok and pred.memory["device"] + pred.memory["host"] <= limits["ram"] * (1 + rtol) + 1
    return ok


def nothing_fits(spec, hw, dtype, prompt_len, gen_len, limits, quant, kv_quant, device_flag="--device-mem") -> str:
    """What the smallest job (batch 1, the most compression allowed) needs, and which flag to raise."""
    cand = Policy(batch_size=1, quant=quant, kv_quant=kv_quant)
    cm = CostModel(spec, hw, dtype, prompt_len, gen_len, cand)
    mem = cm.memory_terms(streaming=True)
    x = np.zeros(9)
    for k, kind in enumerate(KINDS):   # everything as far from the device as the runner allows
        allowed = [t for t in RUNNER_TIERS[kind] if t != "disk" or limits["disk"]]
        x[3 * k + TIERS.index(allowed[-1])] = 1.0
    need_dev = mem["device"][0] + mem["device"][1] @ x
    need_host = mem["host"][0] + mem["host"][1] @ x
    total = cm.total_w + cm.total_kv + cm.total_act + cm.other_w
    if hw.unified_memory:   # a CPU: device and host are one RAM, budgeted as the smaller flag
        have = f"one RAM budget of {format_bytes(limits['device'])} (on a CPU, device and host memory are the " \
               f"same RAM, so the smaller of --device-mem / --host-mem counts) + disk {format_bytes(limits['disk'] or 0)}"
    else:
        have = " + ".join(f"{t} {format_bytes(limits[t] or 0)}" for t in TIERS)
    wq = "uncompressed" if quant == "none" else quant
    kq = "uncompressed" if kv_quant == "none" else kv_quant
    msg = (f"no offloading policy fits ({have}): the smallest job (batch 1, {wq} weights, {kq} KV cache) "
           f"needs {format_bytes(total)} in all, at least {format_bytes(need_dev)} of it on the device (resident "
           f"embeddings and LM head, streaming slots, working buffers)")
    fixes = []
    if need_dev > limits["device"]:
        fixes.append(f"raise {device_flag} to at least {format_bytes(need_dev)}")
    if need_host > limits["host"] and not hw.unified_memory:
        fixes.append(f"raise --host-mem to at least {format_bytes(need_host)}")
    if total > sum(limits[t] or 0 for t in TIERS):
        ram_flag = device_flag if hw.unified_memory else "--host-mem"
        fixes.append(f"raise {ram_flag}" + ("" if limits["disk"] else
                                            f", or give --offload-dir on a disk with {format_bytes(total)} free"))
    if not fixes:
        fixes.append("raise --device-mem or --host-mem")
    if quant == "none" or kv_quant == "none":
        fixes.append("allow compression (--quant / --kv-quant int4)")
    return msg + "; " + ", or ".join(fixes)


def format_bytes(b: float | None) -> str:
    """Bytes for people: "1.5 GiB", "54.0 MiB"; None (no limit) is "-"."""
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b:,.0f} B"
