"""Quantize a loaded tidal model's linear layers in place (gpt-fast style: a separate step after load).

Owns: `quantize_model`, which swaps every `Linear` / `MergedLinear` for a `QuantLinear` and leaves
embeddings, the LM head and norms alone (they stay in the model dtype); `quantize_head` (--quant-head
int8 / int4: the LM head gets a group-wise copy; at batch-1 decode SmolLM2's bf16 head is ~2 ms of a
~6-8 ms int4 step; int8 is Q8_0's grid, lossless for SmolLM2's GGUF, int4 costs +5.5% perplexity; w8a8 is
per row on the "w8a8" path, for batches; opt-in); --quant w8a8 (int8 per row, symmetric, and every matmul
rounds its activations to int8 per token: path "w8a8", which `quantize_model` names for each layer;
given activation maxima, each layer is smoothed first, model/smooth.py); a
layer whose weight arrived already quantized in the asked format (GGUF Q4_1, a `tidal quantize`
directory) keeps those bits. Also `resolve_quantization` (--quant against what a checkpoint holds)
and `check_group_sizes`.
Must not: load weights (run it after `load_weights`: a QuantLinear has no weight_loader), or pick
matmul kernels (QuantLinear does, per layer).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from tidal.errors import TidalError
from tidal.model.layers.linear import Linear, MergedLinear
from tidal.model.layers.quant_linear import QuantLinear, fitting_paths
from tidal.model.smooth import smoothing_factors
from tidal.weights.quant import check_group_size, dequantize, quantize

# int4 in groups of 32: GGUF Q4_1's grid, so re-quantizing the default model (smollm2, Q4_1) from fp32
# gives its weights back exactly; groups of 64 compound a second rounding (SmolLM2: top-1 agreement
# with fp32 97% at 32 vs 69% at 64), for 0.5 bit a weight less and the same kernel speed.
# int8 per row runs torch's int8 kernel; int8 in groups could only take the dequantize path, 5-10x
# slower at decode.
DEFAULT_GROUP_SIZE = {4: 32, 8: None}
_BITS = {"int8": 8, "int4": 4, "w8a8": 8}
W8A8_PATH = "w8a8"   # QuantLinear's path for --quant w8a8 (kernels/quant_ops.py)


def resolve_quantization(quant: str, stored: dict | None) -> tuple[int, int | None] | None:
    """(bits, group size or None for one group per row) to quantize to, or None for none.

    `quant` is the --quant flag; `stored` a checkpoint's own quantization ({"bits", "group_size"}),
    which wins: --quant may be left out (none) or repeat it, but not ask for another format."""
    if stored is not None:
        bits, group_size = stored["bits"], stored["group_size"]
        same = ("none", f"int{bits}") + (("w8a8",) if (bits, group_size) == (8, None) else ())
        if quant not in same:
            raise TidalError(f"--quant {quant} conflicts with the checkpoint, which is already quantized to "
                             f"int{bits} (group size {group_size or 'per row'}); leave --quant out, or quantize "
                             "the original checkpoint again with `tidal quantize`", param="quant")
        return bits, group_size
    if quant == "none":
        return None
    if quant not in _BITS:
        raise TidalError(f"--quant {quant} is not supported; use int8, int4 or w8a8", param="quant")
    return _BITS[quant], DEFAULT_GROUP_SIZE[_BITS[quant]]


def check_group_sizes(model: nn.Module, bits: int, group_size: int | None = 0) -> int | None:
    """Check that every linear layer can take (bits, group_size); returns the group size with 0
    replaced by the default for `bits`. Works on a model built on the meta device."""
    if bits not in (4, 8):
        raise TidalError(f"--quant int{bits} is not supported; use int8 or int4", param="quant")
    if group_size == 0:
        group_size = DEFAULT_GROUP_SIZE[bits]
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            try:
                check_group_size(m.in_features, group_size or m.in_features)
            except ValueError as e:
                raise TidalError(f"cannot quantize {name}: {e}", param="quant") from None
    return group_size


@contextmanager
def _one_thread():
    """Small elementwise ops: on busy cores each OpenMP region stalls for milliseconds (SmolLM2 quantized
    on 2 busy cores: 0.9 s on one thread, 5.8 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quantize_model(model: nn.Module, bits: int, group_size: int | None = 0,
                   scale_dtype: torch.dtype = torch.float16, dense_min_rows: int | None = None,
                   w8a8: bool = False, act_maxima: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Replace the model's Linear/MergedLinear modules by QuantLinear; returns {module name: matmul path}.

    `group_size`: 0 picks the default for `bits` (int4: 32, int8: one group per row); None is one
    group per row. `dense_min_rows`: see QuantLinear (trades memory for prefill speed).
    `w8a8` (--quant w8a8; int8 per row): weights rounded symmetric per row, and every matmul also
    rounds its activations to int8 per token (path "w8a8"); refused where no backend runs it.
    `act_maxima` (w8a8 only; model/smooth.py's `activation_maxima`): each named layer is smoothed first.
    """
    # check them all before changing any, so a bad size leaves the model whole
    group_size = check_group_sizes(model, bits, group_size)
    path = None
    if w8a8:
        if (bits, group_size) != (8, None):
            raise TidalError("--quant w8a8 needs int8 weights with one scale per row", param="quant")
        path = W8A8_PATH
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    paths = {}
    with _one_thread():
        for name, m in targets:
            qw = m.take_quantized()
            smooth = act_maxima.get(name) if w8a8 and act_maxima else None
            if qw is not None and (smooth is not None or
                                   (qw.bits, qw.group_size) != (bits, group_size or m.in_features)):
                dequantize(qw, m.weight.dtype, out=m.weight.data)  # another format: requantize from floats
                qw = None
            act_scale = None
            if qw is None:
                weight = m.weight.data
                if smooth is not None:
                    s = smoothing_factors(smooth, weight)
                    weight, act_scale = weight.float() * s, 1 / s
                qw = quantize(weight, bits, group_size, scale_dtype, symmetric=w8a8)
            if path is not None and path not in fitting_paths(qw, qw.qdata.device):
                raise TidalError(f"--quant w8a8 has no kernel on {qw.qdata.device} (it runs on CPU: oneDNN's int8 "
                                 "GEMM); use --quant int8 there", param="quant")
            bias = None if m.bias is None else m.bias.data
            out_sizes = m.out_sizes if isinstance(m, MergedLinear) else None
            q = QuantLinear(qw, bias, out_sizes, path=path, dense_min_rows=dense_min_rows, act_scale=act_scale)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
            paths[name] = q.path
    return paths


def quantize_head(model: nn.Module, bits: int | str = 4, group_size: int = 32,
                  scale_dtype: torch.dtype = torch.float16) -> str:
    """Give the LM head a group-wise quantized copy run by a packed kernel (the embedding keeps the float
    rows it looks up; an untied float head is dropped). Returns the head's matmul path.
    int8 is symmetric in groups of 32 (GGUF Q8_0's grid: a Q8_0 head, as in SmolLM2's GGUF, comes back
    exactly) and needs tidal's VNNI kernel (torch's per-row int8 kernel is no faster than the bf16
    head at one row: 4.0 vs 4.4 ms on one thread), so elsewhere it is refused; int4 runs anywhere
    torch's int4 kernel does. "w8a8": int8 per row on the "w8a8" path (SmolLM2's head at 64 rows:
    6.5 ms against 10.0 in bf16; perplexity +1.1% alone), CPU only."""
    from tidal.model.layers.embedding import LMHead
    w8a8 = bits == "w8a8"   # per row, and the activations rounded per token too (quantize_model's w8a8)
    bits = _BITS[bits] if isinstance(bits, str) else bits   # the --quant-head value, or bits
    head = getattr(model, "lm_head", None)
    if not isinstance(head, LMHead):
        raise TidalError("--quant-head: this model has no LM head tidal can quantize", param="quant_head")
    if head.quantized is not None:   # already done (the float weight of an untied head is gone)
        return head.quantized.path
    vocab, dim = head.weight.shape
    try:
        check_group_size(dim, group_size)
    except ValueError as e:
        raise TidalError(f"--quant-head int{bits}: {e}", param="quant_head") from None
    with _one_thread():
        qw = quantize(head.weight.data, bits, None if w8a8 else group_size, scale_dtype, symmetric=bits == 8)
    if w8a8 and W8A8_PATH not in fitting_paths(qw, qw.qdata.device):
        raise TidalError(f"--quant-head w8a8 has no kernel on {qw.qdata.device} (CPU only)", param="quant_head")
    q = QuantLinear(qw, None if head.bias is None else head.bias.data, path=W8A8_PATH if w8a8 else None)
    if q.path == "dequant":   # dequantizing the whole head every step would be slower than the float head
        need = " (int8 needs tidal's CPU kernels built on a CPU with AVX-512 VNNI; int4 runs on torch's kernel)" \
            if bits == 8 else ""
        raise TidalError(f"--quant-head int{bits}: no quantized kernel for the head on {head.weight.device}{need}",
                         param="quant_head")
    head.set_quantized(q)
    return q.path
