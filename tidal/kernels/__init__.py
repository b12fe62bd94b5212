"""One backend interface over the ops that differ by device.

Owns: `get_backend(device)`, which returns an object with the ops layers call
(`write_kv`, `paged_attention`, `pack_linear` / `linear`,
`quant_linear_paths` / `pack_quant_linear` / `quant_linear`); the KV caches are plain tensors or
kv/quant_cache.QuantKVCache (--kv-quant), and every op takes both; a cache on another device
than q (the policy's host share of the KV under a GPU model) goes through kernels/host_kv.py.
Layers never branch on cpu vs cuda; this is the only place that does. Triton kernels for CUDA
plug in here (kernels/triton/), falling back to the torch reference ops in torch_ops.py.
Must not: import model, engine or server code.
"""
from __future__ import annotations

import os

import torch

from tidal.kernels import host_kv, quant_ops, torch_ops
from tidal.kv.quant_cache import QuantKVCache

# a prepacked bf16 linear that still has its plain weight (the LM head: layers drop theirs when packed) takes
# the CPU kernels' bf16_gemv (rows_gemv.cpp) at up to this many rows: SmolLM2's head 2.41 -> 1.55 ms at
# one row, 1.93 -> 1.72 at 4, 2.7x slower than oneDNN at 6
BF16_GEMV_MAX_ROWS = 4


class TorchBackend:
    name = "torch"
    rms_norm = staticmethod(torch_ops.rms_norm)
    rotary = staticmethod(torch_ops.rotary)
    silu_and_mul = staticmethod(torch_ops.silu_and_mul)

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        if k_cache.device != k.device:  # a host-resident cache under a GPU model (kernels/host_kv.py)
            return host_kv.write_kv(get_backend("cpu"), k, v, k_cache, v_cache, slot_mapping)
        return torch_ops.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def pack_linear(self, weight: torch.Tensor):
        """A backend-specific layout of a linear weight for faster matmuls, or None."""
        return None

    def linear(self, x, weight, bias, packed=None):
        return torch.nn.functional.linear(x, weight, bias)

    def quant_linear_paths(self, qw) -> tuple[str, ...]:
        """Packed-kernel matmul paths that run QuantizedWeight `qw` here, best first. None listed:
        the layer dequantizes into a float buffer instead ("dequant"), which runs anywhere."""
        return ()

    def pack_quant_linear(self, qw, path: str, act_scale=None):
        raise ValueError(f"the {self.name} backend has no quantized matmul path '{path}'")

    def quant_linear(self, x, path: str, packed):
        """x [rows, in] times the weight `pack_quant_linear` packed for `path`; no bias."""
        raise ValueError(f"the {self.name} backend has no quantized matmul path '{path}'")

    def paged_attention(self, q, k_cache, v_cache, meta, scale):
        if k_cache.device != q.device:
            return host_kv.paged_attention(get_backend("cpu"), q, k_cache, v_cache, meta, scale)
        return torch_ops.paged_attention(q, k_cache, v_cache, meta, scale)


class CpuBackend(TorchBackend):
    """Torch ops, with decode attention from the compiled CPU kernel once it is built
    (it reads K/V straight from the paged cache instead of gathering a padded copy)."""
    name = "cpu"

    def __init__(self):
        from tidal.kernels import cpu
        self._cpu = cpu
        if os.environ.get("TIDAL_CPU_KERNELS", "1") == "sync":
            cpu.load()
        else:
            cpu.load_in_background()

    def pack_linear(self, weight: torch.Tensor):
        # oneDNN's blocked layout: bf16 matmuls 2x faster at one row, 10-20% at 64 (measured here)
        if weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() \
                or os.environ.get("TIDAL_PACK_LINEAR", "1") == "0":
            return None
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        except (RuntimeError, AttributeError):
            return None

    def linear(self, x, weight, bias, packed=None):
        if packed is None:
            return torch.nn.functional.linear(x, weight, bias)
        if x.dim() == 2 and x.shape[0] <= BF16_GEMV_MAX_ROWS and weight.numel():
            ext = self._cpu.ready()
            if ext is not None:   # decode rows: tidal's GEMV reads the bf16 weight at ~36 GB/s, oneDNN at ~25
                y = ext.bf16_gemv(x.contiguous(), weight)
                return y if bias is None else y + bias
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        ext = self._cpu.ready()
        if ext is not None and isinstance(k_cache, QuantKVCache) and k_cache.scale.dtype == torch.float16 \
                and k_cache.device == k.device:  # one C++ call instead of ~20 torch ops (kv_quant_ops.cpp)
            return ext.kv_quant_write(k, v, list(k_cache.parts()), list(v_cache.parts()), slot_mapping,
                                      k_cache.bits, k_cache.group_size)
        return super().write_kv(k, v, k_cache, v_cache, slot_mapping)

    # one pass each instead of torch's 5-9 ops (kernels/cpu/fused_ops.cpp, rms_norm.cpp): several ms
    # of a decode step. The norm is bit-identical to torch_ops.rms_norm (ATen's summation order).
    def rms_norm(self, x, residual, weight, eps):
        ext = self._cpu.ready()
        if ext is None or not x.is_contiguous() or weight.dtype != x.dtype or not weight.is_contiguous() \
                or (residual is not None and not residual.is_contiguous()):
            return torch_ops.rms_norm(x, residual, weight, eps)
        if residual is None:
            return ext.add_rms_norm(x, None, weight, eps)
        return ext.add_rms_norm(x, residual, weight, eps), residual

    def rotary(self, q, k, cos, sin, positions):
        ext = self._cpu.ready()
        if ext is None or q.stride(-2) != q.shape[-1] or k.stride(-2) != k.shape[-1]:
            return torch_ops.rotary(q, k, cos, sin, positions)
        ext.rotary_(q, k, cos, sin, positions)
        return q, k

    def silu_and_mul(self, gate_up):
        ext = self._cpu.ready()
        if ext is None or not gate_up.is_contiguous():
            return torch_ops.silu_and_mul(gate_up)
        return ext.silu_and_mul(gate_up)

    # torch's int4/int8 weight-packed CPU kernels (kernels/quant_ops.py)
    quant_linear_paths = staticmethod(quant_ops.cpu_paths)
    pack_quant_linear = staticmethod(quant_ops.pack)
    quant_linear = staticmethod(quant_ops.matmul)

    def paged_attention(self, q, k_cache, v_cache, meta, scale):
        ext = self._cpu.ready()
        decode = prefill = None
        if isinstance(k_cache, QuantKVCache):
            if ext is not None and k_cache.scale.dtype == torch.float16:
                kernel, bits, group = torch.ops.tidal_kv.paged_decode_quant, k_cache.bits, k_cache.group_size

                def decode(q_dec, block_tables, seq_lens, max_seq_len):
                    return kernel(q_dec, *k_cache.parts(), *v_cache.parts(), block_tables, seq_lens, scale,
                                  bits, group)

                def prefill(q_seq, block_table, seq_len):
                    """The context's blocks dequantized to bf16 (kv_quant_ops.cpp), then the bf16 kernel
                    over them as a small paged cache; None (the torch path) for a float32 model."""
                    if q_seq.dtype != torch.bfloat16:
                        return None
                    ids = block_table[:(seq_len + k_cache.shape[1] - 1) // k_cache.shape[1]]
                    k, v = (ext.kv_dequant_blocks(*c.parts(), ids, bits, group, True) for c in (k_cache, v_cache))
                    return ext.prefill_attention_bf16(q_seq, k, v, torch.arange(len(ids)), seq_len, scale)
        elif ext is not None:
            def decode(q_dec, block_tables, seq_lens, max_seq_len):
                return ext.paged_decode_attention(q_dec, k_cache, v_cache, block_tables, seq_lens, scale)

            def prefill(q_seq, block_table, seq_len):  # None where the kernel does not apply
                return ext.prefill_attention_bf16(q_seq, k_cache, v_cache, block_table, seq_len, scale)
        return torch_ops.paged_attention(q, k_cache, v_cache, meta, scale, decode=decode, prefill=prefill)


_BACKENDS: dict[str, object] = {}


def get_backend(device: torch.device | str):
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        _BACKENDS[kind] = CpuBackend() if kind == "cpu" else TorchBackend()
    return _BACKENDS[kind]
