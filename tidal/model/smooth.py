"""SmoothQuant for --quant w8a8: move the activations' outlier channels into the weights before both are rounded.

A few input channels of a layer carry activations tens of times larger than the rest, so rounding a
token's activations to int8 with one step (max|x| / 127) wipes out its small channels. With a factor
s per input channel, x @ W.T = (x / s) @ (W * s).T: dividing the outlier channels down and
multiplying the same weight columns up balances the two roundings (Xiao et al., SmoothQuant, 2023).
s = max|x|^alpha / max|w|^(1 - alpha), with max|x| measured on calibration text.

Owns: the calibration text (docstrings of Python's standard library: never the perplexity evaluation's
`pydoc_data.topics`), `activation_maxima` (one prefill of it through the float model on a scratch paged
cache, recording max |x| per input channel of every Linear / MergedLinear), and `smoothing_factors`.
model/quantize.py multiplies each weight's columns by s before rounding; the w8a8 kernel multiplies
the activations by 1 / s while it rounds them (kernels/quant_ops.py).
Only a model held whole is smoothed (engine/model_runner.py calibrates it before quantize_model); with
offloaded weights, whose layers are quantized one at a time as they load, w8a8 rounds without smoothing.
Must not: quantize (model/quantize.py does), or load a tokenizer or know the engine (the runner passes ids).
"""
from __future__ import annotations

import torch
from torch import nn

from tidal.kernels.metadata import AttentionMetadata, forward_context
from tidal.model.layers.attention import Attention
from tidal.model.layers.linear import Linear
from tidal.weights.quant import dequantize

ALPHA = 0.5            # SmoothQuant's default: the rounding error split evenly between activations and weights
CALIBRATION_TOKENS = 1024
_BLOCK = 16


def calibration_text() -> str:
    """Plain English about programming, fixed by the Python version: the docstrings of a few standard modules."""
    import argparse
    import collections
    import inspect
    import json
    import logging
    import textwrap
    import unittest
    return "\n\n".join(inspect.getdoc(m) or "" for m in
                       (collections, json, argparse, textwrap, inspect, logging, unittest))


@torch.inference_mode()
def activation_maxima(model: nn.Module, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """{Linear's module name: max |input| per input channel (fp32 [in])} over one prefill of `token_ids`.
    A weight still held as it arrived quantized (a `tidal quantize` directory) is dequantized into its
    layer first: the model must run in floats, and smoothing rounds every weight again anyway."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    attn = sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda a: a.layer_idx)
    n = len(token_ids)
    blocks = -(-n // _BLOCK)
    caches = [(torch.zeros(blocks, _BLOCK, a.num_kv_heads, a.head_dim, device=device, dtype=dtype),
               torch.zeros(blocks, _BLOCK, a.num_kv_heads, a.head_dim, device=device, dtype=dtype)) for a in attn]
    i64 = dict(dtype=torch.int64, device=device)
    meta = AttentionMetadata(slot_mapping=torch.arange(n, **i64), block_tables=torch.arange(blocks, **i64)[None],
                             seq_lens=torch.tensor([n], **i64), query_start_loc=torch.tensor([0, n], **i64),
                             query_lens_list=[n], seq_lens_list=[n], max_query_len=n, max_seq_len=n,
                             block_size=_BLOCK)
    maxima: dict[str, torch.Tensor] = {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for m in linears.values():
        qw = m.take_quantized()
        if qw is not None:
            dequantize(qw, m.weight.dtype, out=m.weight.data)

    def observing(name, forward):
        def observed(x):
            seen = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen
            return forward(x)
        return observed

    for name, m in linears.items():
        m.forward = observing(name, m.forward)   # layers call .forward directly, so hooks would not fire
    try:
        with forward_context(meta, caches):
            model(torch.tensor(token_ids, **i64), torch.arange(n, **i64))
    finally:
        for m in linears.values():
            del m.forward
    return maxima


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s per input channel (fp32 [in]) for a weight [out, in] whose inputs reached `act_max`."""
    w_max = weight.float().abs().amax(0).clamp(min=1e-5)
    s = act_max.float().clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)
    return s.clamp(min=1e-5)
