"""The engine core: schedule -> execute -> update, on token ids only.

Owns: `EngineCore` (add_requests / abort_requests / step): the resolved configuration, the model runner,
the block manager and the scheduler, the grammar matchers, the stop conditions that need no text
(stop_checks.py: EOS, stop token ids, max_tokens, the context, a grammar's end), jump-forward decoding,
KV-block bookkeeping after each step and the counters the server's metrics read; with
`config.kv_events_endpoint`, the block manager's events published from here (kv/event_publisher.py). A step:
`so = scheduler.schedule()` (a plain-data `SchedulerOutput`; the core adds the grammar bitmask rows) ->
`out = runner.execute_model(so)` (a `ModelRunnerOutput`) -> `_update(so, out)` -> one `EngineCoreOutput`
per sequence that advanced, carrying its new token ids only (core_io.py).
Jump-forward: where a request's grammar allows exactly one next token, the core appends it without a
decode step (masked decoding could have sampled nothing else, so the output is the same) and the next
step computes it with the others, like a short prefill; `stats["jump_forward_tokens"]` counts the decode
steps saved. Requests asking for logprobs or logit controls are left to plain masked decoding.
Must not: see text, detokenize or look for stop strings, fan out n > 1, or check prompts for admission
(the frontend does: input_processor.py, output_processor.py); know about threads, processes or HTTP
(core_loop.py runs it).
"""
from __future__ import annotations

import logging

from tidal.config import EngineConfig
from tidal.engine.core_base import CoreBase, new_stats
from tidal.engine.core_io import EngineCoreOutput, EngineCoreRequest
from tidal.engine.model_runner import ModelRunner
from tidal.engine.request import Request
from tidal.engine.resolve import resolve_engine_config
from tidal.engine.scheduler import Scheduler
from tidal.engine.step_io import ModelRunnerOutput, SchedulerOutput
from tidal.engine.stop_checks import check_stop, eos_ids
from tidal.engine.structured_requests import GrammarRequests
from tidal.kv.block_manager import BlockManager
from tidal.kv.event_publisher import KVEventPublisher
from tidal.weights.generation_config import generation_defaults

logger = logging.getLogger("tidal.engine")


class EngineCore(CoreBase):
    def __init__(self, config: EngineConfig, verbose: bool = False):
        self.config = config
        self.resolved = resolved = resolve_engine_config(config)
        ckpt = resolved.checkpoint
        self.tokenizer = ckpt.load_tokenizer(config.tokenizer)   # first: --quant w8a8 calibrates with it
        self.runner = ModelRunner(resolved, verbose=verbose, tokenizer=self.tokenizer)
        # the sampling a request leaves unset, from the model's generation config (vLLM's rule)
        self.default_sampling, extra_eos = generation_defaults(config.model, ckpt.path, config.generation_config)
        self.eos_token_ids = eos_ids(self.tokenizer, ckpt.hf_config) | extra_eos
        self.runner.eos_token_ids = self.eos_token_ids
        self.max_model_len = resolved.max_model_len
        self.vocab_size = resolved.vocab_size
        # the one KV figure that can depend on the loaded weights (resolve.py): the runner's, sized at load
        num_blocks = resolved.num_kv_blocks or self.runner.num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_event_publisher = None   # the block events on a ZeroMQ PUB socket, from where the core runs
        if config.kv_events_endpoint:
            self.kv_event_publisher = KVEventPublisher(config.kv_events_endpoint).attach(self.block_manager)
        # an offloading policy's batch and token budget (bs sequences in each of mb micro-batches): resolve.py
        self.scheduler = Scheduler(self.block_manager, resolved.max_num_seqs, resolved.max_num_batched_tokens,
                                   config.long_prefill_token_threshold, config.short_prefill_tokens)
        self.grammars = GrammarRequests(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.jump_forward = config.enable_jump_forward
        self._requests: dict[str, Request] = {}
        self.last_scheduler_output: SchedulerOutput | None = None   # the most recent step's, for tests
        self.stats = new_stats()

    # ---- requests ----------------------------------------------------------------------------
    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queue sequences the frontend has checked (input_processor.py). A grammar is compiled off the
        step loop: the request reaches the scheduler when it is ready."""
        for r in requests:
            req = self._admit(r)
            if req is None:
                continue
            compiled = self.grammars.compile(r.params)
            if compiled is None or self.grammars.attach(req, compiled):
                self.scheduler.add(req)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        outputs: dict[str, EngineCoreOutput] = {}
        ready, failed = self.grammars.take_compiled(idle=not self.scheduler.has_work())
        for req in ready:
            self.scheduler.add(req)
        for req in failed:   # the frontend checked the spec, so only an xgrammar bug lands here
            self._finish(req, "abort")
            outputs[req.request_id] = EngineCoreOutput(req.request_id, [], finish_reason="abort")
        so = self.last_scheduler_output = self.scheduler.schedule()
        if so.num_scheduled_tokens:
            so.grammar_bitmask = self.grammars.bitmask(
                [self._requests[rid] for rid in so.num_scheduled_tokens], list(so.num_scheduled_tokens.values()))
        if so.num_scheduled_tokens or so.finished_req_ids:   # an idle step still drops finished state
            self._update(so, self.runner.execute_model(so), outputs)
        return list(outputs.values())

    def _update(self, so: SchedulerOutput, out: ModelRunnerOutput, outputs: dict[str, EngineCoreOutput]) -> None:
        """Advance each scheduled request by what the runner computed and sampled."""
        for rid, tokens, lps in zip(out.req_ids, out.sampled_token_ids, out.logprobs):
            req = self._requests[rid]
            req.num_computed_tokens += so.num_scheduled_tokens[rid]
            self.block_manager.cache_full_blocks(rid, req.all_token_ids, req.num_computed_tokens)
            plp = out.prompt_logprobs.get(rid)
            if not tokens and plp is None:
                continue
            o = outputs[rid] = EngineCoreOutput(rid, [], [] if req.logprobs is not None else None, plp,
                                                num_cached_tokens=req.num_cached_tokens)
            for j, token in enumerate(tokens):
                if req.is_finished:   # stopped before the last of several accepted tokens
                    break
                self._append_token(req, token, lps[j] if lps is not None else None, o)
            if tokens and self.jump_forward and self._may_jump(req):
                self._jump_forward(req, o)

    def _append_token(self, req: Request, token: int, lp, o: EngineCoreOutput) -> None:
        req.append_output(token)
        self.stats["generation_tokens"] += 1
        o.new_token_ids.append(token)
        if lp is not None and o.new_logprobs is not None:
            o.new_logprobs.append(lp)
        # the mask allowed only what the grammar accepts; a refusal (every token masked, e.g. min_tokens
        # banning the only stop the grammar allows) ends the request rather than break its output
        if req.grammar is not None and not req.grammar.accept(token):
            logger.error("request %s: its grammar refused sampled token %d; aborting it", req.request_id, token)
            reason, stop_reason = "abort", None
        else:
            reason, stop_reason = check_stop(req, token, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            o.finish_reason, o.stop_reason = reason, stop_reason
            self._finish(req, reason)

    def _may_jump(self, req: Request) -> bool:
        p = req.params
        return (req.grammar is not None and not req.is_finished and p.logprobs is None and p.logit_bias is None
                and p.allowed_token_ids is None and not p.bad_words_token_ids)

    def _jump_forward(self, req: Request, o: EngineCoreOutput) -> None:
        """Append the tokens the grammar forces, one at a time, while it allows exactly one."""
        p = req.params
        while not req.is_finished:
            token = req.grammar.forced_token(self.vocab_size)
            if token is None:
                break
            if len(req.output_token_ids) < p.min_tokens and (token in self.eos_token_ids
                                                             or token in (p.stop_token_ids or ())):
                break   # min_tokens bans it: leave it to the masked step (which refuses and aborts)
            self.stats["jump_forward_tokens"] += 1
            req.forced_token_ids.append(token)
            self._append_token(req, token, None, o)

    def _on_finish(self, req: Request) -> None:
        self.grammars.discard(req)

    def shutdown(self) -> None:
        self.grammars.shutdown()
        if self.kv_event_publisher is not None:
            self.kv_event_publisher.close()
