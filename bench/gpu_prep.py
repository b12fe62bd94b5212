"""Prepares what a lent GPU machine needs but cannot fetch, in .gpu/ (git-ignored, carried).

Owns: config-only model directories for `--load-format dummy` runs (the SmolLM2 GGUF is 94 MiB,
over the 64 MiB a device call may carry, so the device runs its shapes with random weights):
  .gpu/smollm2-cfg   SmolLM2-135M's config.json and tokenizer files
  .gpu/llama-1b-cfg  a Llama-3.2-1B-shaped config (16 layers, hidden 2048, GQA 32/8) with the
                     SmolLM2 tokenizer and vocabulary, so the GPU is not launch-bound
  .gpu/opt-30b-cfg   OPT-30B's config (for the offloading benchmark against FlexGen)
Must not: be imported by tidal (it is a bench helper).
"""
import copy
import os
import sys

from tidal.weights.loader import open_checkpoint

out = sys.argv[1] if len(sys.argv) > 1 else ".gpu"
ck = open_checkpoint("smollm2")
tok = ck.load_tokenizer()
for name, changes in [("smollm2-cfg", {}),
                      ("llama-1b-cfg", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                            num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                            tie_word_embeddings=True))]:
    cfg = copy.deepcopy(ck.hf_config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    d = os.path.join(out, name)
    cfg.save_pretrained(d)
    tok.save_pretrained(d)
from transformers import OPTConfig  # noqa: E402

opt = OPTConfig(hidden_size=7168, num_hidden_layers=48, ffn_dim=28672, num_attention_heads=56,
                word_embed_proj_dim=7168, max_position_embeddings=2048, vocab_size=50272, torch_dtype="float16",
                architectures=["OPTForCausalLM"])  # tidal picks the model class by it
opt.save_pretrained(os.path.join(out, "opt-30b-cfg"))
print("wrote", sorted(os.listdir(out)))
