"""SmoothQuant for --quant w8a8 (model/smooth.py): the calibration pass sees every linear layer's input and
leaves the model as it was, smoothing is exact before rounding and cuts the rounding error where a few
channels carry outliers, and quantize_model smooths exactly the layers it has maxima for."""
import torch

from model_utils import all_logits, make_runner
from test_int4_kernels import _tiny
from tidal.model.layers.linear import Linear
from tidal.model.layers.quant_linear import QuantLinear
from tidal.model.quantize import quantize_model
from tidal.model.smooth import activation_maxima, calibration_text, smoothing_factors
from tidal.weights.quant import quantize


def _w8a8(weight, act_max=None):
    if act_max is None:
        return QuantLinear(quantize(weight, 8, None, symmetric=True), path="w8a8")
    s = smoothing_factors(act_max, weight)
    return QuantLinear(quantize(weight * s, 8, None, symmetric=True), path="w8a8", act_scale=1 / s)


def test_smoothing_cuts_the_rounding_error_of_outlier_channels(w8a8_ext):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 128, generator=g) * 0.05
    x = torch.randn(64, 128, generator=g)
    x[:, [3, 77, 100]] *= 60                       # a few channels tens of times larger, as in LLM activations
    exact = x @ weight.T
    plain = (_w8a8(weight)(x) - exact).norm()
    smoothed = (_w8a8(weight, x.abs().amax(0))(x) - exact).norm()
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_smoothing_alone_changes_nothing():
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(64, 32, generator=g), torch.randn(8, 32, generator=g)
    s = smoothing_factors(x.abs().amax(0) * 10, weight)
    assert s.shape == (32,) and (s > 0).all()
    torch.testing.assert_close((x / s) @ (weight * s).T, x @ weight.T, rtol=1e-5, atol=1e-5)


def test_activation_maxima_cover_every_linear_and_leave_the_model_as_it_was():
    runner = make_runner(_tiny("llama"))
    prompts = [list(range(3, 43))]
    before = all_logits(runner, prompts)[0]
    maxima = activation_maxima(runner.model, list(range(5, 60)))
    linears = {n: m for n, m in runner.model.named_modules() if isinstance(m, Linear)}
    assert set(maxima) == set(linears) and len(linears) == 8      # 2 layers x (qkv, o, gate_up, down)
    for name, m in linears.items():
        assert maxima[name].shape == (m.in_features,) and (maxima[name] >= 0).all() and maxima[name].max() > 0
        assert "forward" not in vars(m)                          # the observer is gone
    torch.testing.assert_close(all_logits(runner, prompts)[0], before)
    again = activation_maxima(runner.model, list(range(5, 60)))
    assert all(torch.equal(again[n], maxima[n]) for n in maxima)


def test_quantize_model_smooths_the_layers_it_has_maxima_for(w8a8_ext):
    runner = make_runner(_tiny("llama"))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 40)]
    ref = torch.cat(all_logits(runner, prompts))
    maxima = activation_maxima(runner.model, torch.randint(0, 128, (64,), generator=g).tolist())
    skipped = "layers.1.mlp.down_proj"
    paths = quantize_model(runner.model, 8, None, w8a8=True, act_maxima={n: a for n, a in maxima.items() if n != skipped})
    assert set(paths.values()) == {"w8a8"}
    smoothed = {n: m.smoothed for n, m in runner.model.named_modules() if isinstance(m, QuantLinear)}
    assert smoothed == {n: n != skipped for n in maxima}
    got = torch.cat(all_logits(runner, prompts))
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    assert 0 < err <= 0.05 * span, (err, span)


def test_calibration_text_is_fixed_and_long_enough():
    text = calibration_text()
    assert text == calibration_text() and len(text) > 8 * 1024   # ~4 characters a token: over 1k tokens
    import pydoc_data.topics                                       # never the perplexity evaluation's text
    assert not any(t[:200] in text for t in pydoc_data.topics.topics.values() if len(t) > 200)


def test_engine_calibrates_a_small_model_within_its_length_and_vocabulary(tmp_path):
    """--quant w8a8 through LLM: a model of 256 positions and 128 ids, with SmolLM2's tokenizer (49k ids),
    calibrates on what fits, smooths every layer, and generates."""
    import transformers

    from test_offload import _save
    from tidal import LLM, SamplingParams
    from tidal.weights.loader import open_checkpoint
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    path = _save(tmp_path / "m", cfg, open_checkpoint("smollm2").load_tokenizer())
    llm = LLM(path, device="cpu", dtype="float32", quant="w8a8", num_kv_blocks=64)
    layers = [m for m in llm.engine.core.runner.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 8 and all(m.smoothed and m.path == "w8a8" for m in layers)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
