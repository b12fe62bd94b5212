"""The CPU backend's fused elementwise ops (kernels/cpu/fused_ops.cpp) equal the torch reference
ops: in bf16 within one rounding step (they round where the reference rounds, but their fp32
reductions and exp are not torch's, so a value on a rounding tie can land on the other side);
within 1e-5 relative in fp32."""
import pytest
import torch

from tidal.kernels import cpu, get_backend, torch_ops


@pytest.fixture(scope="module")
def backend():
    assert cpu.load() is not None, "the CPU kernel failed to build (see stderr)"
    return get_backend("cpu")


def _close(a, b, dtype):
    a, b = a.float(), b.float()
    if dtype == torch.bfloat16:  # one bf16 ulp, and nearly every element exact
        assert ((a - b).abs() <= b.abs() * 2 ** -7 + 1e-30).all()
        assert (a != b).float().mean().item() < 0.01
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(backend, dtype):
    gu = (torch.randn(33, 2 * 40) * torch.tensor([1.0, 30.0, 200.0]).repeat_interleave(11)[:, None]).to(dtype)
    _close(backend.silu_and_mul(gu), torch_ops.silu_and_mul(gu), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_on_fused_qkv_views(backend, dtype):
    torch.manual_seed(0)
    T, h, kvh, d = 11, 6, 2, 16
    qkv = torch.randn(T, (h + 2 * kvh) * d).to(dtype)
    q, k, _ = qkv.split([h * d, kvh * d, kvh * d], dim=-1)      # strided views, as in the model
    cos, sin = torch.randn(64, d // 2), torch.randn(64, d // 2)
    pos = torch.randint(0, 64, (T,))
    ref_q, ref_k = torch_ops.rotary(q.view(T, h, d), k.view(T, kvh, d), cos, sin, pos)
    out_q, out_k = backend.rotary(q.view(T, h, d), k.view(T, kvh, d), cos, sin, pos)
    _close(out_q, ref_q, dtype)
    _close(out_k, ref_k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 2048, 4096, 100, 7, 1000])
def test_rms_norm_is_bit_identical_to_torch(backend, dtype, hidden):
    """Not within a tolerance: equal. In bf16 a one-ulp difference can flip a near-tie greedy token
    (kernels/cpu/rms_norm.cpp follows ATen's summation order to avoid exactly that)."""
    torch.manual_seed(hidden)
    rows = 37
    scale = torch.rand(rows, 1) * 8 + 0.01
    x = (torch.randn(rows, hidden) * scale).to(dtype)
    res = (torch.randn(rows, hidden) * scale).to(dtype)
    w = (torch.rand(hidden) * 2).to(dtype)
    assert torch.equal(backend.rms_norm(x, None, w, 1e-5), torch_ops.rms_norm(x, None, w, 1e-5))
    res_ref = res.clone()
    out, new_res = backend.rms_norm(x, res, w, 1e-6)
    ref, ref_res = torch_ops.rms_norm(x, res_ref, w, 1e-6)
    assert torch.equal(out, ref) and torch.equal(new_res, ref_res) and torch.equal(res, ref_res)


@pytest.mark.parametrize("rows", [1, 3, 4, 5])
@pytest.mark.parametrize("shape", [(96, 192), (7, 38)])   # (7, 38): rows not a multiple of 4, inputs not of 16
def test_prepacked_bf16_linear_at_decode_rows(backend, rows, shape):
    """Up to BF16_GEMV_MAX_ROWS rows a prepacked bf16 linear that kept its plain weight (the LM head) runs
    bf16_gemv (fp32 sums, rounded once to bf16), above it oneDNN, as does one whose weight was dropped
    (a layer's): all are the float product within bf16 rounding (and the bias added)."""
    from tidal.kernels import BF16_GEMV_MAX_ROWS
    assert BF16_GEMV_MAX_ROWS == 4
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    bias = torch.randn(shape[0], generator=g).to(torch.bfloat16)
    x = torch.randn(rows, shape[1], generator=g).to(torch.bfloat16)
    packed = backend.pack_linear(w)
    if packed is None:
        pytest.skip("no oneDNN bf16 prepacking in this torch")
    want = x.float() @ w.float().T + bias.float()
    for b in (None, bias):
        y = backend.linear(x, w, b, packed)
        ref = want if b is not None else want - bias.float()
        assert y.dtype == torch.bfloat16 and y.shape == (rows, shape[0])
        assert ((y.float() - ref).abs() <= 2 ** -7 * ref.abs() + 2 ** -6 * ref.abs().max()).all()
    dropped = backend.linear(x, torch.empty(0, dtype=torch.bfloat16), bias, packed)   # a packed layer's
    assert ((dropped.float() - want).abs() <= 2 ** -7 * want.abs() + 2 ** -6 * want.abs().max()).all()
    exact = cpu.load().bf16_gemv(x.float(), w)         # fp32 rows: fp32 sums, no rounding of the output
    torch.testing.assert_close(exact, want - bias.float(), rtol=1e-5, atol=1e-5)
