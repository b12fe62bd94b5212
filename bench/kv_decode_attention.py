"""Micro-benchmark: CPU paged decode attention over a bf16 KV cache vs an int8 / int4 one (--kv-quant).

Owns: timing `get_backend("cpu").paged_attention` on one all-decode batch (default SmolLM2's shape:
B=64 sequences of 450 tokens, 9 query heads, 3 KV heads, head_dim 64, block size 16, scattered
blocks). Each call walks `--layers` separate caches, as a forward pass does, so the KV is read from
memory rather than from a warm L3. Prints one table; `--json PATH` writes a record.
Must not: change kernels or the engine; it only calls them.

    python bench/kv_decode_attention.py [--threads 2] [--layers 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

os.environ.setdefault("TIDAL_CPU_KERNELS", "sync")
from tidal.kernels import cpu, get_backend  # noqa: E402
from tidal.kernels.metadata import AttentionMetadata  # noqa: E402
from tidal.kernels.torch_ops import write_kv  # noqa: E402
from tidal.kv.quant_cache import allocate_kv_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=450)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args()
    if cpu.load() is None:
        raise SystemExit("the CPU kernels did not build (see stderr); this benchmark measures them")
    torch.set_num_threads(a.threads)
    b, L, bs, d = a.batch, a.seq, a.block_size, a.head_dim
    per_seq = (L + bs - 1) // bs
    g = torch.Generator().manual_seed(0)
    tables = torch.randperm(b * per_seq, generator=g).view(b, per_seq)
    slots = (tables[:, :, None] * bs + torch.arange(bs)).view(b, -1)[:, :L].reshape(-1)
    k, v = torch.randn(b * L, a.kv_heads, d, generator=g), torch.randn(b * L, a.kv_heads, d, generator=g)
    q = torch.randn(b, a.heads, d, generator=g, dtype=torch.float32).to(torch.bfloat16)
    meta = AttentionMetadata(slot_mapping=slots[:b], block_tables=tables, seq_lens=torch.full((b,), L),
                             query_start_loc=torch.arange(b + 1), query_lens_list=[1] * b, seq_lens_list=[L] * b,
                             max_query_len=1, max_seq_len=L, block_size=bs)
    backend, caches = get_backend("cpu"), {}
    for kv_quant in ("none", "int8", "int4"):
        caches[kv_quant] = []
        for _ in range(a.layers):
            kc, vc = allocate_kv_cache(b * per_seq, bs, a.kv_heads, d, torch.bfloat16, torch.device("cpu"), kv_quant)
            write_kv(k, v, kc, vc, slots)
            caches[kv_quant].append((kc, vc))
    times = {name: [] for name in caches}
    for _ in range(a.repeats + 1):  # interleaved, so load from other processes hits all alike; first round warms up
        for name, layers in caches.items():
            t0 = time.perf_counter()
            for kc, vc in layers:
                backend.paged_attention(q, kc, vc, meta, d ** -0.5)
            times[name].append((time.perf_counter() - t0) / len(layers))
    rows = []
    base = min(times["none"][1:])
    print(f"decode attention, B={b} seq={L} heads={a.heads}/{a.kv_heads} d={d}, {a.threads} threads, "
          f"{a.layers} layers' caches; ms per layer")
    print(f"{'kv cache':10s} {'min ms':>8s} {'median ms':>10s} {'MB/layer':>9s} {'speedup':>8s}")
    for name, ts in times.items():
        ts = sorted(ts[1:])
        kc, vc = caches[name][0]
        mb = sum(x.numel() * x.element_size() for x in (kc, vc)) / 1e6 if name == "none" else (kc.nbytes + vc.nbytes) / 1e6
        label = "bf16" if name == "none" else name
        rows.append({"kv_cache": label, "min_ms": ts[0] * 1e3, "median_ms": ts[len(ts) // 2] * 1e3, "mb_per_layer": mb,
                     "speedup_vs_bf16": base / ts[0]})
        print(f"{label:10s} {ts[0] * 1e3:8.2f} {ts[len(ts) // 2] * 1e3:10.2f} {mb:9.1f} {base / ts[0]:7.2f}x")
    if a.json:
        record = {"workload": {k: getattr(a, k) for k in ("batch", "seq", "heads", "kv_heads", "head_dim",
                                                           "block_size", "layers", "repeats", "threads")},
                  "engine": "tidal cpu paged_attention", "versions": {"torch": torch.__version__,
                                                                       "python": platform.python_version()},
                  "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "results": rows}
        with open(a.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
