"""Weight placement over device / host / disk, the layer prefetcher and the zig-zag (layer-major,
micro-batched) schedule: offloaded and micro-batched runs give the all-resident run's greedy tokens
(fp32), each streamed layer is copied once per step however many micro-batches, at most two
streamed layers are resident, and --offload-dir files are written once and reused."""
import os

import pytest
import torch
import transformers

from tidal import LLM, SamplingParams, TidalError
from tidal.config import EngineConfig
from tidal.engine.offload_runner import split_batch
from tidal.kernels import host_kv, torch_ops
from tidal.kernels.metadata import AttentionMetadata
from tidal.policy import Policy
from tidal.weights.placement import assign_tiers

NUM_LAYERS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[(7 * i + 3 * j) % 120 + 2 for j in range(3 + 5 * i)] for i in range(8)]


def _save(path, cfg, tokenizer):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path, max_shard_size="200KB")  # sharded: layers spread over several files
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from tidal.weights.loader import open_checkpoint
    return open_checkpoint("smollm2").load_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return _save(tmp_path_factory.mktemp("llama"), cfg, tokenizer)


def _llm(model_dir, **kw):
    kw = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 256, "block_size": 4, **kw}
    return LLM(model_dir, **kw)


def _run(llm, prompts=PROMPTS, params=GREEDY):
    return [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


@pytest.fixture(scope="module")
def resident(llama_dir):
    return _run(_llm(llama_dir))


def _streamed_resident(runner) -> int:
    """Streamed layers whose parameters hold storage right now."""
    return sum(any(t.numel() > 0 for t in s.layout.current()) for s in runner.placement.streamed.values())


@pytest.mark.parametrize("policy", ["w=0,0,100 bs=4 mb=2", "w=30,40,30", "w=0,0,100"])
def test_offloaded_equals_resident(llama_dir, resident, policy):
    llm = _llm(llama_dir, policy=policy)
    runner = llm.engine.runner
    tiers = runner.placement.tiers
    assert tiers.count("disk") == (NUM_LAYERS if policy.startswith("w=0,0,100") else 2)
    assert _run(llm) == resident
    assert runner.prefetcher.stats["peak_bound"] <= 2 and _streamed_resident(runner) <= 2
    # weights on disk are mapped from the checkpoint in place: nothing was written anywhere
    assert all(s.ops and s.host_buffer is None for s in runner.placement.streamed.values())


@pytest.mark.parametrize("policy", ["w=0,0,100 kv=0,0,100", "w=50,0,50 kv=50,0,50 bs=4 mb=2"])
def test_kv_cache_on_disk_equals_resident(llama_dir, resident, policy, tmp_path):
    """The KV cache's disk share: memory-mapped files under --offload-dir (unlinked at once, so
    nothing is left behind), read by the same attention kernels."""
    llm = _llm(llama_dir, policy=policy, offload_dir=str(tmp_path))
    caches = llm.engine.runner.kv_caches
    disk = NUM_LAYERS if "kv=0,0,100" in policy else NUM_LAYERS // 2
    on_file = [k for k, _ in caches if k.untyped_storage().filename is not None]
    assert len(on_file) == disk and caches[-1][0].untyped_storage().filename is not None
    assert _run(llm) == resident
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs]
    with pytest.raises(TidalError, match="--offload-dir"):
        _llm(llama_dir, policy=policy)


@pytest.mark.parametrize("mb", [2, 4])
def test_micro_batched_equals_normal_schedule(llama_dir, resident, mb):
    assert _run(_llm(llama_dir, policy=f"mb={mb}")) == resident


def test_each_layer_loaded_once_per_step(llama_dir, resident):
    llm = _llm(llama_dir, policy="w=0,0,100 mb=4")
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), None, GREEDY, prompt_token_ids=p)
    steps, out = 0, {}
    while eng.has_unfinished_requests():
        steps += 1
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
        assert len(eng.last_scheduler_output.num_scheduled_tokens) == len(PROMPTS)  # one batch each step, split in 4 micro-batches
    assert [out[str(i)] for i in range(len(PROMPTS))] == resident
    # a cold load of layer 0, then per step every layer once (the last one prefetches layer 0 again)
    assert eng.runner.prefetcher.stats["loads"] == steps * NUM_LAYERS + 1


def test_host_mem_limit_streams_from_disk(llama_dir, resident):
    """--policy auto under a RAM budget: the planner (tidal/plan, with the fake profile conftest.py
    installs) streams some layers from the safetensors files mapped in place, the rest resident."""
    budget = dict(host_mem="1MB", prompt_len=32, gen_len=8, num_kv_blocks=None)
    llm = _llm(llama_dir, **budget)
    runner = llm.engine.runner
    policy = runner.policy
    assert runner.plan is not None and runner.plan.memory["device"] <= 1e6
    assert 0 < policy.weights[2] < 100 and policy.weights[1] == 0
    assert "disk" in runner.placement.tiers and "device" in runner.placement.tiers
    assert llm.engine.scheduler.max_num_seqs == policy.effective_batch
    assert _run(llm) == resident
    with pytest.raises(TidalError, match="--host-mem"):
        _llm(llama_dir, **{**budget, "host_mem": "150KB"})


def test_quantized_offload_dir_written_once_and_reused(llama_dir, tmp_path):
    ref = _run(_llm(llama_dir, quant="int8"))
    first = _llm(llama_dir, quant="int8", policy="w=0,0,100", offload_dir=str(tmp_path))
    store_files = sorted(tmp_path.rglob("layer_*.safetensors"))
    assert len(store_files) == NUM_LAYERS
    stamps = [os.stat(f).st_mtime_ns for f in store_files]
    assert _run(first) == ref
    second = _llm(llama_dir, quant="int8", policy="w=0,0,100", offload_dir=str(tmp_path))
    assert [os.stat(f).st_mtime_ns for f in store_files] == stamps  # reused, not rewritten
    assert _run(second) == ref
    # a quantized layer's packed weight (a plain attribute, not a buffer) streams with it too
    assert _streamed_resident(second.engine.runner) <= 2


def test_dummy_weights_offloaded(llama_dir, tmp_path):
    ref = _run(_llm(llama_dir, load_format="dummy"))
    with pytest.raises(TidalError, match="pass --offload-dir DIR"):
        _llm(llama_dir, load_format="dummy", policy="w=50,0,50")
    llm = _llm(llama_dir, load_format="dummy", policy="w=50,0,50", offload_dir=str(tmp_path))
    assert _run(llm) == ref  # the same random draws as the resident run


def test_opt_offloaded(tmp_path, tokenizer):
    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=4,
                                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                                 pad_token_id=1, architectures=["OPTForCausalLM"])
    path = _save(tmp_path / "opt", cfg, tokenizer)
    ref = _run(_llm(path))
    llm = _llm(path, policy="w=0,50,50 bs=2 mb=3")
    assert _run(llm) == ref
    assert llm.engine.runner.placement.tiers == ["host", "host", "disk", "disk"]


def test_tiers_and_split():
    assert assign_tiers([10] * 4, (30, 40, 30)) == ["device", "host", "host", "disk"]
    assert assign_tiers([10] * 3, (0, 0, 100)) == ["disk"] * 3
    assert assign_tiers([10] * 3, (100, 0, 0)) == ["device"] * 3
    rows = list(zip("abcde", [1, 2, 3, 4, 5]))
    parts = split_batch(rows, 4)
    assert [[s for s, _ in p] for p in parts] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert parts[0] == [("a", 1), ("b", 2)] and split_batch(rows[:2], 4) == [[("a", 1)], [("b", 2)]]
    with pytest.raises(TidalError, match="policy"):
        EngineConfig(model="x", device="cpu", dtype="float32", policy="w=10,10,10")
    assert Policy.parse("w=0,0,100 bs=4 mb=2").effective_batch == 8


def test_host_kv_attention_paths():
    """The host-KV attention routes (CPU attention, and gathering the used blocks) equal the plain op."""
    torch.manual_seed(0)
    nb, bs, kvh, d, heads = 12, 4, 2, 8, 4
    k_cache, v_cache = torch.randn(nb, bs, kvh, d), torch.randn(nb, bs, kvh, d)
    tables = [[3, 7, 1], [10, 5, 0]]
    seq_lens, q_lens = [10, 6], [1, 1]
    meta = AttentionMetadata(slot_mapping=torch.tensor([9, 5]), block_tables=torch.tensor(tables),
                             seq_lens=torch.tensor(seq_lens), query_start_loc=torch.tensor([0, 1, 2]),
                             query_lens_list=q_lens, seq_lens_list=seq_lens, max_query_len=1, max_seq_len=10,
                             block_size=bs)
    q = torch.randn(2, heads, d)
    ref = torch_ops.paged_attention(q, k_cache, v_cache, meta, 0.3)
    from tidal.kernels import get_backend
    got = host_kv.gathered_attention(q, k_cache, v_cache, meta, host_kv.host_meta(meta), 0.3)
    assert torch.allclose(got, ref, atol=1e-5)
    host_kv.set_cpu_attention(True)
    try:
        got = host_kv.paged_attention(get_backend("cpu"), q, k_cache, v_cache, meta, 0.3)
    finally:
        host_kv.set_cpu_attention(False)
    assert torch.allclose(got, ref, atol=1e-5)


def test_quantized_kv_cache_on_disk(llama_dir, tmp_path):
    """--kv-quant int8 caches (codes, scales, mins) map from files the same way."""
    resident = _run(_llm(llama_dir, kv_quant="int8"))
    llm = _llm(llama_dir, kv_quant="int8", policy="kv=0,0,100", offload_dir=str(tmp_path))
    k = llm.engine.runner.kv_caches[0][0]
    assert all(t.untyped_storage().filename is not None for t in k.parts())
    assert _run(llm) == resident
