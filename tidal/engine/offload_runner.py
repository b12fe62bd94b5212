"""The throughput side of the model runner: which policy applies, a model whose weights are placed
by it, and the zig-zag step schedule.

Owns: `resolve_policy` (--policy, or for "auto" all-resident unless --host-mem / --device-mem
force offloading, then the fitting rule here), `build_offloaded_model`
(a model built on the CPU, filled by weights/placed_loading.py, resident parts quantized and
packed, a LayerPrefetcher on the streamed layers), and `OffloadSchedule`: a step run layer by
layer over `num_micro_batches` micro-batches, so each streamed layer is copied in once per step
and reused by every micro-batch (FlexGen's zig-zag block schedule).
Must not: form batches (the scheduler does), build batch tensors or sample (ModelRunner's
`_prepare` and `_sample` do, for both schedules), or branch on device type.
`TIDAL_OFFLOAD_LOG=1` prints each step's time and the prefetcher's load and wait seconds.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tidal.engine.scheduler import ScheduledBatch
from tidal.errors import TidalError
from tidal.kernels import get_backend, host_kv
from tidal.kernels.metadata import forward_context
from tidal.model.registry import build_model
from tidal.plan.policy import Policy
from tidal.weights.offload_dir import OffloadStore, checkpoint_identity
from tidal.weights.placed_loading import load_placed
from tidal.weights.placement import LayerLayout, assign_tiers, shared_tensor_ids, without_layers
from tidal.weights.prefetch import LayerPrefetcher

_SLOTS = 2  # streamed layers on the device at once: the one computing and the one being copied in


@dataclass
class ModelSizes:
    layer_bytes: list[int]   # each decoder layer's own weights
    other_bytes: int         # embeddings, LM head, final norm: always resident
    kv_bytes: int            # the KV pool the runner will allocate


def resolve_policy(config, hf_config, dtype: torch.dtype, max_model_len: int, default_kv_bytes: int) -> Policy:
    if config.policy != "auto":
        return Policy.parse(config.policy)
    if not (config.host_mem_bytes or config.device_mem_bytes):
        return Policy()  # no limit given: everything resident
    sizes = model_sizes(config, hf_config, dtype, max_model_len, default_kv_bytes)
    # not tidal/plan's choose_policy yet: its CPU memory model (disk only with --offload-dir, host
    # and device budgets apart) does not match this runner's; `tidal plan` prints a policy to pass
    return fit_policy(config, sizes)


def model_sizes(config, hf_config, dtype, max_model_len, default_kv_bytes) -> ModelSizes:
    model = build_model(hf_config, torch.device("meta"), dtype, max_position=max_model_len)
    shared = shared_tensor_ids(model)
    layer_bytes = [LayerLayout(layer, shared).nbytes for layer in model.layers]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    kvh = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    per_token = 2 * hf_config.num_hidden_layers * kvh * head_dim * dtype.itemsize
    if config.kv_mem_bytes:
        kv = config.kv_mem_bytes
    elif config.num_kv_blocks:
        kv = config.num_kv_blocks * config.block_size * per_token
    else:
        kv = min(default_kv_bytes, config.max_num_seqs * (max_model_len + config.block_size) * per_token)
    return ModelSizes(layer_bytes, total - sum(layer_bytes), kv)


def fit_policy(config, sizes: ModelSizes) -> Policy:
    """Whole layers, in order, on the device while they fit, then on the host, the rest on disk
    (all on the device when everything fits). A tenth of each budget is kept for activations, and
    two layers' worth for the streaming buffers."""
    cpu = config.torch_device.type == "cpu"
    slots = _SLOTS * max(sizes.layer_bytes)
    if cpu:  # device and host are the same memory
        dev_cap, host_cap = min(b for b in (config.host_mem_bytes, config.device_mem_bytes) if b), 0
    else:
        dev_cap = config.device_mem_bytes or torch.cuda.mem_get_info(config.torch_device)[0]
        host_cap = config.host_mem_bytes or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    dev_room = int(dev_cap * 0.9) - sizes.other_bytes - sizes.kv_bytes - slots
    if dev_room < 0:
        flag = "--host-mem" if cpu else "--device-mem"
        raise TidalError(f"{flag} {_gib(dev_cap)} cannot hold the KV cache ({_gib(sizes.kv_bytes)}), the embeddings "
                         f"and LM head ({_gib(sizes.other_bytes)}) and two streamed layers ({_gib(slots)}); "
                         f"give more {flag} or a smaller --kv-mem", param="host_mem" if cpu else "device_mem")
    host_room = int(host_cap * 0.9) - slots if host_cap else 0
    total, acc, placed = sum(sizes.layer_bytes), 0, [0, 0]
    for b in sizes.layer_bytes:
        tier = 0 if acc + b <= dev_room else 1 if placed[1] + b <= host_room else None
        if tier is None:
            break
        placed[tier] += b
        acc += b
    d, h = 100 * placed[0] / total, 100 * placed[1] / total
    return Policy(weights=(d, h, max(0.0, 100 - d - h)))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def build_offloaded_model(runner, policy: Policy, max_position: int, quant, verbose: bool = False):
    """A model whose decoder layers sit where `policy.weights` says; returns (model, placement,
    prefetcher or None). `quant`: (bits, group size) or None, as the runner resolved it."""
    from tidal.weights.quantize_model import quantize_model
    config, dev, dtype, ckpt = runner.config, runner.device, runner.dtype, runner.checkpoint
    model = build_model(runner.hf_config, torch.device("cpu"), dtype, max_position=max_position)
    tiers = assign_tiers([LayerLayout(layer, shared_tensor_ids(model)).nbytes for layer in model.layers],
                         policy.weights)
    quantize = (lambda m: quantize_model(m, *quant)) if quant else None
    dummy_seed = config.seed if config.load_format == "dummy" else None
    store = None
    if config.offload_dir:
        quant_name = f"int{quant[0]}g{quant[1]}" if quant else "none"
        store = OffloadStore(config.offload_dir, checkpoint_identity(ckpt, dtype, quant_name, dummy_seed))
    read = (lambda: ckpt.iter_tensors(dtype, keep_quantized=quant)) if quant else (lambda: ckpt.iter_tensors(dtype))
    try:
        progress = (lambda it: tqdm(it, desc="loading weights", unit=" tensors", leave=False)) if verbose else iter
        placement = load_placed(model, tiers, dev, dtype, ckpt, read, dummy_seed, quantize, store, progress)
    except ValueError as e:
        raise TidalError(f"{ckpt.path}: weights do not fit the model ({e})", param="model") from None
    with without_layers(model, placement.streamed):
        if quantize is not None:
            quantize(model)
        backend = get_backend(dev)
        for module in model.modules():  # a packed copy of a streamed layer would pin a second copy
            if hasattr(module, "pack"):
                module.pack(backend)
    prefetcher = LayerPrefetcher(model, placement.streamed, dev, _SLOTS) if placement.streamed else None
    return model.eval(), placement, prefetcher


def kv_cache_devices(policy: Policy, num_layers: int, device: torch.device) -> list[torch.device]:
    """Each layer's KV cache device: the policy's host share (whole layers, first ones on the device)
    on the CPU. On a CPU device host and device are one memory, so every layer stays put."""
    if device.type == "cpu" or policy.kv[0] >= 100.0:
        return [device] * num_layers
    tiers = assign_tiers([1] * num_layers, policy.kv)
    if "disk" in tiers:
        raise TidalError(f"policy kv={','.join(f'{f:g}' for f in policy.kv)}: a KV cache on disk is not supported "
                         "yet; give its disk share to the host (e.g. kv=0,100,0)", param="policy")
    host_kv.set_cpu_attention(policy.cpu_attention)
    return [device if t == "device" else torch.device("cpu") for t in tiers]


def split_batch(batch: ScheduledBatch, block_tables: list, n: int) -> list[tuple[ScheduledBatch, list]]:
    """The batch's requests in n contiguous micro-batches of near-equal size (fewer when fewer requests)."""
    n = max(1, min(n, len(batch.requests)))
    q, r = divmod(len(batch.requests), n)
    parts, start = [], 0
    for k in range(n):
        end = start + q + (k < r)
        parts.append((ScheduledBatch(batch.requests[start:end], batch.num_new_tokens[start:end]),
                      block_tables[start:end]))
        start = end
    return parts


class OffloadSchedule:
    def __init__(self, runner, num_micro_batches: int, prefetcher: LayerPrefetcher | None):
        self.runner, self.num_micro_batches, self.prefetcher = runner, num_micro_batches, prefetcher
        self.log = os.environ.get("TIDAL_OFFLOAD_LOG", "0") not in ("", "0")

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, block_tables: list) -> list:
        """Run one step; returns [(hidden, BatchLayout)] per micro-batch."""
        t0, before = time.perf_counter(), dict(self.prefetcher.stats) if self.prefetcher else None
        runner, model = self.runner, self.runner.model
        parts = split_batch(batch, block_tables, self.num_micro_batches)
        if len(parts) == 1:
            out = [runner.forward(batch, block_tables)]
        else:
            layouts = [runner._prepare(b, t) for b, t in parts]
            states = [model.embed(lay.input_ids, lay.positions) for lay in layouts]
            for i in range(len(model.layers)):  # the prefetcher's hook copies layer i in at its first call
                for j, lay in enumerate(layouts):
                    with forward_context(lay.meta, runner.kv_caches):
                        states[j] = model.layer_forward(i, lay.positions, states[j])
            out = [(model.final_norm(s), lay) for s, lay in zip(states, layouts)]
        if self.log:
            self._print(t0, before, parts, batch)
        return out

    def _print(self, t0, before, parts, batch) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        line = f"[offload] step {time.perf_counter() - t0:.3f}s tokens={batch.total_tokens} mb={len(parts)}"
        if before is not None:
            s = self.prefetcher.stats
            line += (f" loads={s['loads'] - before['loads']} load={s['load_s'] - before['load_s']:.3f}s "
                     f"wait={s['wait_s'] - before['wait_s']:.3f}s")
        print(line, file=sys.stderr)
