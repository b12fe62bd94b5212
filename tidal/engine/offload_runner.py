"""The throughput side of the model runner: a model whose weights are placed by the resolved policy
(engine/resolve.py chooses it), and the zig-zag step schedule.

Owns: `build_offloaded_model` (a model built on the CPU, filled by model/placed_loading.py,
resident parts quantized and packed, a LayerPrefetcher on the streamed layers), and `OffloadSchedule`: a step run layer by
layer over `num_micro_batches` micro-batches, so each streamed layer is copied in once per step
and reused by every micro-batch (FlexGen's zig-zag block schedule).
Must not: form batches (the scheduler does), build batch tensors or sample (input_batch.prepare_batch
and ModelRunner's `_sample` do, for both schedules), read anything but the runner's own request state
(the rows it hands over), or branch on device type.
`TIDAL_OFFLOAD_LOG=1` prints each step's time and the prefetcher's load and wait seconds.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from tidal.engine.input_batch import Row, prepare_batch
from tidal.errors import TidalError
from tidal.kernels import get_backend, host_kv, quant_ops
from tidal.kernels.metadata import forward_context
from tidal.model.registry import build_model
from tidal.policy import Policy
from tidal.weights.offload_dir import OffloadStore, checkpoint_identity
from tidal.model.placed_loading import load_placed
from tidal.weights.placement import LayerLayout, assign_tiers, shared_tensor_ids, without_layers
from tidal.weights.prefetch import LayerPrefetcher

_SLOTS = 2  # streamed layers on the device at once: the one computing and the one being copied in


def build_offloaded_model(runner, policy: Policy, max_position: int, quant, verbose: bool = False):
    """A model whose decoder layers sit where `policy.weights` says; returns (model, placement,
    prefetcher or None). `quant`: (bits, group size) or None, as the runner resolved it."""
    from tidal.model.quantize import quantize_head, quantize_model
    config, dev, dtype, ckpt = runner.config, runner.device, runner.dtype, runner.checkpoint
    model = build_model(runner.hf_config, torch.device("cpu"), dtype, max_position=max_position)
    tiers = assign_tiers([LayerLayout(layer, shared_tensor_ids(model)).nbytes for layer in model.layers],
                         policy.weights)
    quantize = (lambda m: quantize_model(m, *quant, w8a8=config.quant == "w8a8")) if quant else None
    dummy_seed = config.seed if config.load_format == "dummy" else None
    store = None
    backend = get_backend(dev)   # first: it loads the CPU kernels where they are built, which pack w8a8 weights
    if config.offload_dir:
        # w8a8's packed layout depends on the CPU (quant_ops.pack), and the store keeps packed layers
        a8 = f"a8-{quant_ops.w8a8_layout()}" if config.quant == "w8a8" else ""
        quant_name = f"int{quant[0]}g{quant[1]}{a8}" if quant else "none"
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
        if config.quant_head != "none":
            quantize_head(model, config.quant_head)
        for module in model.modules():  # a packed copy of a streamed layer would pin a second copy
            if hasattr(module, "pack"):
                module.pack(backend)
    prefetcher = LayerPrefetcher(model, placement.streamed, dev, _SLOTS) if placement.streamed else None
    return model.eval(), placement, prefetcher


def kv_cache_tiers(policy: Policy, num_layers: int, device: torch.device) -> list[str]:
    """Each layer's KV cache tier under the policy's shares (whole layers, device first):
    "device", "host" (CPU memory; under a GPU model attention over it runs per --policy cpu-attn,
    kernels/host_kv.py) or "disk" (a file in --offload-dir, memory-mapped). On a CPU device and
    host are one memory."""
    if policy.kv[0] >= 100.0:
        return ["device"] * num_layers
    tiers = assign_tiers([1] * num_layers, policy.kv)
    if device.type == "cpu":
        return ["device" if t == "host" else t for t in tiers]
    host_kv.set_cpu_attention(policy.cpu_attention)
    return tiers


def split_batch(rows: list, n: int) -> list[list]:
    """The scheduled rows in n contiguous micro-batches of near-equal size (fewer when fewer rows)."""
    n = max(1, min(n, len(rows)))
    q, r = divmod(len(rows), n)
    parts, start = [], 0
    for k in range(n):
        end = start + q + (k < r)
        parts.append(rows[start:end])
        start = end
    return parts


class OffloadSchedule:
    def __init__(self, runner, num_micro_batches: int, prefetcher: LayerPrefetcher | None):
        self.runner, self.num_micro_batches, self.prefetcher = runner, num_micro_batches, prefetcher
        self.log = os.environ.get("TIDAL_OFFLOAD_LOG", "0") not in ("", "0")

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> list:
        """Run one step over the runner's scheduled rows; returns [(hidden, BatchLayout)] per micro-batch."""
        t0, before = time.perf_counter(), dict(self.prefetcher.stats) if self.prefetcher else None
        runner, model = self.runner, self.runner.model
        parts = split_batch(rows, self.num_micro_batches)
        if len(parts) == 1:
            out = [runner.forward(rows)]
        else:
            layouts = [prepare_batch(part, runner.block_size, runner.device) for part in parts]
            states = [model.embed(lay.input_ids, lay.positions) for lay in layouts]
            for i in range(len(model.layers)):  # the prefetcher's hook copies layer i in at its first call
                for j, lay in enumerate(layouts):
                    with forward_context(lay.meta, runner.kv_caches):
                        states[j] = model.layer_forward(i, lay.positions, states[j])
            out = [(model.final_norm(s), lay) for s, lay in zip(states, layouts)]
        if self.log:
            self._print(t0, before, parts, sum(n for _, n in rows))
        return out

    def _print(self, t0, before, parts, num_tokens: int) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        line = f"[offload] step {time.perf_counter() - t0:.3f}s tokens={num_tokens} mb={len(parts)}"
        if before is not None:
            s = self.prefetcher.stats
            line += (f" loads={s['loads'] - before['loads']} load={s['load_s'] - before['load_s']:.3f}s "
                     f"wait={s['wait_s'] - before['wait_s']:.3f}s")
        print(line, file=sys.stderr)
