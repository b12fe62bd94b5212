"""Quantized weights that skip re-quantizing at load: GGUF Q4_1 straight into int4, `tidal quantize`
directories (write, reload, errors), the fused-shard stacking behind both, and the quantized-matmul
path choice living in the kernel backend."""
import json
import os
import time

import pytest
import torch
import transformers

from model_utils import all_logits, make_runner
from tidal.cli import main
from tidal.config import EngineConfig
from tidal.engine.model_runner import ModelRunner
from tidal.errors import TidalError
from tidal.kernels import get_backend
from tidal.model.layers.linear import MergedLinear
from tidal.model.layers.quant_linear import QuantLinear
from tidal.quantize import quantize_checkpoint
from tidal.model import quantize as qm
from tidal.weights.loader import open_checkpoint
from tidal.weights.quant import dequantize, quantize

_SMOL_PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 140))]


def test_backend_picks_the_quantized_matmul(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    cpu = get_backend("cpu")
    from tidal.kernels import cpu as cpu_kernels
    ext = cpu_kernels.load()   # tidal's own int4 kernels come first where the build has AVX-512 VNNI
    best = ("int4vnni",) if ext is not None and ext.int4_gemv_supported() else ()
    assert cpu.quant_linear_paths(quantize(w, 4, 32)) == best + ("int4pack",)
    assert cpu.quant_linear_paths(quantize(w, 4, 64)) == ("int4pack",)
    from tidal.kernels.quant_ops import _has_int_mm   # w8a8 fits per-row int8, after int8pack (never chosen alone)
    assert cpu.quant_linear_paths(quantize(w, 8, None)) == ("int8pack",) + (("w8a8",) if _has_int_mm() else ())
    assert cpu.quant_linear_paths(quantize(w, 8, 32)) == (("int8vnni",) if best else ())
    assert QuantLinear(quantize(w, 4, 32)).path == (best + ("int4pack",))[0]
    # the layer only asks: a backend with no kernels gets the dequantize path, with the same result
    monkeypatch.setattr(type(cpu), "quant_linear_paths", lambda self, qw: ())
    layer = QuantLinear(quantize(w, 4, 32))
    x = torch.randn(3, 64, generator=g)
    assert layer.path == "dequant" and torch.allclose(layer(x), x @ dequantize(quantize(w, 4, 32)).T, atol=1e-5)


def test_merged_linear_stacks_quantized_shards():
    g = torch.Generator().manual_seed(0)
    parts = {"q": torch.randn(64, 64, generator=g), "k": torch.randn(32, 64, generator=g),
             "v": torch.randn(32, 64, generator=g)}
    m = MergedLinear(64, {"q": 64, "k": 32, "v": 32})
    for shard in ("v", "q", "k"):  # any order
        m.weight_loader(m.weight, quantize(parts[shard], 4, 32), shard)
    stacked = m.take_quantized()
    whole = quantize(torch.cat(list(parts.values())), 4, 32)  # groups never cross rows: same bits
    assert all(torch.equal(getattr(stacked, f), getattr(whole, f)) for f in ("qdata", "scale", "min"))
    # a mix (v as floats) cannot stack: the quantized shards are dequantized into the float weight
    m.weight_loader(m.weight, quantize(parts["q"], 4, 32), "q")
    m.weight_loader(m.weight, parts["v"], "v")
    assert m.take_quantized() is None
    assert torch.equal(m.weight[:64], dequantize(quantize(parts["q"], 4, 32))) and torch.equal(m.weight[96:], parts["v"])


def test_gguf_q4_1_yields_packed_rows_in_hf_order():
    ckpt = open_checkpoint("smollm2")
    floats = dict(ckpt.iter_tensors(torch.float32))
    packed = dict(ckpt.iter_tensors(torch.float32, keep_quantized=(4, 32)))
    q = packed["model.layers.0.self_attn.q_proj.weight"]
    assert (q.bits, q.group_size, q.shape) == (4, 32, (576, 576))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):  # q/k: llama.cpp's row permutation undone on blocks
        name = f"model.layers.3.self_attn.{proj}.weight"
        assert torch.equal(dequantize(packed[name]), floats[name])
    assert torch.equal(packed["model.embed_tokens.weight"], floats["model.embed_tokens.weight"])  # Q8_0: floats
    assert not any(hasattr(t, "bits") for t in ckpt.iter_tensors(torch.float32, keep_quantized=(4, 64)))


class _Requantize:
    """The checkpoint as the old path saw it: floats only, so --quant int4 re-quantizes."""
    def __init__(self, ckpt):
        self.ckpt = ckpt

    def __getattr__(self, name):
        return getattr(self.ckpt, name)

    def iter_tensors(self, dtype, keep_quantized=None):
        return self.ckpt.iter_tensors(dtype)


def _load(model, quant="none", checkpoint=None, repeat=2):
    """(runner, best wall seconds, best CPU seconds) over `repeat` loads, checkpoint opening included."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        ckpt = open_checkpoint(model)
        runner = ModelRunner(EngineConfig(model=model, dtype="float32", quant=quant, num_kv_blocks=32, block_size=16),
                             checkpoint=checkpoint(ckpt) if checkpoint else ckpt)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return runner, best_wall, best_cpu


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    dst = tmp_path_factory.mktemp("q") / "smollm2-int4"
    summary = quantize_checkpoint("smollm2", str(dst), "int4", progress=False)
    assert summary["num_quantized"] == 30 * 7 and summary["group_size"] == 32
    return str(dst)


@pytest.fixture
def count_quantize(monkeypatch):
    calls = []
    real = qm.quantize
    monkeypatch.setattr(qm, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_smollm2_int4_direct_dir_and_requantize_agree(smol_dir, count_quantize):
    old, old_wall, old_cpu = _load("smollm2", "int4", checkpoint=_Requantize)
    assert len(count_quantize) == 2 * 30 * 4  # 4 linears a layer (fused qkv, gate-up), 2 loads
    count_quantize.clear()
    direct, direct_wall, direct_cpu = _load("smollm2", "int4")
    from_dir, dir_wall, dir_cpu = _load(smol_dir)
    assert count_quantize == []  # neither re-quantizes
    ref = torch.cat(all_logits(old, _SMOL_PROMPTS))
    # Q4_1 at group 32 re-quantizes losslessly from fp32, and the kernels see the same scale/min bits
    assert torch.equal(torch.cat(all_logits(direct, _SMOL_PROMPTS)), ref)
    assert torch.equal(torch.cat(all_logits(from_dir, _SMOL_PROMPTS)), ref)
    print(f"\nsmollm2 --quant int4 load (best of 2, wall / CPU s): re-quantize {old_wall:.2f} / {old_cpu:.2f}, "
          f"Q4_1 direct {direct_wall:.2f} / {direct_cpu:.2f}, `tidal quantize` dir {dir_wall:.2f} / {dir_cpu:.2f}")
    assert dir_cpu < old_cpu and direct_cpu < old_cpu


def test_smollm2_dir_contents_and_generate(smol_dir, capfd):
    cfg = json.load(open(os.path.join(smol_dir, "config.json")))
    assert cfg["tidal_quantization"] == {"bits": 4, "group_size": 32, "format": "tidal-groupwise-v1"}
    assert os.path.isfile(os.path.join(smol_dir, "tokenizer.json"))
    ckpt = open_checkpoint(smol_dir)
    assert ckpt.quantization["bits"] == 4 and ckpt.num_tensors == 272
    assert ckpt.load_tokenizer().encode("The tide") == open_checkpoint("smollm2").load_tokenizer().encode("The tide")
    # the directory carries the alias's default sampling (there is no generation config in the GGUF)
    assert json.load(open(os.path.join(smol_dir, "generation_config.json"))) == {"temperature": 0.2, "top_p": 0.9}
    args = ["generate", "--prompt", "The capital of France is", "--max-tokens", "6", "--dtype", "float32",
            "--num-kv-blocks", "16", "--temperature", "0"]
    assert main(args + ["--model", smol_dir]) == 0
    from_dir = capfd.readouterr().out
    assert main(args + ["--model", "smollm2", "--quant", "int4"]) == 0
    assert capfd.readouterr().out == from_dir and from_dir.strip()
    assert main(args + ["--model", smol_dir, "--quant", "int8"]) == 2
    assert "conflicts with the checkpoint, which is already quantized to int4" in capfd.readouterr().err


def _tiny_llama_dir(path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("quant,group_size", [("int4", None), ("int4", 64), ("int8", None)])
def test_tiny_llama_round_trip(tmp_path, count_quantize, quant, group_size):
    hf = _tiny_llama_dir(tmp_path / "src")
    dst = tmp_path / "dst"
    quantize_checkpoint(str(tmp_path / "src"), str(dst), quant, group_size, progress=False)
    from safetensors import safe_open
    with safe_open(dst / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.uint8
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "model.layers.0.mlp.down_proj.scales" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    assert "lm_head.weight" in names  # untied head: not a Linear, so kept in the model dtype
    bits = {"int4": 4, "int8": 8}[quant]
    ref_runner = make_runner(hf)
    qm.quantize_model(ref_runner.model, bits, 0 if group_size is None else group_size)
    count_quantize.clear()
    runner = make_runner(None, checkpoint=open_checkpoint(str(dst)))
    assert count_quantize == []
    qkv = runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and qkv.bits == bits and qkv.out_sizes == [64, 32, 32]
    prompts = [[1, 2, 3, 4, 5], list(range(10, 30))]
    assert torch.equal(torch.cat(all_logits(runner, prompts)), torch.cat(all_logits(ref_runner, prompts)))


def test_bad_group_size_and_existing_dst(tmp_path, capsys):
    _tiny_llama_dir(tmp_path / "src")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    with pytest.raises(TidalError, match="cannot quantize .*group size 48 must be even and divide the input size 64"):
        quantize_checkpoint(src, dst, "int4", 48, progress=False)
    with pytest.raises(TidalError, match="--group-size 0 must be positive"):
        quantize_checkpoint(src, dst, "int4", 0, progress=False)
    with pytest.raises(TidalError, match="int4 or int8"):
        quantize_checkpoint(src, dst, "int3", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # nothing half-written
    assert main(["quantize", src, dst, "--group-size", "48"]) == 2
    assert "tidal: error: cannot quantize" in capsys.readouterr().err
    assert main(["quantize", src, dst, "--quant", "int8"]) == 0 and os.path.isfile(os.path.join(dst, "config.json"))
    with pytest.raises(TidalError, match="already exists"):
        quantize_checkpoint(src, dst, progress=False)
    with pytest.raises(TidalError, match="already quantized"):
        quantize_checkpoint(dst, str(tmp_path / "again"), progress=False)
