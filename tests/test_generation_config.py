"""Default sampling comes from the model's generation config (vLLM's rule), and `tidal chat` stops at
the end of its turn with a bounded reply instead of greedy 512-token loops."""
import json

import pytest

from tidal.errors import TidalError
from tidal.weights.generation_config import generation_defaults


def test_checkpoint_generation_config_is_read(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 300, "eos_token_id": [7, 9],
         "do_sample": True, "bos_token_id": 1}))
    defaults, eos = generation_defaults(str(tmp_path), str(tmp_path), "auto")
    assert defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 300}
    assert eos == {7, 9}


def test_vllm_ignores_it_and_a_folder_overrides(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    assert generation_defaults(str(tmp_path), str(tmp_path), "vllm") == ({}, set())
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.9, "top_k": 0}))
    assert generation_defaults(str(tmp_path), str(tmp_path), str(other))[0] == {"temperature": 0.9}
    with pytest.raises(TidalError, match="generation_config.json"):
        generation_defaults(str(tmp_path), str(tmp_path), str(tmp_path / "missing"))


def test_no_generation_config_means_no_overrides(tmp_path):
    assert generation_defaults(str(tmp_path), str(tmp_path), "auto") == ({}, set())


def test_smollm2_alias_uses_its_model_card_settings():
    from tidal import LLM
    llm = LLM("smollm2", dtype="float32", max_model_len=128, num_kv_blocks=16)
    assert llm.engine.default_sampling == {"temperature": 0.2, "top_p": 0.9}
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p) == (0.2, 0.9)
    from tidal.engine.async_engine import AsyncEngine
    assert AsyncEngine(llm.engine, start=False).default_sampling == {"temperature": 0.2, "top_p": 0.9}   # -> server
    llm_plain = LLM("smollm2", dtype="float32", max_model_len=128, num_kv_blocks=16, generation_config="vllm")
    assert llm_plain.get_default_sampling_params().temperature == 1.0
