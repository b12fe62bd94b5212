"""The Llama family: Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (QKV bias), SmolLM.

Owns: `LlamaForCausalLM` built from model/layers blocks, with fused QKV and gate-up
projections, and the mapping from HF parameter names onto them (`load_weights`).
Inside a decoder layer the blocks call each other's `.forward` directly: nn.Module's `__call__` costs a
few microseconds each (hook checks), about 300 times a decode step. Layers themselves are still called
through `__call__`: weights/prefetch.py hooks streamed layers.
Must not: read files, touch the KV cache directly, or branch on device type.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tidal.kernels import get_backend
from tidal.model.layers.attention import Attention
from tidal.model.loading import load_named_weights, map_packed_name
from tidal.model.layers.embedding import Embedding, LMHead
from tidal.model.layers.linear import Linear, MergedLinear
from tidal.model.layers.norm import RMSNorm
from tidal.model.layers.rotary import RotaryEmbedding

_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": q, "k": kv, "v": kv}, bias=bias)
        self.o_proj = Linear(q, cfg.hidden_size, bias=bool(getattr(cfg, "attention_bias", False)))
        self.rotary = rotary
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.forward_split(x)
        q, k = self.rotary.forward(positions, q.view(-1, self.num_heads, self.head_dim),
                                   k.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj.forward(self.attn.forward(q.flatten(1), k.flatten(1), v))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": cfg.intermediate_size, "up": cfg.intermediate_size}, bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias)
        self.act = _ACTS[cfg.hidden_act]
        self.fused_silu = cfg.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_silu:
            return self.down_proj.forward(get_backend(x.device).silu_and_mul(self.gate_up_proj.forward(x)))
        gate, up = self.gate_up_proj.forward_split(x)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual):
        if residual is None:
            residual, x = x, self.input_layernorm.forward(x)
        else:
            x, residual = self.input_layernorm.forward(x, residual)
        x = self.self_attn.forward(positions, x)
        x, residual = self.post_attention_layernorm.forward(x, residual)
        return self.mlp.forward(x), residual


class LlamaForCausalLM(nn.Module):
    # HF name fragment -> (our module fragment, shard)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}

    def __init__(self, cfg, max_position: int | None = None):
        super().__init__()
        self.config = cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = RotaryEmbedding(cfg, head_dim, max_position or cfg.max_position_embeddings)
        self.rotary = rotary
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tied_to=self.embed_tokens if tied else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        state = self.embed(input_ids, positions)
        for i in range(len(self.layers)):
            state = self.layer_forward(i, positions, state)
        return self.final_norm(state)

    # One step in pieces, for schedules that run layer by layer over several micro-batches
    # (engine/offload_runner.py). `state` is whatever passes between layers: here (x, residual).
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        return self.embed_tokens(input_ids), None

    def layer_forward(self, i: int, positions: torch.Tensor, state):
        return self.layers[i](positions, *state)   # through __call__: the prefetcher hooks layers

    def final_norm(self, state) -> torch.Tensor:
        return self.norm(*state)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def map_weight_name(self, hf_name: str) -> tuple[str, object] | None:
        """HF parameter name -> (our parameter name, shard) or None to skip."""
        name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            return None
        return map_packed_name(name, self.packed_modules)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, tensors)
