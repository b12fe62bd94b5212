"""Runs the model for one scheduled batch.

Owns: loading the model onto the device, the KV cache tensors (one pool, sized from
--kv-mem / --num-kv-blocks), building the flat batch tensors (token ids, positions, slot
mapping, block tables, sequence lengths), the forward pass, and sampling. When the policy
(--policy, --host-mem) offloads weights or micro-batches a step, the model is built and each
step run by engine/offload_runner.py; both schedules share `_prepare` and `_sample`.
Must not: decide who runs (the scheduler does) or touch request lifecycles (the engine does).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tidal.config import EngineConfig
from tidal.engine.offload_runner import OffloadSchedule, build_offloaded_model, kv_cache_tiers, resolve_policy
from tidal.engine.request import Request
from tidal.engine.scheduler import ScheduledBatch
from tidal.errors import TidalError
from tidal.kernels import get_backend
from tidal.kernels.metadata import AttentionMetadata, forward_context
from tidal.kv.quant_cache import allocate_kv_cache, kv_bytes_per_token, kv_file
from tidal.model.registry import build_model, get_model_class
from tidal.sampling import Sampler, SamplingMetadata
from tidal.structured.bitmask import GrammarBitmask, apply_bitmask
from tidal.weights.dummy import fill_dummy
from tidal.weights.loader import Checkpoint, open_checkpoint
from tidal.model.quantize import quantize_model, resolve_quantization


@dataclass
class BatchLayout:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_idx: list[int]          # flat rows whose logits are sampled
    sample_reqs: list[Request]
    plp_rows: list

_DEFAULT_CPU_KV_MEM = 2 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None, verbose: bool = False):
        self.config = config
        self.device, self.dtype = config.torch_device, config.torch_dtype
        t0 = time.perf_counter()
        self.checkpoint = checkpoint or open_checkpoint(config.model, require_weights=config.load_format != "dummy")
        hf = self.hf_config = self.checkpoint.hf_config
        get_model_class(hf)  # unknown architecture -> clear error before any work
        model_len = getattr(hf, "max_position_embeddings", None) or 2048
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        # where weights / KV live and how a step is micro-batched (engine/offload_runner.py)
        self.policy, self.plan = resolve_policy(config, hf, self.max_model_len, self.checkpoint)
        # (bits, group size) or None: --quant, or what a `tidal quantize` directory already holds
        quant = resolve_quantization(config.quant if config.quant != "none" else self.policy.quant,
                                     getattr(self.checkpoint, "quantization", None))
        self.prefetcher = None
        if self.policy.offloads_weights:
            self.model, self.placement, self.prefetcher = build_offloaded_model(
                self, self.policy, model_len, quant, verbose)
        else:
            self.model = build_model(hf, self.device, self.dtype, max_position=model_len)
            self._load_weights(verbose, quant)
            if quant is not None:
                quantize_model(self.model, *quant)
            backend = get_backend(self.device)
            for module in self.model.modules():
                if hasattr(module, "pack"):
                    module.pack(backend)
        self.schedule = OffloadSchedule(self, self.policy.num_micro_batches, self.prefetcher) \
            if self.policy.offloads_weights or self.policy.num_micro_batches > 1 else None
        self.load_seconds = time.perf_counter() - t0
        self.num_layers = hf.num_hidden_layers
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        # per layer (k_cache, v_cache): [num_blocks, block_size, kv_heads, head_dim] tensors, or QuantKVCache
        # the policy's host share lives in CPU memory, its disk share in memory-mapped --offload-dir files
        kv_tiers = kv_cache_tiers(self.policy, self.num_layers, self.device)
        if "disk" in kv_tiers and not config.offload_dir:
            raise TidalError(f"the policy puts {kv_tiers.count('disk')} layer(s) of the KV cache on disk; pass "
                             "--offload-dir DIR for their files", param="offload_dir")
        self.kv_caches = [allocate_kv_cache(self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
                                            self.dtype, self.device if t == "device" else torch.device("cpu"),
                                            config.kv_quant, backing=kv_file(config.offload_dir, i) if t == "disk"
                                            else None)
                          for i, t in enumerate(kv_tiers)]
        self.sampler = Sampler()
        self.vocab_size = hf.vocab_size

    def _load_weights(self, verbose: bool, quant: tuple[int, int | None] | None = None) -> None:
        if self.config.load_format == "dummy":
            for name, p in self.model.named_parameters():
                fill_dummy(p, name, self.config.seed)
            return
        # weights stored in the asked format (GGUF Q4_1, `tidal quantize` dirs) come quantized, not re-done
        tensors = (self.checkpoint.iter_tensors(self.dtype, keep_quantized=quant) if quant
                   else self.checkpoint.iter_tensors(self.dtype))
        if verbose:
            total = getattr(self.checkpoint, "num_tensors", None)
            tensors = tqdm(tensors, desc="loading weights", unit=" tensors", leave=False,
                           total=total() if callable(total) else total)
        try:
            self.model.load_weights((name, t.to(self.device, non_blocking=True)) for name, t in tensors)
        except ValueError as e:
            raise TidalError(f"{self.checkpoint.path}: weights do not fit the model ({e})", param="model") from None

    def kv_bytes_per_block(self) -> int:
        per_token = kv_bytes_per_token(self.num_kv_heads, self.head_dim, self.dtype, self.config.kv_quant)
        return 2 * self.num_layers * self.block_size * per_token

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        budget = self.config.kv_mem_bytes
        if budget is None and self.plan is not None:  # --policy auto's plan: the KV its batch needs
            budget = int(sum(parts["kv"] for parts in self.plan.memory_parts.values())) + \
                self.kv_bytes_per_block() * self.policy.effective_batch
        if budget is None and self.config.device_mem_bytes:
            # everything resident: the KV pool gets what the weights leave, less a tenth for activations
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            budget = int(self.config.device_mem_bytes * 0.9) - weights
            if budget <= 0:
                raise TidalError(f"--device-mem {self.config.device_mem} does not even hold the weights "
                                 f"({weights / 2**30:.2f} GiB); give more", param="device_mem")
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:
                budget = _DEFAULT_CPU_KV_MEM
        n = budget // self.kv_bytes_per_block()
        if n < 1:
            raise TidalError(f"--kv-mem {budget} bytes is smaller than one KV block "
                             f"({self.kv_bytes_per_block()} bytes); give it more", param="kv_mem")
        # never more blocks than every sequence at full length could use
        return int(min(n, self.config.max_num_seqs * (self.max_model_len // self.block_size + 1)))

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, block_tables: list[list[int]]):
        """Build the flat batch, write its K/V into the cache, and return (hidden [T, H], batch layout)."""
        layout = self._prepare(batch, block_tables)
        with forward_context(layout.meta, self.kv_caches):
            hidden = self.model(layout.input_ids, layout.positions)
        return hidden, layout

    def _prepare(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> "BatchLayout":
        dev, bs = self.device, self.block_size
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        sample_idx, sample_reqs, plp_rows = [], [], []   # plp: (request, flat start, tokens) for prompt logprobs
        for req, n, table in zip(batch.requests, batch.num_new_tokens, block_tables):
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            flat_start = len(input_ids)
            input_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            seq_lens.append(end)
            if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens:
                plp_rows.append((req, flat_start, min(end, req.num_prompt_tokens) - start))
            if end == req.num_tokens:  # a chunk that stops short of the end samples nothing
                sample_idx.append(len(input_ids) - 1)
                sample_reqs.append(req)
        max_blocks = max(len(t) for t in block_tables)
        bt = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int64)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            block_tables=bt.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int64).to(dev, non_blocking=True),
            query_lens_list=query_lens, seq_lens_list=seq_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=bs)
        return BatchLayout(torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True),
                           torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True),
                           meta, sample_idx, sample_reqs, plp_rows)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_tables: list[list[int]],
                grammar: GrammarBitmask | None = None) -> tuple[dict[str, object], dict]:
        """Run one step. Returns ({request_id: (token, logprobs)} for requests that reached their last
        token, {request_id: prompt logprobs of this chunk}). `grammar`: the allowed tokens of the
        requests that sample under a grammar (structured output); the other rows are not touched."""
        parts = self.schedule.forward(batch, block_tables) if self.schedule is not None \
            else [self.forward(batch, block_tables)]
        return self._sample(parts, grammar)

    def _sample(self, parts: list, grammar: GrammarBitmask | None = None) -> tuple[dict[str, object], dict]:
        """Sample the rows that need it from [(hidden, BatchLayout)] (one per micro-batch), as one batch."""
        dev = self.device
        prompt_logprobs, rows, sample_reqs = {}, [], []
        for hidden, layout in parts:
            if layout.plp_rows:
                prompt_logprobs.update(self._prompt_logprobs(hidden, layout.plp_rows))
            if layout.sample_reqs:
                rows.append(hidden[torch.tensor(layout.sample_idx, device=dev)])
                sample_reqs += layout.sample_reqs
        if not sample_reqs:
            return {}, prompt_logprobs
        logits = self.model.compute_logits(torch.cat(rows) if len(rows) > 1 else rows[0]).float()
        if grammar is not None:   # before penalties and sampling, so greedy and seeded draws both obey it
            row_of = {r.request_id: i for i, r in enumerate(sample_reqs)}
            apply_bitmask(logits, [row_of[rid] for rid in grammar.request_ids], grammar)
        smeta = SamplingMetadata.build(
            [r.params for r in sample_reqs], [r.seed for r in sample_reqs],
            [r.prompt_token_ids for r in sample_reqs], [r.output_token_ids for r in sample_reqs],
            self.eos_token_ids, self.vocab_size, dev)
        out = self.sampler(logits, smeta)
        token_ids = out.token_ids.tolist()
        chosen_lp = out.logprobs.tolist() if out.logprobs is not None else None
        top = (out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist()) if out.top_logprobs is not None else None
        results = {}
        for i, req in enumerate(sample_reqs):
            lp = None
            if req.params.logprobs is not None and chosen_lp is not None:
                lp = {token_ids[i]: chosen_lp[i]}
                if top is not None:
                    for v, t in list(zip(top[0][i], top[1][i]))[:req.params.logprobs]:
                        lp.setdefault(t, v)
            results[req.request_id] = (token_ids[i], lp)
        return results, prompt_logprobs

    def _prompt_logprobs(self, hidden: torch.Tensor, rows) -> dict:
        """Logprob of each prompt token given the ones before it, plus the top-k there."""
        result = {}
        for req, flat_start, n in rows:
            start = req.num_computed_tokens
            # position p predicts token p+1; the last prompt position predicts the first output, not a prompt token
            n_pred = min(n, req.num_prompt_tokens - 1 - start)
            entries = []
            if n_pred > 0:
                lps = torch.log_softmax(self.model.compute_logits(hidden[flat_start:flat_start + n_pred]).float(), -1)
                target_ids = req.prompt_token_ids[start + 1:start + 1 + n_pred]
                targets = torch.tensor(target_ids, device=lps.device)
                chosen = lps.gather(1, targets[:, None])[:, 0].tolist()
                k = req.params.prompt_logprobs
                topv, topi = lps.topk(k, dim=-1) if k > 0 else (None, None)
                for j in range(n_pred):
                    d = {target_ids[j]: chosen[j]}
                    if k > 0:
                        for v, t in zip(topv[j].tolist(), topi[j].tolist()):
                            d.setdefault(t, v)
                    entries.append(d)
            result[req.request_id] = ([None] if start == 0 else []) + entries
        return result
