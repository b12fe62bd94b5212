"""weights/light_config.py and weights/light_tokenizer.py: what a GGUF checkpoint gives without transformers
must equal what transformers gives for the same inputs (config fields the model reads; encode, decode and
the chat template)."""

import copy
import json

import pytest
import torch

from tidal.weights.light_config import LightConfig
from tidal.weights.light_tokenizer import LightTokenizer
from tidal.weights.loader import DEFAULT_MODEL, open_checkpoint

# every config field tidal's model code, resolve step, planner and loaders read
READ_FIELDS = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "vocab_size",
               "max_position_embeddings", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
               "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "_name_or_path"]


@pytest.fixture(scope="module")
def smollm2():
    return open_checkpoint(DEFAULT_MODEL)


def _same_as_transformers(light: LightConfig):
    from transformers import AutoConfig

    ref = AutoConfig.for_model(**light._kwargs)
    for name in READ_FIELDS:
        assert getattr(light, name) == getattr(ref, name), name
    for name, value in light.to_dict().items():  # and every other field it has
        assert value == getattr(ref, name), name
    assert light.torch_dtype == ref.dtype


def test_smollm2_config_matches_transformers(smollm2):
    assert isinstance(smollm2.hf_config, LightConfig)
    _same_as_transformers(smollm2.hf_config)
    assert smollm2.hf_config.to_transformers().to_dict() == \
        __import__("transformers").AutoConfig.for_model(**smollm2._gguf_index["config"]).to_dict()


@pytest.mark.parametrize("kwargs", [
    {"hidden_size": 64, "num_attention_heads": 4},   # the class defaults fill the rest
    {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 100,
     "tie_word_embeddings": True, "eos_token_id": 7, "architectures": ["LlamaForCausalLM"],
     "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}},
])
def test_defaults_match_transformers(kwargs):
    _same_as_transformers(LightConfig(model_type="llama", **kwargs))


def test_scaled_rope_same_table_as_transformers_config():
    from transformers import LlamaConfig

    from tidal.model.layers.rotary import RotaryEmbedding

    kw = {"hidden_size": 64, "num_attention_heads": 4,
          "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
    ours, ref = RotaryEmbedding(LightConfig(model_type="llama", **kw), 16, 64), RotaryEmbedding(LlamaConfig(**kw), 16, 64)
    assert torch.equal(ours.cos, ref.cos) and torch.equal(ours.sin, ref.sin)


def test_save_pretrained_keeps_later_attributes(tmp_path, smollm2):
    """What `tidal quantize` does with a checkpoint's config: deepcopy, set attributes, save."""
    from transformers import AutoConfig

    config = copy.deepcopy(smollm2.hf_config)
    config.tidal_quantization = {"bits": 4, "group_size": 32}
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert back.tidal_quantization == {"bits": 4, "group_size": 32} and back.dtype == torch.bfloat16
    assert back.num_hidden_layers == 30 and back.rope_parameters == smollm2.hf_config.rope_parameters
    assert smollm2.hf_config.dtype is None  # the copy, not the checkpoint's own config


# ---- the tokenizer ----------------------------------------------------------------------------------------
TEXTS = ["Hello, world!", "  leading spaces\tand tabs\n", "<|im_start|>user\nhi<|im_end|>", "日本語とemoji 🤖",
         "x=1+2;", "", " ", "The capital of France is", "<|endoftext|>a<|im_end|>\n\n"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "ünïcödé <|im_end|> and {{ braces }}", "name": None}],
    [{"role": "assistant", "content": "only me"}],
]


@pytest.fixture(scope="module")
def tokenizers(smollm2):
    from transformers import AutoTokenizer

    return LightTokenizer(smollm2.tokenizer_dir), AutoTokenizer.from_pretrained(smollm2.tokenizer_dir)


def test_encode_decode_match_transformers(tokenizers):
    light, ref = tokenizers
    for text in TEXTS:
        for special in (True, False):
            ids = light.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                for clean in (None, False):
                    assert light.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                        ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), (text, skip)
    assert light.decode(2) == ref.decode(2) and light.decode([198, 198]) == ref.decode([198, 198])
    assert light.decode([0xE6 + 100, 30]) == ref.decode([0xE6 + 100, 30])


def test_special_tokens_match_transformers(tokenizers):
    light, ref = tokenizers
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(light, name) == getattr(ref, name), name
        assert getattr(light, name + "_id") == getattr(ref, name + "_id"), name
    assert light.special_tokens_map == ref.special_tokens_map
    assert len(light) == len(ref) and light.chat_template == ref.chat_template


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(tokenizers, chat):
    light, ref = tokenizers
    for gen in (True, False):
        assert light.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
            ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        assert light.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False) == \
            list(ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False))
        ours = light.apply_chat_template(chat, add_generation_prompt=gen)
        theirs = ref.apply_chat_template(chat, add_generation_prompt=gen)
        assert ours["input_ids"] == list(theirs["input_ids"])
        assert ours["attention_mask"] == list(theirs["attention_mask"])
    assert chat == json.loads(json.dumps(chat))  # the caller's messages are not changed


def test_everything_else_goes_to_transformers(tokenizers):
    light, ref = tokenizers
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    chat = CHATS[0]
    assert light.apply_chat_template(chat, tools=tools, tokenize=False) == \
        ref.apply_chat_template(chat, tools=tools, tokenize=False)
    assert light.convert_ids_to_tokens([1, 2, 42]) == ref.convert_ids_to_tokens([1, 2, 42])
    assert light.get_vocab() == ref.get_vocab() and light.all_special_ids == ref.all_special_ids
    assert type(light.hf_tokenizer) is type(ref)
    clone = copy.deepcopy(light)
    assert clone.encode("deep copy") == ref.encode("deep copy")
