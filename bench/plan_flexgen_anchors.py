"""The cost model against FlexGen's own measured throughput on an H100 (ANCHORS.md's table).

Predicts, from a CUDA hardware profile (bench/plan_gpu_check.sh measures one), the throughput of the
policies FlexGen 0.1.8 ran on the same kind of card, and prints them side by side. The prediction is
of tidal's kernels under that policy, FlexGen's figure is FlexGen's engine: a sanity check of the
schedule model on a GPU (same order of magnitude, same ranking), not the 30% validation, which
compares tidal with tidal (bench/plan_validate.py).

    python bench/plan_flexgen_anchors.py --hardware bench/out/plan-gpu/hardware-cuda.json
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (model, FlexGen --percent policy, gpu batch x num batches, 4-bit, cpu attention, FlexGen tok/s)
ANCHORS = [
    ("OPT-6.7B", "100 0 100 0 100 0", (64, 1), False, False, 1299.0),
    ("OPT-6.7B", "0 100 100 0 100 0", (64, 4), False, False, 609.0),
    ("OPT-6.7B", "0 100 100 0 100 0", (64, 4), True, False, 487.0),
    ("OPT-30B", "20 80 100 0 100 0", (32, 2), False, False, 53.7),
    ("OPT-30B", "100 0 100 0 100 0", (32, 2), True, False, 76.0),
    ("OPT-30B", "20 80 0 100 0 100", (32, 2), False, True, 15.3),
    ("OPT-30B", "20 80 0 100 0 100", (32, 2), True, True, 14.7),
]
SHAPES = {"OPT-6.7B": (4096, 16384, 32, 32), "OPT-30B": (7168, 28672, 56, 48)}


def opt_config(name: str):
    from transformers import OPTConfig
    d, ffn, heads, layers = SHAPES[name]
    return OPTConfig(hidden_size=d, ffn_dim=ffn, num_attention_heads=heads, num_hidden_layers=layers,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=d,
                     architectures=["OPTForCausalLM"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hardware", required=True, help="a CUDA hardware profile JSON")
    args = ap.parse_args(argv)
    import torch

    from tidal.plan.cost_model import predict
    from tidal.plan.hardware import load_profile
    from tidal.plan.model_spec import model_spec
    from tidal.policy import Policy
    prof = load_profile(args.hardware)
    print(f"hardware: {prof.device_name} ({args.hardware}); prompt 512, generate 32, fp16")
    print(f"{'model':<10}{'policy':<42}{'FlexGen':>9}{'predicted':>11}{'ratio':>7}  bound (prefill/decode)")
    for model, percent, (bs, mb), int4, cpu_attn, flexgen in ANCHORS:
        policy = Policy.parse(f"{percent} bs={bs} mb={mb} quant={'int4' if int4 else 'none'} "
                              f"cpu-attn={'on' if cpu_attn else 'off'}")
        pred = predict(model_spec(opt_config(model)), prof, torch.float16, 512, 32, policy)
        label = f"{percent} {bs}x{mb}" + (" int4" if int4 else "") + (" cpu-attn" if cpu_attn else "")
        print(f"{model:<10}{label:<42}{flexgen:>9.1f}{pred.tokens_per_s:>11.1f}{pred.tokens_per_s / flexgen:>7.2f}  "
              f"{pred.bottleneck['prefill']}/{pred.bottleneck['decode']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
