"""The resolve step: `EngineConfig` -> `ResolvedEngine`, every sizing decision made before anything is built.

Owns: `resolve_engine_config` (open the checkpoint, refuse an unknown architecture, the context length,
the offloading policy and the planner's prediction, the weight quantization, the KV block count where
it does not depend on loaded weights, and the scheduler's limits: max sequences, token budget,
micro-batches), `resolve_policy` (--policy, or for "auto" all-resident unless --host-mem /
--device-mem limit memory, then tidal/plan's choice) and `num_kv_blocks_for` (a byte budget -> blocks).
The runner and the engine/scheduler both read the one `ResolvedEngine`; neither reads the other's.
Must not: build the model, allocate tensors or schedule.

The token budget under an offloading policy: a policy with a batch (bs > 0) runs bs x mb sequences
(`max_num_seqs`), and the budget is at least one decode token for each of them,
`max(--max-num-batched-tokens, bs * mb)`, so a decode step of the whole batch is never split over two
steps, each of which would copy every streamed layer in again. Prefill is still chunked by the flag.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from tidal.config import EngineConfig
from tidal.errors import TidalError
from tidal.kv.quant_cache import kv_bytes_per_token
from tidal.model.quantize import resolve_quantization
from tidal.model.registry import get_model_class
from tidal.policy import Policy
from tidal.weights.loader import open_checkpoint

_DEFAULT_CPU_KV_MEM = 2 << 30


@dataclass(frozen=True)
class ResolvedEngine:
    config: EngineConfig
    checkpoint: object                  # weights.loader.Checkpoint (or a test's duck type)
    hf_config: object
    model_max_position: int             # the model's own context (positions its rotary tables cover)
    max_model_len: int                  # --max-model-len within the model's context
    vocab_size: int
    policy: Policy
    plan: object | None                 # the planner's Prediction under --policy auto with memory flags
    quant: tuple[int, int | None] | None   # (bits, group size) of the weights, or None
    block_size: int
    kv_bytes_per_block: int
    # None: sized at load from what the loaded weights leave (--device-mem all-resident, or CUDA's free memory)
    num_kv_blocks: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    num_micro_batches: int


def resolve_engine_config(config: EngineConfig, checkpoint=None) -> ResolvedEngine:
    ckpt = checkpoint or open_checkpoint(config.model, require_weights=config.load_format != "dummy")
    hf = ckpt.hf_config
    get_model_class(hf)  # unknown architecture -> clear error before any work
    model_len = getattr(hf, "max_position_embeddings", None) or 2048
    max_model_len = min(config.max_model_len or model_len, model_len)
    policy, plan = resolve_policy(config, hf, max_model_len, ckpt)
    quant = resolve_quantization(config.quant if config.quant != "none" else policy.quant,
                                 getattr(ckpt, "quantization", None))
    num_layers = hf.num_hidden_layers
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    per_block = 2 * num_layers * config.block_size * kv_bytes_per_token(kv_heads, head_dim, config.torch_dtype,
                                                                        config.kv_quant)
    # an offloading policy's batch: bs sequences in each of mb micro-batches (module docstring)
    max_num_seqs = policy.effective_batch or config.max_num_seqs
    budget = max(config.max_num_batched_tokens, policy.effective_batch)
    resolved = ResolvedEngine(config, ckpt, hf, model_len, max_model_len, hf.vocab_size, policy, plan, quant,
                              config.block_size, per_block, None, max_num_seqs, budget, policy.num_micro_batches)
    return replace(resolved, num_kv_blocks=_num_kv_blocks(resolved))


def _num_kv_blocks(r: ResolvedEngine) -> int | None:
    config = r.config
    if config.num_kv_blocks:
        return config.num_kv_blocks
    budget = config.kv_mem_bytes
    if budget is None and r.plan is not None:  # --policy auto's plan: the KV its batch needs
        budget = int(sum(parts["kv"] for parts in r.plan.memory_parts.values())) + \
            r.kv_bytes_per_block * r.policy.effective_batch
    if budget is None and (config.device_mem_bytes or config.torch_device.type == "cuda"):
        return None   # depends on the loaded weights: the runner calls num_kv_blocks_for at load
    return num_kv_blocks_for(r, budget if budget is not None else _DEFAULT_CPU_KV_MEM)


def num_kv_blocks_for(r: ResolvedEngine, budget: int | None = None, weights_bytes: int = 0) -> int:
    """Blocks for a byte budget. Without one (`ResolvedEngine.num_kv_blocks` None), from what the loaded
    weights (`weights_bytes`) leave: --device-mem less a tenth for activations, else 85% of CUDA's free
    memory (measured after the load)."""
    config = r.config
    if budget is None and config.device_mem_bytes:
        budget = int(config.device_mem_bytes * 0.9) - weights_bytes
        if budget <= 0:
            raise TidalError(f"--device-mem {config.device_mem} does not even hold the weights "
                             f"({weights_bytes / 2**30:.2f} GiB); give more", param="device_mem")
    if budget is None:
        free, _ = torch.cuda.mem_get_info(config.torch_device)
        budget = int(free * 0.85)
    n = budget // r.kv_bytes_per_block
    if n < 1:
        raise TidalError(f"--kv-mem {budget} bytes is smaller than one KV block "
                         f"({r.kv_bytes_per_block} bytes); give it more", param="kv_mem")
    # never more blocks than every sequence at full length could use
    return int(min(n, r.max_num_seqs * (r.max_model_len // r.block_size + 1)))


def resolve_policy(config, hf_config, max_model_len: int, checkpoint) -> tuple[Policy, object | None]:
    """(policy, the planner's Prediction or None). --policy as given; "auto" is all-resident unless
    --host-mem / --device-mem limit memory, and then tidal/plan's choice (cost model + LP) for the
    workload --prompt-len / --gen-len describe. Lossless: it compresses only what --quant /
    --kv-quant ask for (`tidal plan` also shows the compressed options)."""
    if config.policy != "auto":
        return Policy.parse(config.policy), None
    if not (config.host_mem_bytes or config.device_mem_bytes):
        return Policy(), None  # no limit given: everything resident
    from tidal.plan.hardware import profile_for
    from tidal.plan.model_spec import model_spec
    from tidal.plan.limits import disk_limit_for
    from tidal.plan.search import choose_policy
    profile, _, _ = profile_for(config)
    prompt_len, gen_len = planned_workload(config, max_model_len)
    max_batch = config.max_num_seqs
    if config.kv_mem_bytes or config.num_kv_blocks:  # a fixed KV pool bounds the batch
        spec = model_spec(hf_config)
        per_token = spec.kv_bytes_per_token(config.torch_dtype, config.kv_quant) * spec.num_layers
        pool = config.kv_mem_bytes or config.num_kv_blocks * config.block_size * per_token
        max_batch = max(1, min(max_batch, pool // max(1, per_token * (prompt_len + gen_len))))
    policy, pred = choose_policy(hf_config, config, prompt_len, gen_len, profile, max_batch=max_batch,
                                 allow_compression=False, disk_limit=disk_limit_for(config, checkpoint))
    print(f"[tidal] --policy auto: '{policy}', predicted {pred.tokens_per_s:,.1f} tok/s for prompts of "
          f"{prompt_len} and {gen_len} new tokens (`tidal plan` explains)", file=sys.stderr)
    return policy, pred


def planned_workload(config, max_model_len: int) -> tuple[int, int]:
    """(prompt, generation) lengths the planner plans for: the flags, else FlexGen's 512 / 32 within
    the model's context."""
    prompt = config.prompt_len or min(512, max(1, max_model_len // 2))
    gen = config.gen_len or max(1, min(32, max_model_len - prompt))
    return prompt, gen
