"""Paged attention over a mixed batch (prefills, chunked prefills on cached context, decodes)
equals dense causal attention computed per sequence."""
import math
import random

import pytest
import torch

from tidal.kernels.metadata import AttentionMetadata
from tidal.kernels.torch_ops import paged_attention, write_kv


def dense_reference(q, k, v, scale):
    """q [L, h, d] are the last L positions of a sequence whose keys/values are k, v [S, kvh, d]."""
    L, h, d = q.shape
    S, kvh, _ = k.shape
    k = k.repeat_interleave(h // kvh, 1)
    v = v.repeat_interleave(h // kvh, 1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k.double()) * scale
    qpos = torch.arange(S - L, S)[:, None]
    scores = scores.masked_fill(torch.arange(S)[None, :] > qpos, -math.inf)
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v.double()).to(q.dtype)


def _ops(name, monkeypatch=None):
    if name == "torch":
        return paged_attention
    if name == "torch-sdpa":  # the fallback for very long prefills, forced on small shapes
        import tidal.kernels.torch_ops as ops
        monkeypatch.setattr(ops, "_MATMUL_ATTENTION_MAX_SCORES", 0)
        return paged_attention
    from tidal.kernels import cpu, get_backend
    assert cpu.load() is not None, "the CPU kernel failed to build (see stderr)"
    return get_backend("cpu").paged_attention


@pytest.mark.parametrize("ops", ["torch", "torch-sdpa", "cpu-kernel"])
@pytest.mark.parametrize("case", ["mixed", "all_decode", "chunked"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_equals_dense(ops, case, block_size, dtype, monkeypatch):
    rng = random.Random(block_size)
    torch.manual_seed(block_size)
    h, kvh, d, num_blocks = 6, 2, 16, 500
    seqs = []  # (context length before this step, new tokens)
    for i in range(7):
        total = rng.randint(1, 60)
        if case == "all_decode" or (case == "mixed" and i % 2):
            seqs.append((total - 1, 1) if total > 1 else (0, 1))
        elif case == "chunked":
            new = rng.randint(1, total)
            seqs.append((total - new, new))
        else:
            seqs.append((0, total))
    k_cache = torch.zeros(num_blocks, block_size, kvh, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered blocks, as after a while of serving
    tables, full_k, full_v, qs, slots = [], [], [], [], []
    for ctx, new in seqs:
        total = ctx + new
        table = [free.pop() for _ in range((total + block_size - 1) // block_size)]
        k, v = torch.randn(total, kvh, d), torch.randn(total, kvh, d)
        old = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
        write_kv(k[:ctx], v[:ctx], k_cache, v_cache, torch.tensor(old, dtype=torch.int64))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, total)]
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(new, h, d))
    q = torch.cat(qs)
    write_kv(torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)]), torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)]),
             k_cache, v_cache, torch.tensor(slots, dtype=torch.int64))
    max_blocks = max(len(t) for t in tables)
    qlens = [n for _, n in seqs]
    slens = [c + n for c, n in seqs]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
        seq_lens=torch.tensor(slens), query_start_loc=torch.tensor(qsl), query_lens_list=qlens, seq_lens_list=slens,
        max_query_len=max(qlens), max_seq_len=max(slens), block_size=block_size)
    out = _ops(ops, monkeypatch)(q.to(dtype), k_cache, v_cache, meta, d ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for i in range(len(seqs)):
        ref = dense_reference(qs[i].to(dtype).float(), full_k[i].to(dtype).float(), full_v[i].to(dtype).float(),
                              d ** -0.5)
        assert torch.allclose(out[qsl[i]:qsl[i + 1]].float(), ref, atol=tol), (case, i)


@pytest.mark.parametrize("head_dim,group", [(64, 3), (64, 1), (128, 4), (64, 8)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_cpu_kernel_bf16_fast_path(head_dim, group, block_size):
    """The hand-vectorized bf16 decode path (AVX512-BF16 CPUs; elsewhere the generic loop) agrees
    with dense fp64 attention on the same bf16 values, for lengths on and off its 16-token tiles."""
    from tidal.kernels import cpu, get_backend
    assert cpu.load() is not None, "the CPU kernel failed to build (see stderr)"
    torch.manual_seed(head_dim + group + block_size)
    kvh, lens = 2, [1, 15, 16, 17, 33, 100, 257]
    h, num_blocks = kvh * group, sum((n + block_size - 1) // block_size for n in lens) + 3
    k_cache = torch.randn(num_blocks, block_size, kvh, head_dim).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kvh, head_dim).bfloat16()
    perm = torch.randperm(num_blocks).tolist()
    tables, q = [], torch.randn(len(lens), h, head_dim).bfloat16()
    for n in lens:
        tables.append([perm.pop() for _ in range((n + block_size - 1) // block_size)])
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        seq_lens=torch.tensor(lens), query_start_loc=torch.arange(len(lens) + 1),
        query_lens_list=[1] * len(lens), seq_lens_list=lens, max_query_len=1, max_seq_len=max(lens),
        block_size=block_size)
    out = get_backend("cpu").paged_attention(q, k_cache, v_cache, meta, head_dim ** -0.5)
    assert out.dtype == torch.bfloat16
    for i, (n, table) in enumerate(zip(lens, tables)):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        k = k_cache.view(-1, kvh, head_dim)[slots].float()
        v = v_cache.view(-1, kvh, head_dim)[slots].float()
        ref = dense_reference(q[i:i + 1].float(), k, v, head_dim ** -0.5)
        assert (out[i:i + 1].float() - ref).abs().max().item() < 2e-2


@pytest.mark.parametrize("ctx,new", [(0, 300), (150, 200), (0, 129)])
def test_long_prefill_in_causal_blocks_equals_dense(ctx, new):
    """Queries longer than one causal block (torch_ops._CAUSAL_BLOCK rows) attend block by block."""
    from tidal.kernels import torch_ops
    assert new > torch_ops._CAUSAL_BLOCK
    torch.manual_seed(new)
    h, kvh, d, bs = 6, 2, 16, 16
    total = ctx + new
    nblocks = (total + bs - 1) // bs
    k_cache, v_cache = torch.zeros(nblocks + 2, bs, kvh, d), torch.zeros(nblocks + 2, bs, kvh, d)
    table = torch.randperm(nblocks + 2)[:nblocks]
    k, v, q = torch.randn(total, kvh, d), torch.randn(total, kvh, d), torch.randn(new, h, d)
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(total)])
    write_kv(k, v, k_cache, v_cache, slots)
    out = torch_ops.prefill_attention(q, k_cache, v_cache, table, total, d ** -0.5)
    assert (out - dense_reference(q, k, v, d ** -0.5)).abs().max().item() < 1e-4
