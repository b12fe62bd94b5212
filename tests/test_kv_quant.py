"""KV cache quantization (--kv-quant): kv/quant_cache.py's round trip and writes, paged attention over
int8 / int4 caches (torch ops and the CPU kernel) against dense attention on the dequantized values,
and a tiny Llama's logits with a quantized cache near those with a float one."""
import random

import pytest
import torch
import transformers

from model_utils import InMemoryCheckpoint, all_logits
from test_attention import dense_reference
from tidal.config import EngineConfig
from tidal.engine.model_runner import ModelRunner
from tidal.errors import TidalError
from tidal.kernels import cpu, get_backend
from tidal.kernels.metadata import AttentionMetadata
from tidal.kernels.torch_ops import paged_attention, write_kv
from tidal.kv.quant_cache import (QuantKVCache, allocate_kv_cache, dequantize_blocks, kv_bytes_per_token,
                                  quantize_rows)


def _kv(n, kvh, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-channel offsets and spreads, as real keys have (a few large channels)
    return torch.randn(n, kvh, d, generator=g) * torch.rand(d, generator=g) * 3 + torch.randn(d, generator=g)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d,group", [(64, 64), (64, 32), (128, 64), (16, 16)])
def test_round_trip_error_at_most_half_a_step(bits, d, group):
    x = _kv(50, 3, d)
    codes, scale, mn = quantize_rows(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape == (50, 3, d * bits // 8)
    assert scale.shape == mn.shape == (50, 3, d // group) and scale.dtype == torch.float16
    cache = QuantKVCache(codes[None], scale[None], mn[None], bits, group)
    assert cache.shape == (1, 50, 3, d)
    back = dequantize_blocks(cache)[0]
    err = (back - x).abs().reshape(50, 3, d // group, group).amax(-1)
    assert (err <= scale.float() / 2 + 1e-6).all()
    assert err.max() > scale.float().max() / 8  # really quantized
    rel = (back - x).norm() / x.norm()
    assert rel < (0.01 if bits == 8 else 0.15), rel.item()


def test_write_kv_stores_quantized_rows_at_their_slots():
    k_cache, v_cache = allocate_kv_cache(10, 4, 2, 64, torch.float32, torch.device("cpu"), "int4")
    assert isinstance(k_cache, QuantKVCache) and k_cache.data.shape == (10, 4, 2, 32)
    k, v = _kv(5, 2, 64, 1), _kv(5, 2, 64, 2)
    slots = torch.tensor([7, 8, 9, 30, 2])
    write_kv(k, v, k_cache, v_cache, slots)
    for cache, x in ((k_cache, k), (v_cache, v)):
        dense = dequantize_blocks(cache).view(40, 2, 64)
        assert cache.group_size == 32  # int4's default
        want = dequantize_blocks(QuantKVCache(*[t[None] for t in quantize_rows(x, 4, 32)], 4, 32))[0]
        assert torch.equal(dense[slots], want)
        rest = torch.ones(40, dtype=torch.bool)
        rest[slots] = False
        assert torch.equal(dense[rest], torch.zeros(35, 2, 64))


def _batch(kv_quant, case, block_size, h=6, kvh=2, d=64, seed=0):
    """A batch written into a fresh quantized cache: (q, k_cache, v_cache, meta, per sequence (q, k, v)
    with k, v dequantized from the cache)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seqs = []
    for i in range(7):
        total = rng.randint(1, 70)
        if case == "all_decode" or (case == "mixed" and i % 2):
            seqs.append((total - 1, 1))
        else:
            new = rng.randint(1, total)
            seqs.append((total - new, new))
    num_blocks = 500
    k_cache, v_cache = allocate_kv_cache(num_blocks, block_size, kvh, d, torch.float32, torch.device("cpu"), kv_quant)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, qs, slots, ks, vs = [], [], [], [], []
    for ctx, new in seqs:
        total = ctx + new
        table = [free.pop() for _ in range((total + block_size - 1) // block_size)]
        ks.append(_kv(total, kvh, d, rng.randrange(1 << 30)))
        vs.append(_kv(total, kvh, d, rng.randrange(1 << 30)))
        slots.append([table[p // block_size] * block_size + p % block_size for p in range(total)])
        tables.append(table)
        qs.append(torch.randn(new, h, d))
    write_kv(torch.cat(ks), torch.cat(vs), k_cache, v_cache, torch.tensor(sum(slots, [])))
    max_blocks = max(len(t) for t in tables)
    qlens, slens = [n for _, n in seqs], [c + n for c, n in seqs]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([s[-1] for s in slots]), block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
        seq_lens=torch.tensor(slens), query_start_loc=torch.tensor(qsl), query_lens_list=qlens, seq_lens_list=slens,
        max_query_len=max(qlens), max_seq_len=max(slens), block_size=block_size)
    dense_k, dense_v = (dequantize_blocks(c).flatten(0, 1) for c in (k_cache, v_cache))
    stored = [(qi, dense_k[s], dense_v[s]) for qi, s in zip(qs, slots)]
    return torch.cat(qs), k_cache, v_cache, meta, stored


def _cpu_kernel():
    assert cpu.load() is not None, "the CPU kernel failed to build (see stderr)"
    return get_backend("cpu").paged_attention


def _vnni_atol(kv_quant, d, ref):
    """The int8 cache's VNNI kernel (head size a multiple of 64) rounds each query head and each
    value weight to 16 bits (int8 plus an int8 remainder): measured <= 1.5e-4 of the largest output
    here; the other kernels are exact to fp32 rounding."""
    vnni = kv_quant == "int8" and d % 64 == 0 and "avx512_vnni" in open("/proc/cpuinfo").read()
    return 4e-4 * ref.abs().max().item() if vnni else 1e-5


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
@pytest.mark.parametrize("ops", ["torch", "cpu-kernel"])
@pytest.mark.parametrize("case", ["mixed", "all_decode"])
@pytest.mark.parametrize("block_size,d", [(1, 64), (16, 64), (16, 32)])  # d=32: the kernel's generic path
def test_paged_attention_equals_dense_on_dequantized_kv(kv_quant, ops, case, block_size, d):
    q, k_cache, v_cache, meta, stored = _batch(kv_quant, case, block_size, d=d)
    attend = paged_attention if ops == "torch" else _cpu_kernel()
    out = attend(q, k_cache, v_cache, meta, d ** -0.5)
    qsl = meta.query_start_loc.tolist()
    for i, (qi, k, v) in enumerate(stored):
        ref = dense_reference(qi, k, v, d ** -0.5)
        atol = 1e-5 if ops == "torch" else _vnni_atol(kv_quant, d, ref)
        assert torch.allclose(out[qsl[i]:qsl[i + 1]], ref, atol=atol), (case, i)


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 128])  # 128: two groups of 64 per head
@pytest.mark.parametrize("h,kvh", [(9, 3), (4, 4), (8, 1), (20, 2)])  # 1 to 10 query heads per KV head
def test_cpu_kernel_equals_torch_path(kv_quant, dtype, d, h, kvh):
    q, k_cache, v_cache, meta, _ = _batch(kv_quant, "all_decode", 16, h=h, kvh=kvh, d=d, seed=4)
    q = q.to(dtype)
    # the kernel computes in fp32 whatever q's dtype (the torch path would round K/V to bf16 first)
    want = paged_attention(q.float(), k_cache, v_cache, meta, 0.125)
    got = _cpu_kernel()(q, k_cache, v_cache, meta, 0.125)
    assert got.dtype == dtype
    assert torch.allclose(got.float(), want, atol=_vnni_atol(kv_quant, d, want),
                          rtol=0 if dtype == torch.float32 else 2 ** -8)


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_cpu_write_and_dequant_match_the_torch_ops(kv_quant):
    """kv_quant_ops.cpp writes the codes, scales and mins quantize_rows computes (a code may differ by
    one where the fp32 product lands on a rounding tie), and reads blocks back as dequantize_blocks does."""
    ext = cpu.load()
    assert ext is not None
    k, v = _kv(37, 3, 64, 5).to(torch.bfloat16), _kv(37, 3, 64, 6).to(torch.bfloat16)
    slots = torch.randperm(80)[:37]
    caches = {}
    for how in ("torch", "cpu"):
        kc, vc = allocate_kv_cache(5, 16, 3, 64, torch.bfloat16, torch.device("cpu"), kv_quant)
        (write_kv if how == "torch" else get_backend("cpu").write_kv)(k, v, kc, vc, slots)
        caches[how] = (kc, vc)
    for want, got in zip(caches["torch"], caches["cpu"]):
        assert torch.equal(want.scale, got.scale) and torch.equal(want.min, got.min)
        codes = lambda c: c.data.view(-1) if kv_quant == "int8" else torch.stack([c.data & 15, c.data >> 4]).view(-1)
        diff = (codes(want).int() - codes(got).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
        ids = torch.tensor([4, 0, 2])
        for bf16 in (False, True):
            dense = ext.kv_dequant_blocks(*got.parts(), ids, got.bits, got.group_size, bf16)
            ref = dequantize_blocks(got, ids, torch.bfloat16 if bf16 else torch.float32)
            assert dense.dtype == ref.dtype and torch.equal(dense, ref)


def _tiny_llama(head_dim=64):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=2 * head_dim, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _runner(hf, kv_quant, dtype="float32", **kw):
    cfg = EngineConfig(model="<in-memory>", device="cpu", dtype=dtype, block_size=4, kv_quant=kv_quant,
                       **({"num_kv_blocks": 256} | kw))
    return ModelRunner(cfg, checkpoint=InMemoryCheckpoint(hf))


@pytest.fixture(scope="module")
def tiny():
    hf = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 9, 40)]
    return hf, prompts, torch.cat(all_logits(_runner(hf, "none"), prompts))


# measured: int8 0.35% of the logit range, int4 4.8% (the same through prefill and the decode kernel)
@pytest.mark.parametrize("kv_quant,bound", [("int8", 0.01), ("int4", 0.1)])
@pytest.mark.parametrize("chunk", [None, 1, 4])  # one prefill each; one token a step (the decode kernel); chunks
def test_runner_logits_near_float_cache(tiny, kv_quant, bound, chunk):
    hf, prompts, ref = tiny
    runner = _runner(hf, kv_quant)
    assert isinstance(runner.kv_caches[0][0], QuantKVCache)
    got = torch.cat(all_logits(runner, prompts, chunk=chunk))
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    assert err <= bound * span, (err, span)
    assert err > 1e-5 * span  # the cache really is quantized


@pytest.mark.parametrize("chunk", [None, 16])  # 16: later chunks attend to earlier ones read back from the cache
def test_bf16_runner_prefill_over_int8_cache(tiny, chunk):
    """A bf16 model's prefill over an int8 cache (blocks dequantized in C++, then the bf16 prefill
    kernel) stays as near the bf16 model with a bf16 cache as the fp32 case does."""
    hf, prompts, _ = tiny
    ref = torch.cat(all_logits(_runner(hf, "none", dtype="bfloat16"), prompts, chunk=chunk))
    got = torch.cat(all_logits(_runner(hf, "int8", dtype="bfloat16"), prompts, chunk=chunk))
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    assert err <= 0.02 * span, (err, span)


def test_kv_mem_holds_more_quantized_blocks():
    hf = _tiny_llama()
    sizes = {q: _runner(hf, q, dtype="bfloat16", num_kv_blocks=None, kv_mem="1MiB").kv_bytes_per_block()
             for q in ("none", "int8", "int4")}
    # per token, layer and K or V: bf16 64 * 2 bytes; int8 64 + 4 (one fp16 scale and min per 64 values);
    # int4 32 + 8 (groups of 32)
    assert sizes == {"none": 2 * 2 * 4 * 128, "int8": 2 * 2 * 4 * 68, "int4": 2 * 2 * 4 * 40}
    blocks = {q: _runner(hf, q, dtype="bfloat16", num_kv_blocks=None, kv_mem="1MiB").num_blocks for q in sizes}
    assert blocks["int8"] >= 1.85 * blocks["none"] and blocks["int4"] >= 3.1 * blocks["none"]
    runner = _runner(hf, "int4", num_kv_blocks=3)
    k, v = runner.kv_caches[1]
    assert k.nbytes + v.nbytes == 3 * runner.kv_bytes_per_block() // runner.num_layers


def test_odd_head_size_is_refused():
    assert kv_bytes_per_token(2, 64, torch.float32) == 512
    with pytest.raises(TidalError, match="even head size.*--kv-quant none"):
        allocate_kv_cache(2, 4, 1, 15, torch.float32, torch.device("cpu"), "int8")
