"""What a model costs, read from its transformers config alone: bytes and FLOPs per layer.

Owns: `ModelSpec` (Llama family and OPT): weight bytes of one decoder layer and of the rest
(embeddings, LM head, final norm) by dtype and by weight quantization, KV cache bytes per token
per layer (by --kv-quant), activation bytes per token, FLOPs per token (linear layers, attention's
context-length term, LM head), and the working memory a forward pass needs.
Must not: build modules or read weights. The layouts it counts belong to model/ (fused QKV and
gate-up), model/layers/quant_linear.py (quantized weights: int4 0.5 byte + a bf16 scale and zero
per group of 32; int8 1 byte + a bf16 and an fp32 scale and an fp32 zero per row) and kv/quant_cache.py;
tests/test_plan.py checks the counts against the built modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.errors import TidalError
from tidal.kv.quant_cache import kv_bytes_per_token

INT4_GROUP_SIZE = 32                         # model/quantize.py's default for int4
_SCALE_BYTES = {"int4": 4, "int8": 10}       # per group: int4 bf16 scale + zero; int8 bf16 + fp32 scale, fp32 zero
_LLAMA_TYPES = ("llama", "mistral", "qwen2")
_LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str                                   # "llama" or "opt"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    max_position: int
    layer_linears: tuple[tuple[int, int], ...]  # (out, in) of every matmul weight in one decoder layer
    layer_vector_params: int                    # norms and biases of one layer (never quantized)
    embed_params: int                           # token (+ OPT's learned position) embeddings
    head_params: int                            # LM head matrix; 0 when tied to the embedding
    head_dim_in: int                            # the LM head's input size (OPT-350m projects down)
    other_linears: tuple[tuple[int, int], ...]  # matmuls outside the layers (OPT's project_in/out)
    other_vector_params: int                    # final norm, project_in/out biases

    # ---- weights -------------------------------------------------------------------------
    @property
    def layer_matmul_params(self) -> int:
        return sum(o * i for o, i in self.layer_linears)

    def _linear_bytes(self, shapes, dtype_bytes: int, quant: str) -> float:
        if quant == "none":
            return sum(o * i for o, i in shapes) * dtype_bytes
        if quant == "int4":
            return sum(o * i * 0.5 + o * (i // INT4_GROUP_SIZE) * _SCALE_BYTES["int4"] for o, i in shapes)
        if quant == "int8":
            return sum(o * i + o * _SCALE_BYTES["int8"] for o, i in shapes)
        raise ValueError(f"quant {quant!r}")

    def layer_weight_bytes(self, dtype_bytes: int, quant: str = "none") -> float:
        """One decoder layer: its matmuls (quantized or not) plus norms and biases in the model dtype."""
        return self._linear_bytes(self.layer_linears, dtype_bytes, quant) + self.layer_vector_params * dtype_bytes

    def other_weight_bytes(self, dtype_bytes: int, quant: str = "none") -> float:
        """Everything outside the layers; embeddings and the LM head stay in the model dtype."""
        return ((self.embed_params + self.head_params + self.other_vector_params) * dtype_bytes
                + self._linear_bytes(self.other_linears, dtype_bytes, quant))

    def weight_bytes(self, dtype_bytes: int, quant: str = "none") -> float:
        return (self.num_layers * self.layer_weight_bytes(dtype_bytes, quant)
                + self.other_weight_bytes(dtype_bytes, quant))

    # ---- KV cache and activations -----------------------------------------------------------
    def kv_bytes_per_token(self, dtype: torch.dtype, kv_quant: str = "none") -> int:
        """K and V of one token in one layer."""
        return 2 * kv_bytes_per_token(self.num_kv_heads, self.head_dim, dtype, kv_quant)

    def act_bytes_per_token(self, dtype_bytes: int) -> int:
        """The hidden state handed from one layer to the next (Llama also carries the residual)."""
        return self.hidden_size * dtype_bytes * (2 if self.arch == "llama" else 1)

    def work_bytes_per_token(self, dtype_bytes: int) -> int:
        """Transient tensors inside one layer's forward: the widest intermediate plus the hidden states."""
        widest = max(o for o, _ in self.layer_linears)
        return (widest + 3 * self.hidden_size) * dtype_bytes

    def attn_scores_bytes(self, prompt_len: int) -> int:
        """Prefill attention's fp32 scores of one sequence (the runner prefills a sequence at a time)."""
        return self.num_heads * prompt_len * prompt_len * 4

    # ---- FLOPs -----------------------------------------------------------------------------
    @property
    def layer_flops_per_token(self) -> int:
        """Linear layers of one decoder layer, per token (2 FLOPs a multiply-add)."""
        return 2 * self.layer_matmul_params

    def attn_flops_per_token(self, context: float) -> float:
        """One layer's attention for a token that attends over `context` tokens (QK^T and AV)."""
        return 4 * self.num_heads * self.head_dim * context

    @property
    def head_flops_per_token(self) -> int:
        return 2 * self.vocab_size * self.head_dim_in + 2 * sum(o * i for o, i in self.other_linears)


def model_spec(hf_config) -> ModelSpec:
    """A transformers config (Llama, Mistral, Qwen2, OPT) -> ModelSpec; TidalError for other families."""
    model_type = getattr(hf_config, "model_type", "")
    archs = list(getattr(hf_config, "architectures", None) or [])
    if model_type == "opt" or "OPTForCausalLM" in archs:
        return _opt_spec(hf_config)
    if model_type in _LLAMA_TYPES or any(a in _LLAMA_ARCHS for a in archs):
        return _llama_spec(hf_config)
    raise TidalError(f"the planner models Llama-family and OPT checkpoints, not {archs or model_type!r}; "
                     "pass an explicit --policy string instead of auto", param="policy")


def _llama_spec(c) -> ModelSpec:
    nh = c.num_attention_heads
    nkv = getattr(c, "num_key_value_heads", None) or nh
    hd = getattr(c, "head_dim", None) or c.hidden_size // nh
    d, inter = c.hidden_size, c.intermediate_size
    attn_bias = bool(getattr(c, "attention_bias", False))
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    linears = (((nh + 2 * nkv) * hd, d), (d, nh * hd), (2 * inter, d), (d, inter))
    vec = 2 * d                                              # input and post-attention RMSNorm
    if attn_bias or c.model_type == "qwen2":
        vec += (nh + 2 * nkv) * hd
    if attn_bias:
        vec += d
    if mlp_bias:
        vec += 2 * inter + d
    tied = bool(getattr(c, "tie_word_embeddings", False))
    return ModelSpec(name=getattr(c, "_name_or_path", "") or c.model_type, arch="llama",
                     num_layers=c.num_hidden_layers, hidden_size=d, num_heads=nh, num_kv_heads=nkv, head_dim=hd,
                     vocab_size=c.vocab_size, intermediate_size=inter, max_position=c.max_position_embeddings,
                     layer_linears=linears, layer_vector_params=vec, embed_params=c.vocab_size * d,
                     head_params=0 if tied else c.vocab_size * d, head_dim_in=d, other_linears=(),
                     other_vector_params=d)


def _opt_spec(c) -> ModelSpec:
    d, ffn, nh = c.hidden_size, c.ffn_dim, c.num_attention_heads
    proj = getattr(c, "word_embed_proj_dim", None) or d
    bias = bool(getattr(c, "enable_bias", True))
    affine = bool(getattr(c, "layer_norm_elementwise_affine", True))
    linears = ((3 * d, d), (d, d), (ffn, d), (d, ffn))
    vec = (3 * d + d + ffn + d if bias else 0) + (4 * d if affine else 0)
    others = ((d, proj), (proj, d)) if proj != d else ()
    keep_final = c.do_layer_norm_before and not getattr(c, "_remove_final_layer_norm", False)
    other_vec = 2 * d if keep_final and affine else 0     # project_in/out have no bias
    return ModelSpec(name=getattr(c, "_name_or_path", "") or "opt", arch="opt", num_layers=c.num_hidden_layers,
                     hidden_size=d, num_heads=nh, num_kv_heads=nh, head_dim=d // nh, vocab_size=c.vocab_size,
                     intermediate_size=ffn, max_position=c.max_position_embeddings, layer_linears=linears,
                     layer_vector_params=vec, embed_params=c.vocab_size * proj + (c.max_position_embeddings + 2) * d,
                     head_params=0, head_dim_in=proj, other_linears=others, other_vector_params=other_vec)
