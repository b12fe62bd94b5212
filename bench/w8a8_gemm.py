"""`--quant w8a8`'s two CPU kernels side by side on SmolLM2's layer shapes, by row count: oneDNN's int8
GEMM on the [out, in] weight (`w8a8_linear`) and tidal's own VNNI GEMM on packed panels (`w8a8_vnni`).

Owns: nothing the engine uses. quant_ops picks the VNNI kernel where the kernels have AVX-512 VNNI and
the CPU has no AMX; on a CPU with AMX (oneDNN then runs on its tiles) this says whether that choice
should change, and from how many rows. Each timing cycles through 30 layers' distinct weights (as a
decode step sees them: from memory, not cache), bf16 activations, smoothed; median of --repeats.

    python bench/w8a8_gemm.py [--rows 1,4,8,16,32,64,128,1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from tidal.kernels import cpu, quant_ops

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))   # SmolLM2: qkv, o, gate_up, down ([out, in])
LAYERS = 30


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16,32,64,128,1024")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    ext = cpu.load()
    if ext is None or not ext.w8a8_vnni_supported() or not quant_ops._has_int_mm():
        raise SystemExit("needs the CPU kernels built with AVX-512 VNNI and torch's CPU int8 GEMM")
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layer = []
        for n, k in SHAPES:
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            layer.append((w, *ext.w8a8_vnni_pack(w), torch.rand(n, generator=g) * 0.01, torch.rand(k, generator=g) + 0.5))
        layers.append(layer)
    print(f"CPU: {cpu_model()}; AMX usable: {quant_ops._amx()}; threads: {torch.get_num_threads()}")
    print(f"{'rows':>6} {'oneDNN ms':>10} {'VNNI ms':>9} {'speed-up':>9} {'VNNI GOPS':>10}")
    for m in (int(r) for r in a.rows.split(",")):
        xs = {k: (torch.randn(m, k, generator=g) * 3).bfloat16() for k in {k for _, k in SHAPES}}

        def onednn():
            for layer in layers:
                for (w, _, _, s, sm), (_, k) in zip(layer, SHAPES):
                    ext.w8a8_linear(xs[k], w, s, None, sm)

        def vnni():
            for layer in layers:
                for (_, p, c, s, sm), (_, k) in zip(layer, SHAPES):
                    ext.w8a8_vnni(xs[k], p, c, s, None, sm)

        times = {}
        for name, f in (("onednn", onednn), ("vnni", vnni)):
            f()
            runs = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                f()
                runs.append(time.perf_counter() - t0)
            times[name] = statistics.median(runs)
        ops = 2 * m * sum(n * k for n, k in SHAPES) * LAYERS
        print(f"{m:>6} {times['onednn'] * 1e3:>10.2f} {times['vnni'] * 1e3:>9.2f} "
              f"{times['onednn'] / times['vnni']:>8.2f}x {ops / times['vnni'] / 1e9:>10.0f}")


if __name__ == "__main__":
    main()
