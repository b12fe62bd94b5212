"""Weight quantization: weights/quant.py (round trip, packing, GGUF Q4_1), QuantLinear's matmul paths,
and quantize_model on a tiny Llama (logits near the unquantized model's)."""
import gguf
import pytest
import torch
import transformers

from model_utils import all_logits, make_runner
from tidal.errors import TidalError
from tidal.model.layers.linear import Linear, MergedLinear
from tidal.model.layers.quant_linear import QuantLinear, fitting_paths
from tidal.weights.loader import resolve_model_path
from tidal.weights.quant import dequantize, from_gguf_q4_1, quantize
from tidal.model.quantize import quantize_model


def _weight(out=96, inp=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05 + torch.rand(out, 1, generator=g) * 0.1  # offset rows


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_round_trip_error_at_most_half_a_step(bits, group_size, scale_dtype):
    w = _weight()
    qw = quantize(w, bits, group_size, scale_dtype)
    g = group_size or w.shape[1]
    assert qw.shape == tuple(w.shape) and qw.qdata.dtype == torch.uint8
    assert qw.qdata.shape == (96, 192 * bits // 8) and qw.scale.shape == qw.min.shape == (96, 192 // g)
    assert qw.scale.dtype == qw.min.dtype == scale_dtype
    err = (dequantize(qw) - w).abs().reshape(96, -1, g).amax(-1)
    assert (err <= qw.scale.float() / 2 + 1e-6).all()
    assert err.max() > qw.scale.float().max() / 8  # really quantized, not a float copy


def test_int4_nibble_layout_and_exact_integers():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (8, 64), generator=g)
    q[:, 0], q[:, 33] = 0, 15  # every group of 32 spans 0..15, so scale 1 and min 0 make w == q
    q[:, 32], q[:, 1] = 0, 15
    qw = quantize(q.float(), 4, 32)
    assert torch.equal(qw.scale.float(), torch.ones(8, 2)) and torch.equal(qw.min.float(), torch.zeros(8, 2))
    assert torch.equal(qw.unpacked().reshape(8, 64), q.to(torch.uint8))
    # byte j of a group: value j low, value j + 16 high (GGUF Q4_1's order)
    assert torch.equal(qw.qdata[:, :16], (q[:, :16] | (q[:, 16:32] << 4)).to(torch.uint8))
    assert torch.equal(dequantize(qw), q.float())


def test_constant_groups_are_exact():
    w = _weight(16, 64)
    w[0, :32], w[1, 32:], w[2], w[3, :32] = 0.25, -1.25, 0.0, 0.3
    for bits in (4, 8):
        for scale_dtype in (torch.float16, torch.float32):
            qw = quantize(w, bits, 32, scale_dtype)
            d = dequantize(qw)
            assert qw.scale[0, 0] == qw.scale[1, 1] == qw.scale[2, 1] == 0
            assert torch.equal(d[0, :32], torch.full((32,), 0.25)) and torch.equal(d[2], torch.zeros(64))
            assert torch.equal(d[1, 32:], torch.full((32,), -1.25))
            # 0.3 has no fp16 form: min rounds down, and a tiny step reaches back up to it
            assert (d[3, :32] - 0.3).abs().max() <= (0 if scale_dtype == torch.float32 else 1e-5)


def test_group_size_must_divide_input():
    with pytest.raises(ValueError, match="divide the input size 96"):
        quantize(torch.randn(4, 96), 4, 64)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 64), 3, 32)


def test_gguf_q4_1_maps_exactly():
    reader = gguf.GGUFReader(resolve_model_path("smollm2"))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    qw = from_gguf_q4_1(t.data)
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert qw.bits == 4 and qw.group_size == 32 and qw.shape == tuple(ref.shape) == (192, 576)
    assert torch.equal(dequantize(qw), ref)
    # min/max quantization at group 32 finds Q4_1's own grid again: lossless from fp32 weights
    assert torch.equal(dequantize(quantize(ref, 4, 32)), ref)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    y, want = QuantLinear(qw, path="int4pack")(x).float(), x.float() @ ref.T
    assert (y - want).abs().max() <= 1e-2 * want.abs().max()


_PATHS = [(4, 64, "int4pack"), (4, 32, "int4pack"), (8, None, "int8pack"),
          (4, 64, "dequant"), (8, 32, "dequant"), (4, 48, "dequant")]


@pytest.mark.parametrize("bits,group_size,path", _PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_dequantized_weights(bits, group_size, path, dtype):
    w, bias = _weight(), torch.randn(96) * 0.1
    qw = quantize(w, bits, group_size)
    assert path in fitting_paths(qw, torch.device("cpu"))
    layer = QuantLinear(qw, bias.to(dtype), out_sizes=[64, 32], path=path)
    x = torch.randn(2, 5, 192).to(dtype)
    want = x.float() @ dequantize(qw).T + bias.to(dtype).float()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    # fp32 dequant is exact up to summation order; the kernels (and bf16) round in bf16
    tol = 1e-5 if (path == "dequant" and dtype == torch.float32) else 1e-2
    assert (y.float() - want).abs().max() <= tol * want.abs().max()
    a, b = layer.forward_split(x)
    assert torch.equal(torch.cat([a, b], -1), y) and a.shape[-1] == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8pack_runs_tidal_gemv_and_dequantizes_big_batches(dtype):
    """Over INT8_GEMV_MAX_ROWS rows, --quant int8's layers dequantize (int8_rows_dequant) and run the float
    GEMM; up to it, tidal's int8 GEMV (int8_rows_gemv, fp32 math). In fp32 both are the dequantized
    weights' product up to summation order."""
    from tidal.kernels import cpu, quant_ops
    assert cpu.load() is not None, "the CPU kernels failed to build (see stderr)"
    qw = quantize(_weight(), 8, None)
    layer = QuantLinear(qw, path="int8pack")
    x = torch.randn(quant_ops.GEMV_MAX_ROWS + 24, 192).to(dtype)
    want = x.float() @ dequantize(qw).T
    y = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and (y.float() - want).abs().max() <= tol * want.abs().max()
    for rows in (1, 4, quant_ops.INT8_GEMV_MAX_ROWS, quant_ops.INT8_GEMV_MAX_ROWS + 1, 16):
        small = layer(x[:rows])
        assert small.dtype == dtype and (small.float() - want[:rows]).abs().max() <= tol * want.abs().max(), rows
    gemv = cpu.load().int8_rows_gemv                # its tiles: rows 1-16 (6 + 6 + 4), every row tail
    for rows in (7, 13, 16):
        xr, layer_q = x[:rows].contiguous(), layer.packed
        got = gemv(xr, layer_q[0], layer_q[3], layer_q[2]).float()
        assert (got - want[:rows]).abs().max() <= tol * want.abs().max(), rows
    odd = quantize(torch.randn(7, 38), 8, None)     # rows not a multiple of 4, inputs not of 16
    xo = torch.randn(3, 38).to(dtype)
    yo, wo = QuantLinear(odd, path="int8pack")(xo).float(), xo.float() @ dequantize(odd).T
    assert (yo - wo).abs().max() <= tol * wo.abs().max()


def test_dense_min_rows_switches_path_for_big_batches():
    qw = quantize(_weight(), 4, 64)
    layer = QuantLinear(qw, dense_min_rows=16)
    assert layer.path == "int4pack" and layer.qw is not None
    x = torch.randn(20, 192)
    exact = x @ dequantize(qw).T
    assert torch.allclose(layer(x), exact, atol=1e-5)  # 20 rows: fp32 dequantize path, exact
    small = layer(x[:4])
    assert not torch.allclose(small, exact[:4], atol=1e-5)  # 4 rows: the bf16 kernel
    assert (small - exact[:4]).abs().max() <= 1e-2 * exact.abs().max()


def test_env_forces_path(monkeypatch):
    qw = quantize(_weight(), 4, 64)
    monkeypatch.setenv("TIDAL_QUANT_PATH", "dequant")
    assert QuantLinear(qw).path == "dequant"
    monkeypatch.setenv("TIDAL_QUANT_PATH", "int8pack")  # does not fit int4: ignored
    assert QuantLinear(qw).path == "int4pack"


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_reference():
    hf = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 7, 20)]
    return hf, prompts, torch.cat(all_logits(make_runner(hf), prompts))


# measured: int8 per row 0.4% of the logit range, int4 5%, fp32 and bf16 alike; a wrong nibble order is ~100%
@pytest.mark.parametrize("bits,group_size,dtype,bound", [(8, 0, "float32", 0.01), (4, 64, "float32", 0.12),
                                                         (4, 0, "float32", 0.12), (4, 0, "bfloat16", 0.12)])
def test_quantize_model_logits_near_fp32(tiny_reference, bits, group_size, dtype, bound):
    hf, prompts, ref = tiny_reference
    runner = make_runner(hf, dtype=dtype)
    model = runner.model
    lm_head, embed = model.lm_head.weight, model.embed_tokens.weight
    paths = quantize_model(model, bits, group_size)
    kernel = {8: "int8pack", 4: fitting_paths(quantize(_weight(), 4, group_size or 32), torch.device("cpu"))[0]}[bits]
    assert len(paths) == 2 * 4 and set(paths.values()) == {kernel}
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and qkv.out_sizes == [64, 32, 32]
    assert qkv.group_size == (group_size or {4: 32, 8: 64}[bits])  # int8 default: one group per row (64)
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert model.lm_head.weight is lm_head and model.embed_tokens.weight is embed
    got = torch.cat(all_logits(runner, prompts))
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    assert err <= bound * span, (err, span)
    assert err > 1e-4 * span  # the weights really changed


def test_quantize_model_rejects_bad_group_size(tiny_reference):
    model = make_runner(tiny_reference[0]).model
    with pytest.raises(TidalError, match="cannot quantize .*divide the input size"):
        quantize_model(model, 4, 96)
    assert isinstance(model.layers[0].mlp.gate_up_proj, MergedLinear)  # nothing was swapped
    with pytest.raises(TidalError, match="int8 or int4"):
        quantize_model(model, 2)


def test_quantize_head_int4(tiny_reference):
    """--quant-head int4: the LM head runs the int4 kernel on a copy (an untied float head is dropped, a
    tied one keeps serving the embedding); logits stay near the float head's."""
    from tidal.model.quantize import quantize_head
    hf, prompts, ref = tiny_reference
    runner = make_runner(hf)
    head = runner.model.lm_head
    kernel = fitting_paths(quantize(_weight(), 4, 32), torch.device("cpu"))[0]   # int4vnni where built, else int4pack
    assert not head.tied and quantize_head(runner.model) == kernel
    assert isinstance(head.quantized, QuantLinear) and head.weight.numel() == 0
    got = torch.cat(all_logits(runner, prompts))
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    assert 1e-4 * span < err <= 0.12 * span, (err, span)
    assert quantize_head(runner.model) == kernel   # twice is once
    with pytest.raises(TidalError, match="quant-head int4: group size 96"):
        quantize_head(make_runner(hf).model, 4, 96)
