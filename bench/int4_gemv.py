"""tidal's int4 GEMV (kernels/cpu/int4_linear.cpp) against torch's int4 kernel on SmolLM2's matmul shapes,
and what its int8 activations cost in perplexity (docs/performance.md, docs/benchmarks.md session 6).

    python bench/int4_gemv.py               # microseconds per matmul (hot cache), error vs the exact product
    python bench/int4_gemv.py --perplexity  # fp32 / int4 / int4 + int8 or int4 head, every matmul on the GEMV
"""
import argparse
import time

import torch

from tidal.kernels import cpu, quant_ops
from tidal.weights.quant import dequantize, quantize

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}


def _us(f, n=200):
    for _ in range(5):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e6


def micro() -> None:
    ext = cpu.load()
    assert ext is not None and ext.int4_gemv_supported(), "needs the CPU kernels built with AVX-512 VNNI"
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        qw = quantize(torch.randn(n, k) * 0.05, 4, 32)
        exact_w = dequantize(qw, torch.float32)
        q, s, m = qw.qdata, qw.scale.half(), qw.min.half()
        packed = quant_ops.pack(qw, "int4pack")
        for rows in (1, 4):
            x = torch.randn(rows, k).bfloat16()
            exact = x.float() @ exact_w.T
            err = lambda y: ((y.float() - exact).norm() / exact.norm()).item()  # noqa: E731
            ours, theirs = ext.int4_gemv(x, q, s, m), quant_ops.matmul(x, "int4pack", packed)
            print(f"{name:8s} [{n}x{k}] rows {rows}: int4vnni {_us(lambda: ext.int4_gemv(x, q, s, m)):7.1f} us "
                  f"(err {err(ours):.4f}), int4pack {_us(lambda: quant_ops.matmul(x, 'int4pack', packed)):7.1f} us "
                  f"(err {err(theirs):.4f})")


def perplexity() -> None:
    from tidal.eval.perplexity import evaluate
    cpu.load()
    quant_ops.GEMV_MAX_ROWS = 10 ** 9   # prefill rows too: the decode path's numerics on every token
    configs = {"fp32": {}, "int4 weights": {"quant": "int4"}, "int8 head": {"quant_head": "int8"},
               "int4 + int8 head": {"quant": "int4", "quant_head": "int8"},
               "int4 + int4 head": {"quant": "int4", "quant_head": "int4"}}
    evaluate("smollm2", n_tokens=4096, chunk=1024, configs=configs)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perplexity", action="store_true")
    perplexity() if ap.parse_args().perplexity else micro()
