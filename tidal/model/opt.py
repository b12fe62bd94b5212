"""OPT (FlexGen's model family): learned positions (offset 2), ReLU MLP, LayerNorm
(pre- or post-norm), and the project-in/out dimensions of OPT-350m.

Owns: `OPTForCausalLM` built from model/layers blocks with a fused QKV projection, and the
mapping from HF parameter names onto it.
Must not: read files, touch the KV cache directly, or branch on device type.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tidal.model.layers.attention import Attention
from tidal.model.layers.embedding import Embedding, LMHead
from tidal.model.layers.linear import Linear, MergedLinear
from tidal.model.loading import load_named_weights, map_packed_name

_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
_POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq legacy)


class OPTAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.qkv_proj = MergedLinear(d, {"q": d, "k": d, "v": d}, bias=cfg.enable_bias)
        self.out_proj = Linear(d, d, bias=cfg.enable_bias)
        self.attn = Attention(layer_idx, h, h, d // h, (d // h) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.forward_split(x)
        return self.out_proj(self.attn(q, k, v))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        d, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = Linear(d, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = Linear(cfg.ffn_dim, d, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.act = _ACTS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTForCausalLM(nn.Module):
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, cfg, max_position: int | None = None):
        super().__init__()
        self.config = cfg
        proj = cfg.word_embed_proj_dim
        self.embed_tokens = Embedding(cfg.vocab_size, proj)
        self.embed_positions = Embedding(cfg.max_position_embeddings + _POSITION_OFFSET, cfg.hidden_size)
        self.project_in = Linear(proj, cfg.hidden_size) if proj != cfg.hidden_size else None
        self.project_out = Linear(cfg.hidden_size, proj) if proj != cfg.hidden_size else None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        keep_final = cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine) \
            if keep_final else None
        self.lm_head = LMHead(cfg.vocab_size, proj, tied_to=self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids, positions)
        for i in range(len(self.layers)):
            x = self.layer_forward(i, positions, x)
        return self.final_norm(x)

    # One step in pieces, for schedules that run layer by layer over several micro-batches
    # (engine/offload_runner.py); the state between layers is the hidden state.
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + _POSITION_OFFSET)

    def layer_forward(self, i: int, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.layers[i](x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def map_weight_name(self, hf_name: str) -> tuple[str, object] | None:
        name = hf_name
        for prefix in ("model.decoder.", "decoder."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name == "lm_head.weight":  # always tied to the token embedding in OPT
            return None
        return map_packed_name(name, self.packed_modules)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, tensors)
