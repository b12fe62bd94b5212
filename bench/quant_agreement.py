"""How often a compressed SmolLM2 picks the same next token as the fp32 model: teacher-forced top-1
agreement over the perplexity eval's text (tidal/eval/perplexity.py: 4096 tokens of pydoc_data.topics,
prefilled in chunks of 1024), per --quant / --quant-head setting. Perplexity averages the whole
distribution; this counts the greedy choices that flip, which is what a greedy answer sees.

    python bench/quant_agreement.py [--tokens 4096] [--configs "int8,w8a8"]
"""
from __future__ import annotations

import argparse

from tidal.eval.perplexity import build_llm, reference_tokens
from tidal.sampling import SamplingParams

CONFIGS = {"int8": {"quant": "int8"}, "int4": {"quant": "int4"}, "w8a8": {"quant": "w8a8"},
           "w8a8 + w8a8 head": {"quant": "w8a8", "quant_head": "w8a8"}, "w8a8 head": {"quant_head": "w8a8"},
           "int8 head": {"quant_head": "int8"}}


def top1(model: str, token_ids: list[int], chunk: int, **engine_args) -> list[int]:
    llm = build_llm(model, len(token_ids), chunk, **engine_args)
    out = llm.generate([{"prompt_token_ids": token_ids}],
                       SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)[0]
    # each position's entry holds the actual next token and the top-1; the top-1 has the highest logprob
    return [max(entry.items(), key=lambda kv: kv[1])[0] for entry in out.prompt_logprobs[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    a = ap.parse_args()
    probe = build_llm(a.model, a.tokens, a.chunk)
    ids = reference_tokens(probe.tokenizer, a.tokens)
    del probe
    base = top1(a.model, ids, a.chunk)
    print(f"top-1 agreement with fp32 over {len(base)} positions of pydoc_data.topics ({a.model})")
    for name in [n.strip() for n in a.configs.split(",")]:
        got = top1(a.model, ids, a.chunk, **CONFIGS[name])
        same = sum(x == y for x, y in zip(base, got))
        print(f"{name:18s} {same / len(base):7.2%}  ({len(base) - same} flips)")


if __name__ == "__main__":
    main()
