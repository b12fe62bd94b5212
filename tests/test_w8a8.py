"""--quant w8a8 (kernels/cpu/w8a8_linear.cpp, quant_ops' "w8a8" path): both kernels (oneDNN's GEMM on the
[out, in] weight, and tidal's VNNI GEMM on its packed panels) compute exactly their stated arithmetic (activations rounded to int8 per row, int32 products, per-row and per-token scales,
the zero-point term where the weights have one), its torch fallback agrees, quantize_model / quantize_head
put it where asked and only there, and a whole model under it stays close to the float model."""
import pytest
import torch

from model_utils import all_logits, make_runner
from test_int4_kernels import _tiny
from tidal.config import EngineConfig, weight_format
from tidal.errors import TidalError
from tidal.kernels import cpu, quant_ops
from tidal.model.quantize import quantize_head, quantize_model, resolve_quantization
from tidal.weights.quant import dequantize, quantize


def _arithmetic(x, qw, smooth=None):
    """What w8a8_linear states it computes, in float64: x (times `smooth` per channel) rounded to int8 steps
    of max|x|/127 per row, times the weight as signed bytes (q - 128) * scale, plus (min + 128 * scale) * the
    row's exact sum."""
    xf = x.float() if smooth is None else x.float() * smooth
    step = xf.abs().amax(-1, keepdim=True) / 127                   # fp32, as the kernel rounds
    xi = torch.round(xf * torch.where(step > 0, 1 / step, 0)).double()
    q = qw.qdata.double() - 128
    scale, mn = qw.scale.double().view(1, -1), qw.min.double().view(1, -1)
    return (xi @ q.T) * step.double() * scale + xf.double().sum(-1, keepdim=True) * (mn + 128 * scale)


def _tie_slack(x, qw, smooth=None):
    """[rows, out] slack for ties: -ffast-math may round x * (1 / step) a hair differently from torch, so an
    activation within 1e-5 of a .5 tie (bf16 inputs make them common) may land on the neighbouring int8 step:
    one step times the row's largest weight, per tie."""
    xs = x.float() if smooth is None else x.float() * smooth
    step = xs.abs().amax(-1, keepdim=True) / 127
    scaled = xs * torch.where(step > 0, 1 / step, 0)
    ties = ((scaled - scaled.floor() - 0.5).abs() < 1e-5).sum(-1, keepdim=True)
    return (ties * step).double() * dequantize(qw).double().abs().amax(-1).view(1, -1)


@pytest.fixture(params=["vnni", "onednn"])
def layout(request, w8a8_ext, monkeypatch):
    """Which kernel quant_ops.pack prepares the weight for: tidal's VNNI GEMM, or oneDNN's."""
    if request.param == "vnni" and quant_ops._w8a8_vnni_kernels() is None:
        pytest.skip("the kernels have no AVX-512 VNNI GEMM on this CPU (or it has AMX)")
    monkeypatch.setenv("TIDAL_W8A8_ONEDNN", "1" if request.param == "onednn" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows,k", [(1, 192), (17, 130), (300, 192)])   # 300: several row tiles; 130: k % 4 != 0
@pytest.mark.parametrize("smoothed", [False, True])
def test_kernel_is_its_stated_arithmetic(layout, dtype, symmetric, rows, k, smoothed):
    g = torch.Generator().manual_seed(rows)
    n = 5000                                            # several column tiles and VNNI panels, and a ragged one
    qw = quantize(torch.randn(n, k, generator=g) * 0.05 + 0.01, 8, None, symmetric=symmetric)
    smooth = torch.rand(k, generator=g) * 2 + 0.1 if smoothed else None
    packed = quant_ops.pack(qw, "w8a8", smooth)
    assert (packed[1] is not None) == (layout == "vnni")
    assert (packed[3] is None) == symmetric             # symmetric rows: no zero-point term at all
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    x[0] = 0                                            # an all-zero row: step 1, output 0 (+ nothing)
    got = quant_ops.matmul(x, "w8a8", packed)
    want = _arithmetic(x, qw, smooth)
    assert got.dtype == dtype and got.shape == (rows, n)
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-5)  # one output rounding; fp32 sums
    assert ((got.double() - want).abs() <= want.abs() * ulp + 1e-3 + _tie_slack(x, qw, smooth)).all()
    assert (got[0] == 0).all() if symmetric else True


@pytest.mark.parametrize("smoothed", [False, True])
def test_torch_fallback_agrees_with_the_kernel(layout, monkeypatch, smoothed):
    g = torch.Generator().manual_seed(3)
    qw = quantize(torch.randn(300, 128, generator=g), 8, None)
    packed = quant_ops.pack(qw, "w8a8", torch.rand(128, generator=g) + 0.5 if smoothed else None)
    x = torch.randn(40, 128, generator=g)
    kernel = quant_ops.matmul(x, "w8a8", packed)
    monkeypatch.setattr(cpu, "ready", lambda: None)     # kernels not built yet
    fallback = quant_ops.matmul(x, "w8a8", packed)
    smooth = packed[4]
    diff = (fallback.double() - kernel.double()).abs()
    assert (diff <= kernel.double().abs() * 1e-5 + 1e-4 + _tie_slack(x, qw, smooth)).all()


def test_vnni_panels_unpack_to_the_weight(w8a8_ext, monkeypatch):
    monkeypatch.setenv("TIDAL_W8A8_ONEDNN", "0")
    if quant_ops._w8a8_vnni_kernels() is None:
        pytest.skip("the kernels have no AVX-512 VNNI GEMM on this CPU (or it has AMX)")
    g = torch.Generator().manual_seed(5)
    for n, k in ((50, 130), (96, 64), (1, 6)):
        qw = quantize(torch.randn(n, k, generator=g), 8, None, symmetric=True)
        weight, comp, *_ = quant_ops.pack(qw, "w8a8")
        want = (qw.qdata.to(torch.int16) - 128).to(torch.int8)
        assert torch.equal(quant_ops._unpack_vnni(weight, n, k), want)
        assert torch.equal(comp[:n], 128 * want.int().sum(-1)) and not comp[n:].any()


def test_w8a8_model_and_head_stay_close_to_float(w8a8_ext):
    runner = make_runner(_tiny("llama"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 40)]
    ref = torch.cat(all_logits(runner, prompts))
    paths = quantize_model(runner.model, 8, None, w8a8=True)
    assert set(paths.values()) == {"w8a8"}
    assert quantize_head(runner.model, "w8a8") == "w8a8"
    got = torch.cat(all_logits(runner, prompts))
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    assert 0 < err <= 0.05 * span, (err, span)


def test_plain_int8_never_rounds_activations(w8a8_ext):
    runner = make_runner(_tiny("llama"))
    assert "w8a8" not in set(quantize_model(runner.model, 8, None).values())


def test_flags_and_formats():
    EngineConfig(model="m", quant="w8a8", quant_head="w8a8")   # accepted
    with pytest.raises(TidalError, match="w8a8"):
        EngineConfig(model="m", quant="w4a4")
    assert weight_format("w8a8") == "int8" and weight_format("int4") == "int4"
    assert resolve_quantization("w8a8", None) == (8, None)
    assert resolve_quantization("w8a8", {"bits": 8, "group_size": None}) == (8, None)
    with pytest.raises(TidalError, match="conflicts"):      # a GGUF / `tidal quantize` int4 checkpoint
        resolve_quantization("w8a8", {"bits": 4, "group_size": 32})
    with pytest.raises(TidalError, match="one scale per row"):
        quantize_model(make_runner(_tiny("llama")).model, 8, 32, w8a8=True)


def test_layout_name_follows_the_packing(w8a8_ext, monkeypatch):
    """An offload store keeps packed layers, so its identity carries w8a8_layout(): it must name what pack does."""
    g = torch.Generator().manual_seed(6)
    qw = quantize(torch.randn(48, 64, generator=g), 8, None, symmetric=True)
    for forced in ("1", "0"):
        monkeypatch.setenv("TIDAL_W8A8_ONEDNN", forced)
        vnni = quant_ops.pack(qw, "w8a8")[1] is not None
        assert quant_ops.w8a8_layout() == ("vnni48" if vnni else "rows")
        assert vnni == (forced == "0" and quant_ops._w8a8_vnni_kernels() is not None)
