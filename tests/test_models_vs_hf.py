"""Logits of tidal's models equal transformers' on the same random weights (fp32, <= 1e-4)."""
import pytest
import torch
import transformers

from model_utils import all_logits, make_runner

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "llama3-rope-tied": lambda: transformers.LlamaConfig(
        **TINY, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "opt": lambda: transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256,
                                          word_embed_proj_dim=32, pad_token_id=1),
    "opt-postnorm": lambda: transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                   num_attention_heads=4, max_position_embeddings=256,
                                                   do_layer_norm_before=False, pad_token_id=1),
}
LENGTHS = [1, 5, 17, 40]


def _hf_model(kind):
    torch.manual_seed(0)
    cfg = CONFIGS[kind]()
    cfg.architectures = [{"llama": "LlamaForCausalLM", "llama3-rope-tied": "LlamaForCausalLM",
                          "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                          "opt": "OPTForCausalLM", "opt-postnorm": "OPTForCausalLM"}[kind]]
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # random biases, so a missing bias shows up as a mismatch
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _prompts(n_lengths=LENGTHS, vocab=128):
    g = torch.Generator().manual_seed(1)
    # OPT's HF model treats id 1 as padding in its learned positions; keep it out of prompts
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in n_lengths]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_hf(kind):
    hf = _hf_model(kind)
    runner = make_runner(hf)
    prompts = _prompts()
    batched = all_logits(runner, prompts)
    for p, ours in zip(prompts, batched):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4, kind
    # unbatched and chunked (prefill in pieces over the paged cache) give the same logits
    for p, ours in zip(prompts, batched):
        alone = all_logits(runner, [p])[0]
        assert (alone - ours).abs().max().item() <= 1e-4
    chunked = all_logits(runner, prompts, chunk=7)
    for a, b in zip(chunked, batched):
        assert (a - b).abs().max().item() <= 1e-4


def test_packed_bf16_linears_match_plain():
    """The backend's packed weight layout (oneDNN on CPU bf16) computes the same logits."""
    hf = _hf_model("llama")
    prompts = _prompts()
    plain = all_logits(make_runner(hf, dtype="bfloat16", pack=False), prompts)
    packed_runner = make_runner(hf, dtype="bfloat16", pack=True)
    packed = all_logits(packed_runner, prompts)
    assert any(getattr(m, "packed", None) is not None for m in packed_runner.model.modules())
    for a, b in zip(plain, packed):
        assert (a - b).abs().max().item() <= 2e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_half_precision_runs_close_to_fp32(kind, dtype):
    hf = _hf_model(kind)
    prompts = _prompts()
    ref = all_logits(make_runner(hf), prompts)
    half = all_logits(make_runner(hf, dtype=dtype, pack=True), prompts)
    for a, b in zip(ref, half):
        assert (a - b).abs().max().item() <= 5e-2
