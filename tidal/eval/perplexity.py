"""Perplexity of a model under each compression setting, on a fixed English text that ships with Python.

Owns: the reference text (`pydoc_data.topics`, topics joined in sorted key order), the table of
configurations (fp32; --quant int8 / int4 / w8a8; --kv-quant int8 / int4), and `perplexity`, which feeds the
first `n_tokens` tokens to the engine as one prompt and reads back the prompt logprobs. The prompt
is prefilled in chunks of `chunk` tokens (--max-num-batched-tokens), each chunk attending to all
earlier tokens through the paged KV cache, so a quantized cache is read back as a real run reads it.
Must not: change engine code or flags; it only builds `LLM`s.

    python -m tidal.eval.perplexity [--model smollm2] [--tokens 4096] [--chunk 1024] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from tidal.llm import LLM
from tidal.sampling import SamplingParams

# name -> engine arguments on top of fp32 on CPU
CONFIGS = {
    "fp32": {},
    "int8 weights": {"quant": "int8"},
    "int4 weights": {"quant": "int4"},
    "w8a8": {"quant": "w8a8"},
    "int8 KV": {"kv_quant": "int8"},
    "int4 KV": {"kv_quant": "int4"},
}


def reference_text() -> str:
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return "".join(topics[k] for k in sorted(topics))


def reference_tokens(tokenizer, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of the reference text (only a prefix is tokenized, with margin)."""
    text = reference_text()
    chars = n_tokens * 8
    while True:
        ids = tokenizer.encode(text[:chars])
        # drop the tail: a cut in mid-word may tokenize differently from the whole text
        if len(ids) > n_tokens + 16 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"the reference text has only {len(ids)} tokens; ask for --tokens {len(ids)} or fewer")
    return ids[:n_tokens]


def perplexity(llm: LLM, token_ids: list[int]) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of tokens 1.. given the ones before; also the tokens scored."""
    out = llm.generate([{"prompt_token_ids": token_ids}],
                       SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [entry[t] for t, entry in zip(token_ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(lps) / len(lps)), len(lps)


def build_llm(model: str, n_tokens: int, chunk: int, block_size: int = 16, **engine_args) -> LLM:
    return LLM(model, dtype="float32", device="cpu", block_size=block_size, max_num_seqs=1,
               num_kv_blocks=(n_tokens + 1) // block_size + 2, max_num_batched_tokens=chunk,
               enable_prefix_caching=False, **engine_args)


def evaluate(model: str = "smollm2", n_tokens: int = 4096, chunk: int = 1024,
             configs: dict[str, dict] | None = None, progress=print) -> list[dict]:
    """One row per configuration: perplexity, its change from the first row, and the seconds it took."""
    rows, token_ids = [], None
    for name, args in (configs or CONFIGS).items():
        t0 = time.perf_counter()
        llm = build_llm(model, n_tokens, chunk, **args)
        if token_ids is None:
            token_ids = reference_tokens(llm.tokenizer, n_tokens)
        t1 = time.perf_counter()
        ppl, scored = perplexity(llm, token_ids)
        rows.append({"config": name, "engine_args": args, "perplexity": ppl, "tokens_scored": scored,
                     "change_vs_first": ppl / rows[0]["perplexity"] - 1 if rows else 0.0,
                     "load_s": t1 - t0, "eval_s": time.perf_counter() - t1})
        if progress:
            progress(_format_row(rows[-1]))
        del llm
    return rows


def _format_row(r: dict) -> str:
    return (f"{r['config']:14s} {r['perplexity']:10.4f} {100 * r['change_vs_first']:+8.2f}% "
            f"{r['eval_s']:7.1f}s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Perplexity on pydoc_data.topics under each --quant / --kv-quant")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the reference text to score")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (--max-num-batched-tokens)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of: {', '.join(CONFIGS)} (the first is the baseline)")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; pick from: {', '.join(CONFIGS)}")
    print(f"perplexity of {a.model} (fp32 compute, CPU) on the first {a.tokens} tokens of pydoc_data.topics, "
          f"prefilled in chunks of {a.chunk}")
    print(f"{'config':14s} {'perplexity':>10s} {'vs ' + names[0]:>9s} {'time':>8s}")
    rows = evaluate(a.model, a.tokens, a.chunk, {n: CONFIGS[n] for n in names})
    if a.json:
        record = {"workload": {"text": "pydoc_data.topics (sorted keys)", "tokens": a.tokens, "chunk": a.chunk},
                  "engine": {"model": a.model, "dtype": "float32", "device": "cpu"},
                  "versions": {"torch": torch.__version__, "python": platform.python_version()},
                  "date": time.strftime("%Y-%m-%d"), "results": rows}
        with open(a.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
