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
