"""A Llama-family model's decode step as one C++ call (kernels/cpu/decode_stack.cpp), on CPU with int4 weights
or --quant int8's per-row int8.

Owns: deciding whether a built model can run its decode steps fused (`build_fused_decode`: every layer's
projections on kernels/quant_ops.py's "int4vnni" or "int8pack" path, SiLU MLP, no biases but QKV's,
compiled CPU kernels loaded), handing its weights to the C++ `DecodeStack` once, and `FusedDecode`, which
the model runner calls instead of the model for an all-decode step of at most quant_ops.GEMV_MAX_ROWS
rows (INT8_GEMV_MAX_ROWS with int8 weights: where the layers' own GEMV stops) over plain (unquantized)
KV caches. The C++ stack runs the same kernel code the layers call, in the
same order, so outputs are identical; what it removes is the Python between them (~40 calls a layer)
and all but one OpenMP fork/join a step (SmolLM2 int4: 7.3 -> 4.7 ms a step). `TIDAL_FUSED_DECODE=0`
turns it off.
Must not: allocate or own the KV cache (the runner passes it per step) or change what a layer computes.
"""
from __future__ import annotations

import os

import torch

from tidal.kernels import cpu as cpu_kernels
from tidal.kernels import quant_ops
from tidal.model.layers.quant_linear import QuantLinear


def _weight(linear, bias_ok: bool = False) -> list[torch.Tensor] | None:
    if not isinstance(linear, QuantLinear) or linear.path not in ("int4vnni", "int8pack") \
            or linear.dense_min_rows is not None or (linear.bias is not None and not bias_ok):
        return None
    if linear.path == "int8pack":
        qint8, _, zero, scale32 = linear.packed
        return [qint8, scale32, zero]
    return list(linear.packed[1:])   # (qdata, scale, min); packed[0] is the extension


def build_fused_decode(model) -> "FusedDecode | None":
    """The fused decode step for `model`, or None where it does not apply (the layers then run as usual)."""
    ext = cpu_kernels.ready()
    layers = getattr(model, "layers", None)
    if os.environ.get("TIDAL_FUSED_DECODE", "1") == "0" or ext is None or not hasattr(ext, "DecodeStack") \
            or layers is None or not hasattr(model, "rotary") or len(layers) == 0:
        return None
    first = layers[0].self_attn
    if next(model.parameters()).device.type != "cpu":
        return None
    stack = ext.DecodeStack(first.num_heads, first.num_kv_heads, first.head_dim, float(model.norm.eps),
                            float(first.attn.scale), model.rotary.cos, model.rotary.sin, model.norm.weight)
    int8 = False   # any per-row int8 layer: the stack is then worth it only up to INT8_GEMV_MAX_ROWS rows
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = (_weight(attn.qkv_proj, bias_ok=True), _weight(attn.o_proj), _weight(mlp.gate_up_proj),
                 _weight(mlp.down_proj))
        if any(p is None for p in parts) or not getattr(mlp, "fused_silu", False) \
                or layer.input_layernorm.eps != model.norm.eps or layer.post_attention_layernorm.eps != model.norm.eps:
            return None
        qkv, o, gate_up, down = parts
        int8 = int8 or any(p[0].dtype == torch.int8 for p in parts)
        stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, qkv,
                        attn.qkv_proj.bias, o, gate_up, down)
    if int8 and not ext.int4_gemv_supported():   # DecodeStack's step is built only with AVX-512 VNNI
        return None
    return FusedDecode(model, stack, quant_ops.INT8_GEMV_MAX_ROWS if int8 else quant_ops.GEMV_MAX_ROWS)


class FusedDecode:
    def __init__(self, model, stack, max_rows: int = quant_ops.GEMV_MAX_ROWS):
        self.model, self.stack, self.max_rows = model, stack, max_rows

    def applies(self, meta, kv_caches) -> bool:
        k = kv_caches[0][0]
        return meta.is_all_decode and meta.num_seqs <= self.max_rows and isinstance(k, torch.Tensor) \
            and k.device.type == "cpu"

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_caches) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return self.stack.forward(x, positions, [k for k, _ in kv_caches], [v for _, v in kv_caches],
                                  meta.slot_mapping, meta.block_tables, meta.seq_lens)
