"""The real model: SmolLM2-135M (Q4_1 GGUF) against transformers loading the same file, fp32."""
import os

import pytest
import torch

from model_utils import all_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "To be or not to be,",
]
NEAR_TIE = 0.05


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    from tidal.weights.loader import resolve_model_path
    path = resolve_model_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module")
def llm():
    from tidal import LLM
    return LLM("smollm2", dtype="float32", device="cpu", num_kv_blocks=512)


def test_logits_match_hf(hf_model, llm):
    tok = llm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = all_logits(llm.engine.runner, prompts)
    for ids, lg in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        assert (lg - ref).abs().max().item() <= 1e-3


def test_greedy_continuations_match_hf(hf_model, llm):
    """32 greedy tokens per prompt equal HF's (EOS masked on both sides: min_new_tokens / min_tokens); where HF's top-2 logits are within 0.05 (a near-tie,
    which any rounding difference may flip) the HF token is forced and generation continues."""
    from tidal import SamplingParams
    tok = llm.tokenizer
    n_tokens, forced = 32, 0
    for text in PROMPTS[:5]:
        prompt = tok.encode(text)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n_tokens, do_sample=False,
                                    min_new_tokens=n_tokens, output_scores=True, return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, len(prompt):].tolist()
        ref_top2 = [s[0].float().topk(2).values for s in ref.scores]
        got: list[int] = []
        while len(got) < n_tokens:
            out = llm.generate([{"prompt_token_ids": prompt + got}],
                               SamplingParams(temperature=0, max_tokens=n_tokens - len(got),
                                              min_tokens=n_tokens - len(got)),
                               use_tqdm=False)[0]
            new = out.token_ids
            i = next((j for j, (a, b) in enumerate(zip(new, ref_tokens[len(got):])) if a != b), None)
            if i is None:
                got += new
                break
            pos = len(got) + i
            gap = (ref_top2[pos][0] - ref_top2[pos][1]).item()
            assert gap < NEAR_TIE, f"{text!r}: token {pos} differs from HF ({new[i]} vs {ref_tokens[pos]}), gap {gap:.3f}"
            got += new[:i] + [ref_tokens[pos]]
            forced += 1
        assert got[:n_tokens] == ref_tokens, text
    assert forced <= 3  # near-ties are rare; many forced tokens would mean the model drifts
