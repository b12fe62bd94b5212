"""torch's packed CPU matmul kernels for group-wise quantized weights (weights/quant.py's layout).

Owns: which QuantizedWeights each kernel can run (`cpu_paths`), repacking one into a kernel's layout
(`pack`, an opaque tuple the caller keeps), and the matmul on that layout (`matmul`):
- "int4vnni": tidal's own kernels (kernels/cpu/int4_linear.cpp) on weights/quant.py's layout as it is;
  int4, group 32, in % 64 == 0, where the CPU kernels are built with AVX-512 VNNI. Up to GEMV_MAX_ROWS
  rows (decode) the int4 GEMV reads the packed bytes; bigger batches (prefill) dequantize into a
  scratch buffer shared by every layer and run the float GEMM, which beats every packed int4 kernel
  at hundreds of rows. Chosen only when the kernels are loaded when the layer is built (a first run
  that builds them in the background keeps "int4pack" for that process).
- "int8vnni": the same for int8 in groups of 32 (`--quant-head int8`: GGUF Q8_0's grid).
- "int4pack": `_weight_int4pack_mm_for_cpu`; int4, group 32/64/128/256, out % 16 == 0.
- "int8pack": int8 with one group per row (--quant int8). With the CPU kernels built, up to
  INT8_GEMV_MAX_ROWS rows run tidal's GEMV on the stored bytes (`int8_rows_gemv`, fp32 math) and bigger
  batches dequantize into the shared buffer (`int8_rows_dequant`) for the float GEMM; before they are
  built, torch's `_weight_int8pack_mm`.
- "w8a8" (--quant w8a8 only; never picked for --quant int8, since it also rounds the activations):
  int8 with one group per row, activations rounded to int8 per token (symmetric), oneDNN's int8 GEMM
  (`torch._int_mm`: 2x bf16's multiply rate on AVX-512 VNNI), then the per-row and per-token scales.
  kernels/cpu/w8a8_linear.cpp fuses the rounding and the rescale (1.5-1.75x the bf16 matmul at 64+
  rows on SmolLM2's shapes, ~2.5x at one row); before the kernels are built the same arithmetic runs in torch ops.
  Where the kernels are built with AVX-512 VNNI and the CPU has no AMX (whose int8 tiles oneDNN would
  use), the weight is packed once into tidal's own VNNI GEMM's layout instead (`w8a8_vnni`): oneDNN
  reorders the weight on every call, so this is 1.7-2.6x faster at decode's 4-64 rows and 1.15x at
  1,024 on SmolLM2's layers. TIDAL_W8A8_ONEDNN=1 keeps oneDNN, for comparisons. As for int4vnni, the
  choice is made when the layer is built: a process whose kernels were still building keeps oneDNN.
  An optional per-input-channel activation scale (SmoothQuant, model/smooth.py) is applied while rounding.
Both run in bf16: their fp32 code is 10-30x slower (scalar), so fp32 inputs are cast to bf16 and
the result back; the activations lose bf16 rounding, far below int4/int8 weight error.
Also `scratch`: the one float buffer per (dtype, device) that every dequantizing matmul writes a
weight into (the vnni paths' big batches here, and QuantLinear's "dequant" fallback), so the
float copy exists once, not once per layer or per path.
Must not: pick a device (kernels/__init__.py's backends route CPU tensors here), or dequantize through
weights/quant.py (the "dequant" fallback, which every device runs, lives with the layer:
model/layers/quant_linear.py).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from tidal.kernels import cpu as cpu_kernels

_KERNEL_DTYPE = torch.bfloat16
_int4pack_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
_INT4_GROUPS = (32, 64, 128, 256)
GEMV_MAX_ROWS = 16   # int4vnni: batches up to this many rows take the GEMV, bigger ones dequantize + GEMM
# (measured on SmolLM2's shapes: the GEMV is 1.4-1.6x faster at 16 rows, even at 24, 1.2-1.6x slower at 32+)
INT8_GEMV_MAX_ROWS = 6   # int8pack: batches up to this many rows take int8_rows_gemv (fp32 math, whose cost
# grows with the rows), bigger ones dequantize + GEMM. SmolLM2's 30 layers: 5.5 / 9.6 / 20.0 ms at 1 / 4 / 6
# rows against 24.1 / 21.6 / 21.4 for dequantize + GEMM, 23.7 against 21.1 at 8 (torch's int8 kernel: 10.9,
# 14.8, 23.8, 26.5; 40.7 at 16)
_scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A [rows, cols] view of the shared dequantize buffer for (dtype, device), grown as needed."""
    key, numel = (dtype, torch.device(device)), rows * cols
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):   # a normal tensor: writable inside and outside inference mode
            buf = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(rows, cols)


def _vnni_kernels():
    ext = cpu_kernels.ready()
    return ext if ext is not None and ext.int4_gemv_supported() else None


def cpu_paths(qw) -> tuple[str, ...]:
    """The packed-kernel paths that can run `qw` (a QuantizedWeight) on CPU, best first."""
    out_features, in_features = qw.shape
    paths = ()
    if qw.group_size == 32 and in_features % 64 == 0 and _vnni_kernels() is not None:
        paths = (f"int{qw.bits}vnni",)
    if qw.bits == 4 and qw.group_size in _INT4_GROUPS and out_features % 16 == 0:
        return paths + ("int4pack",)
    if paths:
        return paths
    if qw.bits == 8 and qw.group_size == in_features:
        return ("int8pack", "w8a8") if _has_int_mm() else ("int8pack",)
    return ()


@functools.cache
def _has_int_mm() -> bool:
    """Whether this torch has the CPU int8 x int8 -> int32 GEMM ("w8a8")."""
    try:
        torch._int_mm(torch.zeros(17, 8, dtype=torch.int8), torch.zeros(8, 8, dtype=torch.int8))
        return True
    except (RuntimeError, AttributeError):
        return False


def pack(qw, path: str, act_scale: torch.Tensor | None = None) -> tuple:
    """`act_scale` ("w8a8" only): a per-input-channel factor the activations are multiplied by before
    they are rounded (SmoothQuant's 1 / s, model/smooth.py; the weight's columns already carry s)."""
    out_features, in_features = qw.shape
    if act_scale is not None and path != "w8a8":
        raise ValueError(f"an activation scale only applies to the w8a8 path, not '{path}'")
    if path in ("int4vnni", "int8vnni"):
        return _vnni_kernels(), qw.qdata.contiguous(), qw.scale.half().contiguous(), qw.min.half().contiguous()
    if path == "int4pack":
        q = qw.unpacked().reshape(out_features, in_features).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        # torch's kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale; [in / g, out, 2]
        scale, mn = qw.scale.float(), qw.min.float()
        sz = torch.stack([scale, mn + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        return packed, sz.to(_KERNEL_DTYPE), qw.group_size
    if path == "w8a8":
        # signed bytes: w = (q - 128) * scale + (min + 128 * scale); the second term is 0 for --quant
        # w8a8's symmetric rows, and is then left out. (weight, comp, scale, zero, smooth): comp is None
        # for oneDNN's [out, in] weight, else the weight is in w8a8_vnni's panels (w8a8_linear.cpp)
        qint8 = (qw.qdata.to(torch.int16) - 128).to(torch.int8).contiguous()
        scale, mn = qw.scale.float().view(-1), qw.min.float().view(-1)
        zero = mn + 128 * scale
        smooth = None if act_scale is None else act_scale.float().contiguous()
        weight, comp = qint8, None
        ext = _w8a8_vnni_kernels()
        if ext is not None and qint8.device.type == "cpu":
            weight, comp = ext.w8a8_vnni_pack(qint8)
        return weight, comp, scale.contiguous(), zero if bool(zero.any()) else None, smooth
    if path == "int8pack":
        # the kernel is symmetric (w = q * scale); our q is unsigned with a min, so shift q by 128 and
        # add the remainder, x . (min + 128 * scale) per output, after the matmul
        # (the fp32 scale too: big batches dequantize with it, exactly in an fp32 model)
        qint8 = (qw.qdata.to(torch.int16) - 128).to(torch.int8)
        scale, mn = qw.scale.float().view(-1), qw.min.float().view(-1)
        return qint8, scale.to(_KERNEL_DTYPE), mn + 128 * scale, scale.contiguous()
    raise ValueError(f"no CPU quantized matmul path '{path}'")


def matmul(x: torch.Tensor, path: str, packed: tuple) -> torch.Tensor:
    """x [rows, in] @ the packed weight's transpose -> [rows, out] in x's dtype (no bias)."""
    if path in ("int4vnni", "int8vnni"):
        ext, q, scale, mn = packed
        int4 = path == "int4vnni"
        if x.shape[0] <= GEMV_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
            return (ext.int4_gemv if int4 else ext.int8_gemv)(x.contiguous(), q, scale, mn)
        out = scratch(q.shape[0], q.shape[1] * (2 if int4 else 1), x.dtype)
        return F.linear(x, (ext.int4_dequant if int4 else ext.int8_dequant)(q, scale, mn, out))
    if path == "w8a8":
        return _w8a8(x, *packed)
    if path == "int4pack":
        weight, scales_and_zeros, group_size = packed
        if x.dtype == _KERNEL_DTYPE:   # the bf16 model's case: no casts (each costs a dispatch at decode)
            return _int4pack_mm(x, weight, group_size, scales_and_zeros)
        return _int4pack_mm(x.to(_KERNEL_DTYPE), weight, group_size, scales_and_zeros).to(x.dtype)
    qint8, scale, zero, scale32 = packed
    ext = cpu_kernels.ready()
    if ext is not None and x.dtype in (torch.float32, torch.bfloat16):
        if x.shape[0] <= INT8_GEMV_MAX_ROWS:
            # a few rows: tidal's GEMV on the stored bytes, fp32 math (2x torch's int8 kernel at one row)
            return ext.int8_rows_gemv(x.contiguous(), qint8, scale32, zero)
        # more: dequantize into the shared buffer and run the float GEMM (1.25-1.65x torch's int8 kernel
        # at 8-16 rows, 2.2-3.9x at 64-512 on SmolLM2's shapes)
        out = scratch(qint8.shape[0], qint8.shape[1], x.dtype)
        ext.int8_rows_dequant(qint8, scale32, zero, out)
        return F.linear(x, out)
    y = torch.ops.aten._weight_int8pack_mm(x.to(_KERNEL_DTYPE), qint8, scale)
    return torch.addr(y.float(), x.float().sum(-1), zero).to(x.dtype)


@functools.cache
def _amx() -> bool:
    """Whether this CPU has AMX tiles the OS lets us use (oneDNN's int8 GEMM then runs on them)."""
    init = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init()) if init is not None else False


def _w8a8_vnni_kernels():
    """The extension where w8a8 weights get packed for its own VNNI GEMM, else None (oneDNN's path)."""
    ext = cpu_kernels.ready()
    if ext is None or not ext.w8a8_vnni_supported():
        return None
    return None if _amx() or os.environ.get("TIDAL_W8A8_ONEDNN", "0") == "1" else ext


def w8a8_layout() -> str:
    """The layout `pack` gives a w8a8 weight in this process ("vnni48" panels or "rows"): part of the
    identity of an offload store, which keeps packed layers on disk."""
    return "vnni48" if _w8a8_vnni_kernels() is not None else "rows"


def _unpack_vnni(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """w8a8_vnni_pack's panels [out/48, in/4, 48 * 4] (padded) -> the int8 [out, in] weight."""
    p, kg, panel_bytes = packed.shape
    cols = panel_bytes // 4
    full = packed.view(p, kg, cols, 4).permute(0, 2, 1, 3).reshape(p * cols, kg * 4)
    return full[:out_features, :in_features].contiguous()


def _w8a8(x: torch.Tensor, weight: torch.Tensor, comp: torch.Tensor | None, scale: torch.Tensor,
          zero: torch.Tensor | None, smooth: torch.Tensor | None) -> torch.Tensor:
    ext = cpu_kernels.ready()
    if ext is not None and comp is not None:   # (fp16 and others through fp32, rather than unpacking the weight)
        if x.dtype in (torch.float32, torch.bfloat16):
            return ext.w8a8_vnni(x.contiguous(), weight, comp, scale, zero, smooth)
        return ext.w8a8_vnni(x.float().contiguous(), weight, comp, scale, zero, smooth).to(x.dtype)
    if ext is not None and x.dtype in (torch.float32, torch.bfloat16):
        return ext.w8a8_linear(x.contiguous(), weight, scale, zero, smooth)
    qint8 = weight if comp is None else _unpack_vnni(weight, scale.numel(), x.shape[-1])
    xf = x.float()   # the same arithmetic in torch ops (kernels not built yet, or another dtype)
    if smooth is not None:
        xf = xf * smooth
    step = xf.abs().amax(-1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    # times 1 / step, as the kernel rounds, so both land on the same side of a .5 tie
    y = torch._int_mm(torch.round(xf * (1 / step)).to(torch.int8), qint8.t()).float() * step * scale
    if zero is not None:
        y += xf.sum(-1, keepdim=True) * zero
    return y.to(x.dtype)
