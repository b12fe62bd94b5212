"""Runs the model for one step's `SchedulerOutput` and returns a `ModelRunnerOutput`.

Owns: loading the model onto the device, the KV cache tensors (one pool, sized by the resolve step,
engine/resolve.py), its own per-request state (engine/input_batch.py's `InputBatch`, updated from each
`SchedulerOutput`), building the flat batch tensors from that state, the forward pass, and sampling
(the sampled tokens are appended to its state). When the policy offloads weights or micro-batches a
step, the model is built and each step run by engine/offload_runner.py; both schedules share
`prepare_batch` and `_sample`. For --quant w8a8 it first measures the float model's activations on
calibration text (model/smooth.py) so quantize_model can smooth each layer.
Must not: decide who runs (the scheduler does), touch request lifecycles (the engine does), or read
scheduler- or engine-owned objects (`Request`, the block manager): it knows only the step messages
(engine/step_io.py), so the same messages could drive several worker processes.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from tidal.config import EngineConfig
from tidal.engine.input_batch import InputBatch, Row, prepare_batch
from tidal.engine.offload_runner import OffloadSchedule, build_offloaded_model, kv_cache_tiers
from tidal.engine.resolve import ResolvedEngine, num_kv_blocks_for, resolve_engine_config
from tidal.engine.step_io import ModelRunnerOutput, SchedulerOutput
from tidal.errors import TidalError
from tidal.kernels import get_backend
from tidal.kernels.metadata import forward_context
from tidal.kv.quant_cache import allocate_kv_cache, kv_file
from tidal.model.fused_decode import build_fused_decode
from tidal.model.registry import build_model
from tidal.sampling import Sampler, SamplingMetadata, plain_greedy
from tidal.structured.bitmask import GrammarBitmask, apply_bitmask
from tidal.weights.dummy import fill_dummy
from tidal.model.quantize import quantize_head, quantize_model
from tidal.model.smooth import CALIBRATION_TOKENS, activation_maxima, calibration_text


class ModelRunner:
    def __init__(self, resolved: ResolvedEngine | EngineConfig, checkpoint=None, verbose: bool = False,
                 tokenizer=None):
        """`resolved`: the engine's resolved plan; a bare EngineConfig (a runner used on its own, as
        tests do) is resolved here. `tokenizer`: the engine's, for --quant w8a8's calibration text (loaded
        from the checkpoint when not given)."""
        if isinstance(resolved, EngineConfig):
            resolved = resolve_engine_config(resolved, checkpoint)
        self.resolved = resolved
        config = self.config = resolved.config
        self.device, self.dtype = config.torch_device, config.torch_dtype
        t0 = time.perf_counter()
        self.checkpoint = resolved.checkpoint
        hf = self.hf_config = resolved.hf_config
        self.max_model_len = resolved.max_model_len
        # where weights / KV live and how a step is micro-batched (resolved; engine/offload_runner.py runs it)
        self.policy, self.plan = resolved.policy, resolved.plan
        model_len, quant = resolved.model_max_position, resolved.quant
        self.prefetcher = self.fused_decode = None
        if self.policy.offloads_weights:
            self.model, self.placement, self.prefetcher = build_offloaded_model(
                self, self.policy, model_len, quant, verbose)
        else:
            self.model = build_model(hf, self.device, self.dtype, max_position=model_len)
            self._load_weights(verbose, quant)
            if quant is not None:
                w8a8 = self.config.quant == "w8a8"
                quantize_model(self.model, *quant, w8a8=w8a8,
                               act_maxima=self._calibrate(verbose, tokenizer) if w8a8 else None)
            if self.config.quant_head != "none":
                quantize_head(self.model, self.config.quant_head)
            backend = get_backend(self.device)
            for module in self.model.modules():
                if hasattr(module, "pack"):
                    module.pack(backend)
            self.fused_decode = build_fused_decode(self.model)
        self.schedule = OffloadSchedule(self, resolved.num_micro_batches, self.prefetcher) \
            if self.policy.offloads_weights or resolved.num_micro_batches > 1 else None
        self.load_seconds = time.perf_counter() - t0
        self.num_layers = hf.num_hidden_layers
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.block_size = resolved.block_size
        # resolved before the build, except where it depends on what the loaded weights leave
        self.num_blocks = resolved.num_kv_blocks or num_kv_blocks_for(
            resolved, weights_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()))
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
        self.vocab_size = resolved.vocab_size
        self.eos_token_ids: set[int] = set()   # the engine sets them (tokenizer + generation config)
        self.input_batch = InputBatch()

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

    def _calibrate(self, verbose: bool, tokenizer=None) -> dict[str, torch.Tensor]:
        """--quant w8a8: each layer's activation maxima on model/smooth.py's calibration text (one prefill
        of ~1k tokens through the float model), for smoothing before rounding."""
        t0 = time.perf_counter()
        if tokenizer is None:
            tokenizer = self.checkpoint.load_tokenizer(self.config.tokenizer)
        # no longer than the model takes, and only ids it has rows for (a test model may borrow a bigger vocabulary)
        ids = [t for t in tokenizer.encode(calibration_text()) if t < self.resolved.vocab_size]
        ids = ids[:min(CALIBRATION_TOKENS, self.max_model_len)]
        maxima = activation_maxima(self.model, ids)
        if verbose:
            print(f"[tidal] --quant w8a8: smoothing calibrated on {len(ids)} tokens in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        return maxima

    def kv_bytes_per_block(self) -> int:
        return self.resolved.kv_bytes_per_block

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Update the runner's state from `so`, run the scheduled rows, sample those that reached their last
        token (masking the rows in `so.grammar_bitmask` first), append the sampled tokens to the state."""
        rows = self.input_batch.update(so)
        if not rows:
            return ModelRunnerOutput()
        parts = self.schedule.forward(rows) if self.schedule is not None else [self.forward(rows)]
        return self._sample(rows, parts, so.grammar_bitmask)

    @torch.inference_mode()
    def forward(self, rows: list[Row]):
        """Build the flat batch, write its K/V into the cache, and return (hidden [T, H], batch layout)."""
        layout = prepare_batch(rows, self.block_size, self.device)
        if self.fused_decode is not None and self.fused_decode.applies(layout.meta, self.kv_caches):
            return self.fused_decode(layout.input_ids, layout.positions, layout.meta, self.kv_caches), layout
        with forward_context(layout.meta, self.kv_caches):
            hidden = self.model(layout.input_ids, layout.positions)
        return hidden, layout

    def _sample(self, rows: list[Row], parts: list, grammar: GrammarBitmask | None = None) -> ModelRunnerOutput:
        """Sample the rows that need it from [(hidden, BatchLayout)] (one per micro-batch), as one batch."""
        dev = self.device
        out = ModelRunnerOutput(req_ids=[s.req_id for s, _ in rows], sampled_token_ids=[[] for _ in rows],
                                logprobs=[None] * len(rows))
        hidden_rows, states = [], []
        for hidden, layout in parts:
            if layout.plp_rows:
                out.prompt_logprobs.update(self._prompt_logprobs(hidden, layout.plp_rows))
            if layout.sample_states:
                hidden_rows.append(hidden[torch.tensor(layout.sample_idx, device=dev)])
                states += layout.sample_states
        if not states:
            return out
        # fp32 before argmax too: torch's argmax over a bf16 row of 49,152 takes 178 us, .float() + argmax 65
        logits = self.model.compute_logits(torch.cat(hidden_rows) if len(hidden_rows) > 1 else hidden_rows[0]).float()
        params, outputs = [s.sampling_params for s in states], [s.output_token_ids for s in states]
        if grammar is None and plain_greedy(params, outputs):
            token_ids, chosen_lp, top = logits.argmax(dim=-1).tolist(), None, None   # argmax is the whole step
        else:
            if grammar is not None:   # before penalties and sampling, so greedy and seeded draws both obey it
                row_of = {s.req_id: i for i, s in enumerate(states)}
                apply_bitmask(logits, [row_of[rid] for rid in grammar.request_ids], grammar)
            smeta = SamplingMetadata.build(
                params, [s.seed for s in states], [s.prompt_token_ids for s in states], outputs,
                self.eos_token_ids, self.vocab_size, dev)
            sampled = self.sampler(logits, smeta)
            token_ids = sampled.token_ids.tolist()
            chosen_lp = sampled.logprobs.tolist() if sampled.logprobs is not None else None
            top = (sampled.top_logprobs[0].tolist(), sampled.top_logprobs[1].tolist()) \
                if sampled.top_logprobs is not None else None
        index = {req_id: i for i, req_id in enumerate(out.req_ids)}
        for i, state in enumerate(states):
            num_lp = state.sampling_params.logprobs
            if num_lp is not None and chosen_lp is not None:
                lp = {token_ids[i]: chosen_lp[i]}
                if top is not None:
                    for v, t in list(zip(top[0][i], top[1][i]))[:num_lp]:
                        lp.setdefault(t, v)
                out.logprobs[index[state.req_id]] = [lp]
            out.sampled_token_ids[index[state.req_id]] = [token_ids[i]]
            state.append_output(token_ids[i])   # the runner's own copy; the engine appends to its Request
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, rows) -> dict:
        """Logprob of each prompt token given the ones before it, plus the top-k there."""
        result = {}
        for state, flat_start, n in rows:
            start = state.num_computed_tokens
            # position p predicts token p+1; the last prompt position predicts the first output, not a prompt token
            n_pred = min(n, state.num_prompt_tokens - 1 - start)
            entries = []
            if n_pred > 0:
                lps = torch.log_softmax(self.model.compute_logits(hidden[flat_start:flat_start + n_pred]).float(), -1)
                target_ids = state.prompt_token_ids[start + 1:start + 1 + n_pred]
                targets = torch.tensor(target_ids, device=lps.device)
                chosen = lps.gather(1, targets[:, None])[:, 0].tolist()
                k = state.sampling_params.prompt_logprobs
                topv, topi = lps.topk(k, dim=-1) if k > 0 else (None, None)
                for j in range(n_pred):
                    d = {target_ids[j]: chosen[j]}
                    if k > 0:
                        for v, t in zip(topv[j].tolist(), topi[j].tolist()):
                            d.setdefault(t, v)
                    entries.append(d)
            result[state.req_id] = ([None] if start == 0 else []) + entries
        return result
