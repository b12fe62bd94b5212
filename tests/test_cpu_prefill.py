"""The CPU backend's bf16 prefill attention kernel (kernels/cpu/prefill_bf16.cpp) equals the torch
path (torch_ops.prefill_attention) on a paged cache: whole prompts, chunks after cached context,
GQA groups, head sizes 64 and 128, query rows that are strided views. Both compute fp32 scores
from bf16 inputs and round the probabilities to bf16, so they agree to bf16 rounding."""
import pytest
import torch

from tidal.kernels import cpu, torch_ops


@pytest.fixture(scope="module")
def ext():
    mod = cpu.load()
    assert mod is not None, "the CPU kernel failed to build (see stderr)"
    probe = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    cache = torch.zeros(1, 16, 1, 64, dtype=torch.bfloat16)
    if mod.prefill_attention_bf16(probe, cache, cache, torch.zeros(1, dtype=torch.int64), 1, 1.0) is None:
        pytest.skip("this CPU has no AVX512-BF16: the torch path serves prefill")
    return mod


def _paged(seq_len, kvh, d, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_blocks = (seq_len + bs - 1) // bs
    perm = torch.randperm(n_blocks + 3, generator=g)[:n_blocks]          # scattered blocks
    k = torch.randn(n_blocks + 3, bs, kvh, d, generator=g).bfloat16()
    v = torch.randn(n_blocks + 3, bs, kvh, d, generator=g).bfloat16()
    return k, v, perm.to(torch.int64)


@pytest.mark.parametrize("q_len,seq_len,heads,kvh,d", [
    (512, 512, 9, 3, 64),     # a whole prompt, SmolLM2's heads
    (37, 37, 9, 3, 64),       # shorter than one block of queries
    (100, 300, 4, 1, 64),     # a chunk after 200 cached tokens
    (33, 70, 8, 8, 128),      # no GQA, head size 128
    (1, 50, 6, 2, 64),        # one row
])
def test_prefill_kernel_matches_torch(ext, q_len, seq_len, heads, kvh, d):
    k, v, table = _paged(seq_len, kvh, d, seed=q_len)
    qkv = torch.randn(q_len, (heads + 2 * kvh) * d).mul(3).bfloat16()
    q = qkv[:, :heads * d].view(q_len, heads, d)             # strided rows, as the model passes them
    scale = d ** -0.5
    out = ext.prefill_attention_bf16(q, k, v, table, seq_len, scale)
    ref = torch_ops.prefill_attention(q, k, v, table, seq_len, scale)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert (out.float() - ref.float()).abs().mean() < 2e-3


def test_prefill_kernel_declines_what_it_does_not_handle(ext):
    k, v, table = _paged(20, 2, 64)
    q = torch.randn(20, 4, 64)                               # fp32: the torch path's
    assert ext.prefill_attention_bf16(q, k, v, table, 20, 0.125) is None
