"""Write a Llama checkpoint with random weights, for benchmarks that need weight files on disk.

Owns: the benchmark model shapes (`SIZES`), writing config.json, sharded safetensors under HF
names (with model.safetensors.index.json) and the SmolLM2 tokenizer into one directory.
Must not: touch tidal's engine; it only needs the SmolLM2 tokenizer from tidal.weights.loader.

    python bench/make_dummy_llama.py bench/out/llama-1b --size 1b --dtype bfloat16

1b is TinyLlama's shape (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads) with the
SmolLM2 vocabulary (49152, so token ids are valid for its tokenizer) and untied embeddings:
1,170,302,976 parameters, 2.34 GB in bf16. Weights are normal(0, 0.02), norms are ones; each
tensor is drawn on its own (seeded by its name) and written with its shard, so peak memory
stays near one shard. A directory that already holds a complete checkpoint is left as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

VOCAB = 49152  # the SmolLM2 tokenizer's
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "tiny": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4),
}
SHARD_BYTES = 512 << 20


def make_config(size: str, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SIZES[size], "vocab_size": VOCAB,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": dtype, "dtype": dtype, "initializer_range": 0.02}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) for every tensor of LlamaForCausalLM, in file order."""
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                (p + "mlp.down_proj.weight", (h, m))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm scales
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def is_complete(out_dir: str) -> bool:
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if not (os.path.isfile(index) and os.path.isfile(os.path.join(out_dir, "tokenizer.json"))):
        return False
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    for shard in set(weight_map.values()):
        try:
            with safe_open(os.path.join(out_dir, shard), framework="pt") as f:
                if not set(f.keys()) >= {n for n, s in weight_map.items() if s == shard}:
                    return False
        except Exception:  # missing or truncated shard: write again
            return False
    return True


def write(out_dir: str, size: str, dtype_name: str) -> None:
    cfg = make_config(size, dtype_name)
    dtype = getattr(torch, dtype_name)
    shapes = tensor_shapes(cfg)
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"{size}: {numel:,} parameters, {numel * dtype.itemsize / 1e9:.2f} GB in {dtype_name}", file=sys.stderr)
    if is_complete(out_dir):
        print(f"{out_dir} already holds the checkpoint; not rewritten", file=sys.stderr)
        return
    os.makedirs(out_dir, exist_ok=True)
    groups, acc = [[]], 0  # shards of whole tensors, about SHARD_BYTES each
    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if groups[-1] and acc + nbytes > SHARD_BYTES:
            groups.append([])
            acc = 0
        groups[-1].append((name, shape))
        acc += nbytes
    weight_map = {}
    bar = tqdm(total=numel * dtype.itemsize, desc=f"writing {out_dir}", unit="B", unit_scale=True)
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            tensors[name] = make_tensor(name, shape, dtype)
            weight_map[name] = fname
            bar.update(tensors[name].numel() * dtype.itemsize)
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": numel * dtype.itemsize}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    from tidal.weights.loader import open_checkpoint
    open_checkpoint("smollm2", require_weights=False).load_tokenizer().save_pretrained(out_dir)
    print(f"wrote {out_dir}: {len(groups)} shards, config.json, tokenizer", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--size", default="1b", choices=sorted(SIZES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    write(args.out_dir, args.size, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
