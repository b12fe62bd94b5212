"""Checks that need CUDA (skipped without it): the same contracts as the CPU suite, on the GPU."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_logits_on_cuda(dtype):
    from model_utils import all_logits
    from tidal import LLM
    cpu = LLM("smollm2", dtype="float32", device="cpu", num_kv_blocks=256)
    gpu = LLM("smollm2", dtype=dtype, device="cuda", num_kv_blocks=256)
    prompts = [cpu.tokenizer.encode(p) for p in ["The capital of France is", "def add(a, b):"]]
    for a, b in zip(all_logits(cpu.engine.runner, prompts), all_logits(gpu.engine.runner, prompts)):
        tol = 1e-3 if dtype == "float32" else 0.5
        assert (a - b.cpu()).abs().max().item() <= tol


def test_greedy_generation_on_cuda():
    from tidal import LLM, SamplingParams
    llm = LLM("smollm2", dtype="bfloat16", device="cuda")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.text
