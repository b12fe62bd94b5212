"""The offloading planner: byte counts against built modules, the LP's limits, and `tidal plan`.

Hardware figures are fixed fakes (a T4-like GPU box and a 2-core CPU), never measured here, so
every test is fast and deterministic.
"""
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, OPTConfig

from tidal.config import EngineConfig
from tidal.errors import TidalError
from tidal.plan.cost_model import CostModel, predict
from tidal.plan.hardware import get_profile, load_profile, profile_path, save_profile
from tidal.plan.model_spec import model_spec
from tidal.policy import Policy
from tidal.plan.search import choose_policy, limits_for, search

from fake_profiles import GiB, cpu_profile, gpu_profile



def tiny_llama(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=256, architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def opt_6_7b():  # OPT-6.7B's shape (FlexGen's model): config only, nothing is built
    return OPTConfig(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, num_hidden_layers=32, vocab_size=50272,
                     max_position_embeddings=2048, word_embed_proj_dim=4096, architectures=["OPTForCausalLM"])


def module_bytes(module) -> int:
    """Bytes a built module holds: parameters, buffers and backend-packed weights, each tensor once."""
    seen, total = set(), 0
    tensors = [t for n, t in module.named_parameters()]
    tensors += [t for n, t in module.named_buffers() if not n.endswith(("rotary.cos", "rotary.sin", "cos", "sin"))]
    for m in module.modules():
        packed = getattr(m, "packed", None)
        packed = packed if isinstance(packed, (tuple, list)) else [packed]
        tensors += [t for t in packed if isinstance(t, torch.Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("cfg", [tiny_llama(), tiny_llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
                                 OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                                           vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=32,
                                           architectures=["OPTForCausalLM"])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_match_built_model(cfg, dtype):
    from tidal.model.registry import build_model
    model = build_model(cfg, torch.device("cpu"), dtype)
    spec = model_spec(cfg)
    assert spec.weight_bytes(dtype.itemsize) == module_bytes(model)
    assert spec.layer_weight_bytes(dtype.itemsize) == module_bytes(model.layers[0])


@pytest.mark.parametrize("quant,bits", [("int4", 4), ("int8", 8)])
def test_quantized_weight_bytes_match_quant_linear(quant, bits):
    from tidal.model.registry import build_model
    from tidal.model.quantize import quantize_model
    cfg = tiny_llama()
    model = build_model(cfg, torch.device("cpu"), torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    quantize_model(model, bits)
    spec = model_spec(cfg)
    assert spec.layer_weight_bytes(2, quant) == module_bytes(model.layers[0])
    assert spec.weight_bytes(2, quant) == module_bytes(model)
    assert spec.weight_bytes(2, "int4") < spec.weight_bytes(2, "int8") < spec.weight_bytes(2)


def test_kv_bytes_match_cache_layout():
    from tidal.kv.quant_cache import allocate_kv_cache
    spec = model_spec(tiny_llama())
    for kv_quant in ("none", "int8", "int4"):
        k, v = allocate_kv_cache(1, 1, 2, 16, torch.bfloat16, torch.device("cpu"), kv_quant)
        held = sum(c.nbytes if hasattr(c, "parts") else c.numel() * c.element_size() for c in (k, v))
        assert spec.kv_bytes_per_token(torch.bfloat16, kv_quant) == held


def test_smollm2_flops_match_anchor():
    # ANCHORS.md: SmolLM2-135M costs about 270 MFLOP a token before attention (layers + LM head)
    cfg = tiny_llama(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True)
    spec = model_spec(cfg)
    total = spec.num_layers * spec.layer_flops_per_token + spec.head_flops_per_token
    assert abs(total - 270e6) / 270e6 < 0.01
    assert spec.attn_flops_per_token(100) == 4 * 9 * 64 * 100


def within_limits(pred, limits):
    for tier in ("device", "host", "disk"):
        assert pred.memory[tier] <= limits[tier] * (1 + 1e-6) + 1, (tier, pred.memory, limits)


@pytest.mark.parametrize("device_mem,host_mem", [("4GiB", "16GiB"), ("2GiB", "8GiB"), ("6GiB", "64GiB")])
def test_lp_respects_every_limit(tmp_path, device_mem, host_mem):
    prof = gpu_profile()
    cfg = EngineConfig(device="cpu", dtype="float16", device_mem=device_mem, host_mem=host_mem,
                       offload_dir=str(tmp_path), max_num_seqs=256)
    limits = limits_for(cfg, prof, disk_limit=20 * GiB)
    spec = model_spec(opt_6_7b())
    found = search(spec, prof, torch.float16, 512, 32, limits, 256, ("none", "int4"), ("none",))
    assert found, "a 6.7B model must fit in these limits with disk offload"
    for pred in found:
        within_limits(pred, limits)
    policy, pred = choose_policy(opt_6_7b(), cfg, 512, 32, prof, disk_limit=20 * GiB)
    within_limits(pred, limits)
    assert policy.offloads_weights          # 13 GB of fp16 weights cannot sit in a few GiB of device


def test_all_device_when_it_fits():
    cfg = EngineConfig(device="cpu", dtype="float32", max_num_seqs=8)
    policy, pred = choose_policy(tiny_llama(), cfg, 64, 16, gpu_profile())
    assert (policy.weights, policy.kv, policy.act) == ((100, 0, 0),) * 3
    assert policy.batch_size == 8 and policy.quant == "none"
    assert pred.memory["host"] == 0 and pred.memory["disk"] == 0


def test_more_host_memory_never_predicts_less():
    prof, spec_cfg = gpu_profile(), opt_6_7b()
    last = 0.0
    for host in ("4GiB", "8GiB", "12GiB", "16GiB", "32GiB", "64GiB"):
        cfg = EngineConfig(device="cpu", dtype="float16", device_mem="4GiB", host_mem=host, max_num_seqs=64)
        _, pred = choose_policy(spec_cfg, cfg, 512, 32, prof, disk_limit=100 * GiB)
        assert pred.tokens_per_s >= last * (1 - 1e-3), (host, pred.tokens_per_s, last)
        last = pred.tokens_per_s


def test_nothing_fits_says_what_to_raise():
    cfg = EngineConfig(device="cpu", dtype="float16", device_mem="64MiB", host_mem="1GiB")
    with pytest.raises(TidalError) as e:
        choose_policy(opt_6_7b(), cfg, 512, 32, gpu_profile())
    assert "--offload-dir" in e.value.message and "--device-mem" in e.value.message


def test_micro_batches_amortise_streamed_weights():
    # weights streamed from host over a 12 GB/s link: a decode step is load-bound, and mb micro-batches
    # share one load per layer (the zig-zag), so throughput grows with mb until compute catches up
    spec, prof = model_spec(opt_6_7b()), gpu_profile()
    base = Policy.parse("0 100 100 0 100 0 bs=32 mb=1")
    tps = [predict(spec, prof, torch.float16, 512, 32, base.with_(num_micro_batches=mb)).tokens_per_s
           for mb in (1, 2, 4)]
    assert tps[0] < tps[1] < tps[2]
    cm = CostModel(spec, prof, torch.float16, 512, 32, base)
    t = {r: c + v @ np.array([0, 1, 0, 1, 0, 0, 1, 0, 0.0]) for r, (c, v) in cm.stage_terms("decode", 528).items()}
    assert max(t, key=t.get) == "h2d"
    assert t["h2d"] == pytest.approx(cm.layer_w / prof.h2d_bw)


def test_cpu_only_streams_only_the_disk_share():
    spec, prof = model_spec(opt_6_7b()), cpu_profile()
    dev, host = (Policy.parse(s + " bs=4") for s in ("100 0 100 0 100 0", "0 100 0 100 0 100"))
    assert predict(spec, prof, torch.bfloat16, 128, 8, dev).tokens_per_s == \
        pytest.approx(predict(spec, prof, torch.bfloat16, 128, 8, host).tokens_per_s)
    disk = Policy.parse("0 50 100 0 100 0 bs=4")
    assert predict(spec, prof, torch.bfloat16, 128, 8, disk).tokens_per_s < \
        predict(spec, prof, torch.bfloat16, 128, 8, host).tokens_per_s


def test_profile_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TIDAL_HARDWARE_PROFILE", raising=False)
    prof = cpu_profile(notes=["fake"])
    save_profile(prof, profile_path("cpu"))
    loaded, path, fresh = get_profile("cpu")     # found in the cache: nothing is measured
    assert not fresh and path.startswith(str(tmp_path)) and loaded == prof
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TidalError, match="--profile"):
        load_profile(str(tmp_path / "bad.json"))


def test_disk_benchmark_small(tmp_path):
    from tidal.plan.iobench import disk_bw
    notes = []
    read, write, cached = disk_bw(str(tmp_path), 4 << 20, notes)
    assert read > 0 and write > 0 and cached > 0
    assert not list(tmp_path.iterdir())          # the test file is gone


@pytest.fixture
def smollm2():
    from tidal.weights.loader import resolve_model_path
    try:
        resolve_model_path("smollm2")
    except TidalError as e:
        pytest.skip(e.message)


def test_tidal_plan_cli_on_smollm2(smollm2, tmp_path, capsys):
    from tidal.cli import main
    hw = tmp_path / "hw.json"
    save_profile(cpu_profile(), str(hw))
    out = tmp_path / "plan.json"
    # on a CPU the budget is one RAM (the smaller flag); a GGUF streams from --offload-dir files
    assert main(["plan", "--device", "cpu", "--dtype", "bfloat16", "--device-mem", "100MiB", "--host-mem", "2GiB",
                 "--offload-dir", str(tmp_path / "off"), "--hardware", str(hw), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("policy"))
    policy = Policy.parse(line.split(None, 1)[1])
    assert policy.weights[0] < 100 and policy.weights[1] == 0   # 257 MiB of bf16 cannot sit in 100 MiB
    assert "tok/s" in text and "device" in text and "host" in text
    record = json.loads(out.read_text())
    assert record["policy"] == str(policy) and record["prediction"]["tokens_per_s"] > 0
    assert record["prediction"]["memory"]["device"] <= 100 * 2**20 + 1


def test_tidal_plan_cli_costs_an_explicit_policy(smollm2, tmp_path, capsys):
    from tidal.cli import main
    hw = tmp_path / "hw.json"
    save_profile(cpu_profile(), str(hw))
    assert main(["plan", "--device", "cpu", "--dtype", "float32", "--policy", "20 80 100 0 100 0 bs=4",
                 "--hardware", str(hw), "--prompt-len", "64", "--gen-len", "8"]) == 0
    text = capsys.readouterr().out
    assert "w=20,80,0 kv=100,0,0 act=100,0,0 bs=4 mb=1" in text


def test_shares_fall_on_whole_layers_and_runner_tiers():
    # the runner places whole decoder layers (and whole layers' KV), KV on device/host, activations on device
    cfg = EngineConfig(device="cpu", dtype="float16", device_mem="6GiB", host_mem="6GiB", max_num_seqs=64)
    policy, _ = choose_policy(opt_6_7b(), cfg, 512, 32, gpu_profile(), disk_limit=100 * GiB)
    for shares in (policy.weights, policy.kv):
        for cum in (shares[0], shares[0] + shares[1]):
            assert abs(cum * 32 / 100 - round(cum * 32 / 100)) < 1e-2, shares
    assert policy.kv[2] == 0 and policy.act == (100, 0, 0)


def test_disk_reads_hit_the_page_cache_when_ram_is_spare():
    spec, prof = model_spec(opt_6_7b()), gpu_profile()
    policy = Policy.parse("0 0 100 0 100 0 bs=8")   # every layer streams from disk
    cold = predict(spec, prof, torch.float16, 128, 8, policy, {"spare_ram": 0})
    warm = predict(spec, prof, torch.float16, 128, 8, policy, {"spare_ram": 100 * GiB})
    assert warm.disk_cached and not cold.disk_cached and warm.tokens_per_s > 2 * cold.tokens_per_s


def test_cpu_limits_are_one_ram_budget():
    """On a CPU the runner keeps every layer it does not stream resident in the one RAM: the planner
    budgets the smaller of --device-mem / --host-mem as "device", nothing as "host"."""
    prof = cpu_profile()
    both = limits_for(EngineConfig(model="x", device="cpu", device_mem="3GiB", host_mem="1GiB"), prof)
    assert both["device"] == 1 * GiB and both["host"] == 0 and both["disk"] == 0
    one = limits_for(EngineConfig(model="x", device="cpu", host_mem="2GiB", offload_dir="/tmp"), prof)
    assert one["device"] == 2 * GiB and one["disk"] > 0
    gpu = limits_for(EngineConfig(model="x", device="cpu", device_mem="3GiB", host_mem="1GiB"), gpu_profile())
    assert gpu["device"] == 3 * GiB and gpu["host"] == 1 * GiB
