"""tidal's own int4 CPU kernels (kernels/cpu/int4_linear.cpp, quant_ops' "int4vnni" path) and the fused
decode step (kernels/cpu/decode_stack.cpp, model/fused_decode.py): the GEMV computes exactly its stated
arithmetic (int8 activations per group of 32, fp32 min term), dequantize equals weights/quant.py's,
big batches are exact, and a fused decode step gives the same tokens as the layer-by-layer path."""
import pytest
import torch
import transformers

from model_utils import ManualScheduler, make_runner
from tidal.kernels import cpu, quant_ops
from tidal.model.fused_decode import build_fused_decode
from tidal.model.layers.quant_linear import QuantLinear
from tidal.model.quantize import quantize_model
from tidal.sampling import SamplingParams
from tidal.weights.quant import dequantize, quantize


@pytest.fixture(scope="module")
def ext():
    e = cpu.load()
    assert e is not None, "the CPU kernels failed to build (see stderr)"
    if not e.int4_gemv_supported():
        pytest.skip("this CPU has no AVX-512 VNNI: quant_ops keeps torch's int4pack kernel (tested in test_quant.py)")
    return e


def _qw(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 + torch.rand(n, 1, generator=g) * 0.1
    return quantize(w, 4, 32)


def _gemv_arithmetic(x, qw):
    """What int4_gemv / int8_gemv state they compute, in float64: each 32-group of x rounded to int8
    steps of max|x|/127, times scale * q, plus min * the group's exact sum."""
    rows, k = x.shape
    x32 = x.float().view(rows, -1, 32)
    d = x32.abs().amax(-1, keepdim=True) / 127                     # fp32, as the kernel rounds
    xi = torch.round(x32 * torch.where(d > 0, 1 / d, 0)).double()
    q = qw.unpacked().double()                                     # [n, groups, 32]
    dot = torch.einsum("rgi,ngi->rng", xi, q)                      # integer sums
    xg = x32.double()
    return (dot * qw.scale.double()[None] * d.double().squeeze(-1)[:, None]).sum(-1) + xg.sum(-1) @ qw.min.double().T


@pytest.mark.parametrize("n,k", [(40, 576), (96, 128), (17, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_int4_gemv_is_its_arithmetic(ext, n, k, rows):
    qw = _qw(n, k)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g) * torch.linspace(0.1, 3, k)    # groups of different ranges
    x[0, :32] = 0                                           # an all-zero group
    want = _gemv_arithmetic(x, qw)
    y = ext.int4_gemv(x, qw.qdata, qw.scale.half(), qw.min.half())
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    # -ffast-math may round an activation's int8 step one ulp differently, which can flip a value that
    # sits on a rounding tie by one step (~1e-4 of the output range here): nearly all match to 1e-5
    err, span = (y.double() - want).abs(), want.abs().max().item()
    assert (err <= 1e-5 * span).float().mean() >= 0.95 and (err <= 1e-3 * span).all(), err.max() / span
    # bf16 activations: the same arithmetic on the same values, then rounded to bf16
    xb = x.bfloat16()
    yb = ext.int4_gemv(xb, qw.qdata, qw.scale.half(), qw.min.half())
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, ext.int4_gemv(xb.float(), qw.qdata, qw.scale.half(), qw.min.half()).bfloat16())
    # and it is a good matmul: near the exact product (the int8 activations cost ~1%; 3% seen at in=128)
    exact = x.double() @ dequantize(qw).double().T
    assert (y.double() - exact).norm() <= 0.05 * exact.norm()


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_gemv_is_its_arithmetic(ext, rows):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(72, 320, generator=g) * 0.05
    x = torch.randn(rows, 320, generator=g)
    for qw in (quantize(w, 8, 32), quantize(w, 8, 32, symmetric=True)):
        want = _gemv_arithmetic(x, qw)
        y = ext.int8_gemv(x, qw.qdata, qw.scale.half(), qw.min.half())
        err, span = (y.double() - want).abs(), want.abs().max().item()
        assert (err <= 1e-5 * span).float().mean() >= 0.95 and (err <= 1e-3 * span).all(), err.max() / span
        out = torch.empty(72, 320)
        assert torch.equal(ext.int8_dequant(qw.qdata, qw.scale.half(), qw.min.half(), out), dequantize(qw))


def test_symmetric_int8_gives_a_q8_0_grid_back_exactly():
    """GGUF Q8_0 rows (d * q, fp16 d, |q| <= 127 with 127 reached) quantize back to themselves."""
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(40, 6, 1, generator=g) * 0.01 + 1e-3).half().float()
    q = torch.randint(-127, 128, (40, 6, 32), generator=g).float()
    q[..., 0] = 127 * torch.where(torch.rand(40, 6, generator=g) < 0.5, 1.0, -1.0)
    w = (d * q).reshape(40, 192)
    qw = quantize(w, 8, 32, symmetric=True)
    assert torch.equal(dequantize(qw), w)
    assert (dequantize(quantize(w, 8, 32)) != w).any()   # the asymmetric min/max grid does not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequant_equals_dequantize(ext, dtype):
    qw = _qw(48, 192, seed=1)
    out = torch.empty(48, 192, dtype=dtype)
    got = ext.int4_dequant(qw.qdata, qw.scale.half(), qw.min.half(), out)
    assert got.data_ptr() == out.data_ptr()
    want = dequantize(qw, torch.float32)
    tol = 0 if dtype == torch.float32 else 2 ** -8
    assert ((got.float() - want).abs() <= want.abs() * tol + 1e-7).all()


def test_quant_linear_int4vnni_paths(ext):
    qw = _qw(96, 192)
    layer = QuantLinear(qw, out_sizes=[64, 32])
    assert layer.path == "int4vnni" and layer.qdata is None   # the kernel keeps the packed bytes only
    exact = lambda x: x @ dequantize(qw).T   # noqa: E731
    few = torch.randn(quant_ops.GEMV_MAX_ROWS, 192)
    torch.testing.assert_close(layer(few), _gemv_arithmetic(few, qw).float(), rtol=1e-5, atol=1e-5)
    many = torch.randn(quant_ops.GEMV_MAX_ROWS + 1, 192)      # prefill-sized: dequantize + float GEMM, exact
    torch.testing.assert_close(layer(many), exact(many), rtol=1e-5, atol=1e-5)
    a, b = layer.forward_split(few)
    assert a.shape[-1] == 64 and b.shape[-1] == 32


def test_int8_head_runs_the_vnni_kernel(ext):
    from model_utils import all_logits
    from tidal.model.quantize import quantize_head
    runner = make_runner(_tiny("llama"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 11)]
    ref = torch.cat(all_logits(runner, prompts))
    assert quantize_head(runner.model, 8) == "int8vnni"
    got = torch.cat(all_logits(runner, prompts))
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    assert 0 < err <= 0.02 * span, (err, span)


def _tiny(arch):
    torch.manual_seed(0)
    # llama: head_dim 64, the attention kernel's split (per-thread units) path; qwen2: head_dim 32, one thread
    kw = dict(vocab_size=128, hidden_size=256 if arch == "llama" else 128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    cfg = transformers.LlamaConfig(**kw) if arch == "llama" else transformers.Qwen2Config(**kw)
    cfg.architectures = ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


class _Counting:
    def __init__(self, fused):
        self.fused, self.calls = fused, 0

    def applies(self, *a):
        return self.fused.applies(*a)

    def __call__(self, *a):
        self.calls += 1
        return self.fused(*a)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: QKV with a bias
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [4, 8])                 # 8: --quant int8's per-row int8 (int8_rows_gemv)
def test_fused_decode_gives_the_layer_path_tokens(ext, arch, dtype, bits):
    runner = make_runner(_tiny(arch), dtype=dtype)
    assert runner.fused_decode is None          # float weights: not fused
    paths = quantize_model(runner.model, bits)
    assert set(paths.values()) == {"int4vnni" if bits == 4 else "int8pack"}, paths
    fused = build_fused_decode(runner.model)
    assert fused is not None
    g = torch.Generator().manual_seed(3)
    prompts = {str(i): torch.randint(0, 128, (n,), generator=g).tolist() for i, n in enumerate((5, 17, 9))}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runner.fused_decode = counting = _Counting(fused)
    got = ManualScheduler(runner.num_blocks, runner.block_size, prompts, params).run(runner)
    assert counting.calls == 11    # every decode step ran fused (the first token comes from the prefill)
    runner.fused_decode = None
    want = ManualScheduler(runner.num_blocks, runner.block_size, prompts, params).run(runner)
    assert got == want and all(len(t) == 12 for t in got.values())
