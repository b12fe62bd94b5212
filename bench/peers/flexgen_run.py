"""Peer runner: FlexGen 0.1.8 (`flexgen.flex_opt`) on a GPU with dummy weights, offline.

Owns: running FlexGen's own benchmark entry (`run_flexgen`) with its hub tokenizer replaced by a
stand-in that left-pads fixed ids to --prompt-len (the device machine has no network, and with
`--path _DUMMY_` the token values do not matter), then turning FlexGen's log into tidal's JSON
record. Throughput is FlexGen's own formula: num_prompts * gen_len / (prefill + decode latency).
Must not: import tidal's engine. Usage (FlexGen's flags pass through):
  python bench/peers/flexgen_run.py --json OUT.json -- --model facebook/opt-30b --path _DUMMY_ \
      --percent 20 80 0 100 0 100 --gpu-batch-size 32 --num-gpu-batches 2 --cpu-cache-compute
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from types import SimpleNamespace


class PaddedIdsTokenizer:
    """Enough of a HF tokenizer for flex_opt.get_test_inputs: fixed ids, left-padded to max_length."""
    pad_token_id = 1
    ids = [2, 32826, 16, 5, 812, 343, 9]  # a fixed OPT-vocabulary sentence; only the length matters

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def __call__(self, prompts, padding="max_length", max_length=None, **kwargs):
        rows = []
        for _ in prompts:
            ids = self.ids[:max_length]
            rows.append([self.pad_token_id] * (max_length - len(ids)) + ids)
        return SimpleNamespace(input_ids=rows)

    def batch_decode(self, ids, **kwargs):
        return ["" for _ in ids]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, _, theirs = (argv[:argv.index("--")], None, argv[argv.index("--") + 1:]) if "--" in argv else (argv, None, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(ours)
    from flexgen import flex_opt
    flex_opt.AutoTokenizer = PaddedIdsTokenizer
    fp = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(fp)
    log = tempfile.NamedTemporaryFile(suffix=".log", delete=False).name
    fargs = fp.parse_args(theirs + ["--log-file", log])
    flex_opt.run_flexgen(fargs)
    text = open(log).read()
    nums = {k: float(v) for k, v in re.findall(r"(\w[\w ]*?):\s*([0-9.]+)\s", text)}
    num_prompts = fargs.gpu_batch_size * fargs.num_gpu_batches
    print(text)
    if args.json_path:
        from tidal.bench import Workload, make_record, write_record
        wl = Workload([[0] * fargs.prompt_len] * num_prompts, [fargs.gen_len] * num_prompts, seed=0,
                      input_len=(fargs.prompt_len, fargs.prompt_len), output_len=(fargs.gen_len, fargs.gen_len),
                      source="flexgen fixed prompt")
        tput = nums.get("total throughput")
        engine = {"name": "flexgen-0.1.8", "model": fargs.model, "dtype": "float16", "device": "cuda",
                  "args": {"percent": fargs.percent, "gpu_batch_size": fargs.gpu_batch_size,
                           "num_gpu_batches": fargs.num_gpu_batches, "cpu_cache_compute": fargs.cpu_cache_compute,
                           "compress_weight": fargs.compress_weight, "compress_cache": fargs.compress_cache}}
        results = {"output_tokens_per_s": tput, "elapsed_s": nums.get("total latency"),
                   "prefill_latency_s": nums.get("prefill latency"), "decode_latency_s": nums.get("decode latency"),
                   "flexgen_log": text}
        write_record(make_record(wl, engine, results), args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
