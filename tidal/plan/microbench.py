"""Short micro-benchmarks behind `tidal plan --profile`: each runs for about half a second.

Owns: `measure(device, offload_dir)` -> HardwareProfile, and the compute benchmarks (matmuls,
decode attention, a decoder layer's dispatch); iobench.py times copies and the disk.
Matmuls go through tidal's own layers (Linear packed by the backend, QuantLinear on random codes)
and attention through the backend's paged decode kernel, so the figures are those of the kernels the
engine runs. Each figure is the best of its repetitions (the machine's ceiling; a shared, busy
machine runs slower than this).
Must not: cache or load profiles (hardware.py does) or be imported on any hot path.
On CUDA, device timings use CUDA events (iobench.best) and host<->device copies use pinned memory;
this path is guarded so a CPU-only machine never touches torch.cuda.
"""
from __future__ import annotations

import os
import platform
import socket
import tempfile
from datetime import datetime, timezone

import torch

from tidal.plan.hardware import HardwareProfile, disk_free, free_device_memory, free_host_memory
from tidal.plan.iobench import best as _best
from tidal.plan.iobench import copy_bw, disk_bw, llc_bytes


def _layer(fmt: str, n: int, k: int, device: torch.device):
    """One tidal linear layer [n, k] in `fmt` on `device`, random weights; returns (module, weight bytes)."""
    from tidal.kernels import get_backend
    from tidal.model.layers.linear import Linear
    if fmt in ("int4", "int8"):
        from tidal.model.layers.quant_linear import QuantLinear
        from tidal.weights.quant import QuantizedWeight
        bits = 4 if fmt == "int4" else 8
        group = 32 if bits == 4 else k
        qdata = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device=device)
        scale = torch.full((n, k // group), 0.01, dtype=torch.float16, device=device)
        qw = QuantizedWeight(qdata, scale, -scale * 8, bits, group)
        mod = QuantLinear(qw)
        nbytes = sum(t.numel() * t.element_size() for t in (*mod.buffers(), *_tensors(getattr(mod, "packed", None))))
        return mod, nbytes
    dtype = getattr(torch, fmt)
    mod = Linear(k, n).to(device=device, dtype=dtype)
    mod.weight.data.normal_(0, 0.02)
    nbytes = mod.weight.numel() * mod.weight.element_size()
    mod.pack(get_backend(device))
    return mod, nbytes


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in (obj if isinstance(obj, (tuple, list)) else [obj]) if isinstance(t, torch.Tensor)]


def _matmul_figures(fmt: str, device: torch.device, big: bool) -> tuple[float, float]:
    """(FLOP/s at many rows, weight bytes/s at one row) for one weight format."""
    n = k = 8192 if big else 2048
    rows = 4096 if big else 256
    act_dtype = torch.bfloat16 if fmt in ("int4", "int8") else getattr(torch, fmt)
    mod, nbytes = _layer(fmt, n, k, device)
    x = torch.randn(rows, k, device=device, dtype=act_dtype)
    with torch.inference_mode():
        flops = 2 * rows * n * k / _best(lambda: mod(x), device)
        # one-row matmuls over a ring of layers 4x larger than the last-level cache: weights come from memory
        ring_bytes = 4 * 2**30 if big else max(2**27, 4 * llc_bytes())
        ring = [mod] + [_layer(fmt, n, k, device)[0] for _ in range(ring_bytes // nbytes)]
        x1 = x[:1]
        bw = len(ring) * nbytes / _best(lambda: [m(x1) for m in ring], device)
    return flops, bw


def _attention_bw(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """tidal's paged decode attention (the backend's kernel) for 32 sequences of 2048 tokens, 4 KV
    heads of 64, in `dtype`: a 64 MiB cache at bf16, beyond the last-level cache. KV bytes per second."""
    from tidal.kernels import get_backend
    from tidal.kernels.metadata import AttentionMetadata
    if device.type == "cpu":  # the engine decodes with the compiled CPU kernel once built: wait for it
        from tidal.kernels import cpu
        cpu.load()
    b, ctx, kvh, heads, d, block = 32, 2048, 4, 12, 64, 16
    nblk = b * ctx // block
    k_cache = torch.randn(nblk, block, kvh, d, device=device).to(dtype)
    v_cache = torch.randn(nblk, block, kvh, d, device=device).to(dtype)
    i64 = dict(dtype=torch.int64, device=device)
    tables = torch.arange(nblk, **i64).view(b, ctx // block)
    meta = AttentionMetadata(slot_mapping=torch.zeros(b, **i64), block_tables=tables,
                             seq_lens=torch.full((b,), ctx, **i64), query_start_loc=torch.arange(b + 1, **i64),
                             query_lens_list=[1] * b, seq_lens_list=[ctx] * b, max_query_len=1, max_seq_len=ctx,
                             block_size=block)
    q = torch.randn(b, heads, d, device=device).to(dtype)
    backend = get_backend(device)
    with torch.inference_mode():
        t = _best(lambda: backend.paged_attention(q, k_cache, v_cache, meta, d ** -0.5), device)
    return 2 * k_cache.numel() * k_cache.element_size() / t


def _tiny_decode_step(device: torch.device, layers: int = 8):
    """A tidal Llama of `layers` tiny layers and a closure decoding one token through it: a step whose
    time is all Python and kernel dispatch, as every decoder layer pays per micro-batch."""
    from transformers import LlamaConfig

    from tidal.kernels.metadata import AttentionMetadata, forward_context
    from tidal.model.registry import build_model
    if device.type == "cpu":  # the engine decodes with the compiled CPU kernel once built: wait for it
        from tidal.kernels import cpu
        cpu.load()
    block = 16
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64,
                      architectures=["LlamaForCausalLM"])
    model = build_model(cfg, device, torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    caches = [(torch.zeros(2, block, 2, 16, device=device), torch.zeros(2, block, 2, 16, device=device))
              for _ in range(layers)]
    i64 = dict(dtype=torch.int64, device=device)
    meta = AttentionMetadata(slot_mapping=torch.tensor([5], **i64), block_tables=torch.tensor([[0]], **i64),
                             seq_lens=torch.tensor([6], **i64), query_start_loc=torch.tensor([0, 1], **i64),
                             query_lens_list=[1], seq_lens_list=[6], max_query_len=1, max_seq_len=6, block_size=block)
    ids, pos = torch.tensor([3], **i64), torch.tensor([5], **i64)

    def step():
        with forward_context(meta, caches), torch.inference_mode():
            return model(ids, pos)
    return step


def _layer_overhead(device: torch.device) -> float:
    """Seconds of one tidal Llama decoder layer decoding one token at a tiny size."""
    return _best(_tiny_decode_step(device), device, 0.3) / 8


def measure(device: str = "cpu", offload_dir: str | None = None, progress: bool = True) -> HardwareProfile:
    """Run every micro-benchmark (about 10 s on a CPU, a little more on a GPU) and return the profile."""
    from tqdm import tqdm
    load = os.getloadavg()[0]  # before we add our own
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    cpu = torch.device("cpu")
    fmts = ("float32", "bfloat16", "float16", "int8", "int4") if cuda else ("float32", "bfloat16", "int8", "int4")
    cpu_fmts = ("float32", "bfloat16")
    steps = [f"device matmul {f}" for f in fmts] + ["device attention", "copies", "disk", "layer dispatch"]
    steps += [f"cpu matmul {f}" for f in cpu_fmts] + ["cpu attention"] if cuda else []
    bar = tqdm(steps, desc="tidal plan --profile", disable=not progress, unit="bench")
    figures: dict = {"matmul_flops": {}, "gemv_bw": {}, "cpu_matmul_flops": {}}
    notes: list[str] = []
    for step in bar:
        bar.set_postfix_str(step)
        kind, _, fmt = step.rpartition(" ")
        if kind == "device matmul":
            try:
                figures["matmul_flops"][fmt], figures["gemv_bw"][fmt] = _matmul_figures(fmt, dev, big=cuda)
            except (RuntimeError, ValueError, NotImplementedError) as e:  # a format this device cannot run
                notes.append(f"{fmt} matmul not measured ({str(e).splitlines()[0][:80]})")
        elif kind == "cpu matmul":
            figures["cpu_matmul_flops"][fmt] = _matmul_figures(fmt, cpu, big=False)[0]
        elif step == "device attention":
            figures["attn_bw"] = _attention_bw(dev)
        elif step == "cpu attention":
            figures["cpu_attn_bw"] = _attention_bw(cpu)
        elif step == "copies":
            figures["h2d_bw"], figures["d2h_bw"] = copy_bw(dev, (1 << 30) if cuda else (1 << 28))
        elif step == "disk":
            figures["disk_read_bw"], figures["disk_write_bw"], figures["disk_read_cached_bw"] = \
                disk_bw(offload_dir, (1 << 30) if cuda else (1 << 28), notes)
        elif step == "layer dispatch":
            try:
                figures["layer_overhead_s"] = _layer_overhead(dev)
            except Exception as e:  # the model API moved on: keep the profile, say so, assume 0.1 ms
                figures["layer_overhead_s"] = 1e-4
                notes.append(f"layer dispatch not measured ({type(e).__name__}: {str(e)[:80]}); assumed 0.1 ms")
    if load > 0.5 * (os.cpu_count() or 1):
        notes.append(f"load average {load:.1f} on {os.cpu_count()} cores when measuring started: other jobs ran, so "
                     "these figures may be low; re-measure on a quiet machine with `tidal plan --profile`")
    if not cuda:  # the device is this CPU
        figures["cpu_matmul_flops"] = dict(figures["matmul_flops"])
        figures["cpu_attn_bw"] = figures["attn_bw"]
    name = torch.cuda.get_device_name(dev) if cuda else _cpu_name()
    return HardwareProfile(
        device=str(dev), device_name=name, unified_memory=not cuda, **figures,
        device_capacity=free_device_memory(str(dev)), host_capacity=free_host_memory(),
        disk_capacity=disk_free(offload_dir or tempfile.gettempdir()), threads=torch.get_num_threads(),
        notes=notes, measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hostname=socket.gethostname(), torch_version=torch.__version__)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()
