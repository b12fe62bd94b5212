"""The engine loop: schedule -> execute -> update.

Owns: `LLMEngine` (add_request / abort_request / step), admission checks (prompt too long,
cache too small), n > 1 fan-out into sibling requests, acting on stop conditions (stop_checks.py
checks them, a grammar's end among them), incremental detokenization into text deltas, KV-block
bookkeeping after each step, and the engine stats the server's metrics read. A step:
`so = scheduler.schedule()` (a plain-data `SchedulerOutput`; the engine adds the grammar bitmask
rows) -> `out = runner.execute_model(so)` (a `ModelRunnerOutput`) -> `_update(so, out)`. The
configuration is resolved once, before anything is built (engine/resolve.py); the scheduler and
the runner both read that plan.
Must not: know about HTTP or threads (the async engine and server sit above it).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from tidal.config import EngineConfig
from tidal.engine.detokenizer import IncrementalDetokenizer
from tidal.engine.model_runner import ModelRunner
from tidal.engine.request import Request, RequestStatus
from tidal.engine.resolve import resolve_engine_config
from tidal.engine.scheduler import Scheduler
from tidal.engine.step_io import ModelRunnerOutput, SchedulerOutput
from tidal.engine.stop_checks import check_stop, eos_ids
from tidal.engine.structured_requests import GrammarRequests
from tidal.errors import TidalError
from tidal.kv.block_manager import BlockManager
from tidal.outputs import CompletionOutput, RequestOutput
from tidal.sampling import SamplingParams
from tidal.weights.generation_config import generation_defaults

logger = logging.getLogger("tidal.engine")


@dataclass
class _Parent:
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    arrival_time: float
    first_token_time: float | None = None
    deltas: dict = field(default_factory=dict)   # child index -> (delta text, delta token ids) since last step


class LLMEngine:
    def __init__(self, config: EngineConfig, verbose: bool = False):
        self.config = config
        self.resolved = resolved = resolve_engine_config(config)
        self.runner = ModelRunner(resolved, verbose=verbose)
        ckpt = resolved.checkpoint
        if config.tokenizer:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        else:
            self.tokenizer = ckpt.load_tokenizer()
        # the sampling a request leaves unset, from the model's generation config (vLLM's rule)
        self.default_sampling, extra_eos = generation_defaults(config.model, ckpt.path, config.generation_config)
        self.eos_token_ids = eos_ids(self.tokenizer, ckpt.hf_config) | extra_eos
        self.runner.eos_token_ids = self.eos_token_ids
        self.max_model_len = resolved.max_model_len
        self.vocab_size = resolved.vocab_size
        # the one KV figure that can depend on the loaded weights (resolve.py): the runner's, sized at load
        num_blocks = resolved.num_kv_blocks or self.runner.num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # an offloading policy's batch and token budget (bs sequences in each of mb micro-batches): resolve.py
        self.scheduler = Scheduler(self.block_manager, resolved.max_num_seqs, resolved.max_num_batched_tokens)
        self.grammars = GrammarRequests(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._rng = random.Random(config.seed)
        self._parents: dict[str, _Parent] = {}
        self._requests: dict[str, Request] = {}
        self._counter = 0
        self.last_scheduler_output: SchedulerOutput | None = None   # the most recent step's, for tests
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "aborted": 0}

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> str:
        params = params or SamplingParams()
        if request_id is None:
            request_id = str(self._counter)
            self._counter += 1
        if request_id in self._parents:
            raise TidalError(f"request id '{request_id}' is already in use", param="request_id")
        if isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise TidalError("a request needs a prompt string or prompt token ids", param="prompt")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        self._check_admission(prompt_token_ids, params)
        params = params.resolve_token_controls(self.tokenizer, self.vocab_size)   # bad_words -> ids
        compiled = self.grammars.compile(params)   # a bad grammar is refused here, before anything is added
        now = arrival_time if arrival_time is not None else time.monotonic()
        children = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(63)
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(cid, list(prompt_token_ids), params, seed, priority=priority, arrival_time=now,
                          parent_id=request_id, index=i)
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params)
            if params.logprobs is not None:
                req.logprobs = []
            children.append(req)
            self._requests[cid] = req
            if compiled is None or self.grammars.attach(req, compiled):
                self.scheduler.add(req)
        self._parents[request_id] = _Parent(prompt, list(prompt_token_ids), children, now)
        return request_id

    def _check_admission(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise TidalError("the prompt is empty; give at least one token", param="prompt")
        if n >= self.max_model_len:
            raise TidalError(f"the prompt has {n} tokens but this model's context is {self.max_model_len} tokens "
                             "(prompt plus at least one generated token); shorten the prompt", param="prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise TidalError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                             param="prompt")
        total = min(n + (params.max_tokens or self.max_model_len), self.max_model_len)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if total > capacity:
            raise TidalError(f"the request needs up to {total} tokens of KV cache but the whole cache holds "
                             f"{capacity}; lower max_tokens or give the engine more --kv-mem", param="max_tokens")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks return to the pool. Returns its final output (finish_reason "abort")."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for req in parent.children:
            if not req.is_finished:
                self._finish(req, "abort")
        self.stats["aborted"] += 1
        return self._make_output(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        ready, failed = self.grammars.take_compiled(idle=not self.scheduler.has_work())
        for req in ready:
            self.scheduler.add(req)
        for req in failed:   # validated at add_request, so only an xgrammar bug lands here
            self._finish(req, "abort")
        so = self.last_scheduler_output = self.scheduler.schedule()
        touched: set[str] = {r.parent_id for r in failed}
        touched.update(self._requests[rid].parent_id for rid in so.preempted_req_ids)
        if so.num_scheduled_tokens:
            so.grammar_bitmask = self.grammars.bitmask(
                [self._requests[rid] for rid in so.num_scheduled_tokens], list(so.num_scheduled_tokens.values()))
        if so.num_scheduled_tokens or so.finished_req_ids:   # an idle step still drops finished state
            touched |= self._update(so, self.runner.execute_model(so))
        return [self._make_output(pid) for pid in touched if pid in self._parents]

    def _update(self, so: SchedulerOutput, out: ModelRunnerOutput) -> set[str]:
        """Advance each scheduled request by what the runner computed and sampled; returns the parent ids
        with new output."""
        touched = set()
        now = time.monotonic()
        for rid, tokens, lps in zip(out.req_ids, out.sampled_token_ids, out.logprobs):
            req = self._requests[rid]
            req.num_computed_tokens += so.num_scheduled_tokens[rid]
            self.block_manager.cache_full_blocks(rid, req.all_token_ids, req.num_computed_tokens)
            if rid in out.prompt_logprobs:
                req.prompt_logprobs = (req.prompt_logprobs or []) + out.prompt_logprobs[rid]
            for j, token in enumerate(tokens):
                if req.is_finished:   # stopped before the last of several accepted tokens
                    break
                self._append_token(req, token, lps[j] if lps is not None else None, now)
            if tokens:
                touched.add(req.parent_id)
        return touched

    def _append_token(self, req: Request, token: int, lp, now: float) -> None:
        if req.first_token_time is None:
            req.first_token_time = now
            parent = self._parents[req.parent_id]
            parent.first_token_time = parent.first_token_time or now
        req.append_output(token)
        self.stats["generation_tokens"] += 1
        # the mask allowed only what the grammar accepts; a refusal (every token masked, e.g. min_tokens
        # banning the only stop the grammar allows) ends the request rather than break its output
        refused = req.grammar is not None and not req.grammar.accept(token)
        if lp is not None and req.logprobs is not None:
            req.logprobs.append(lp)
            req.cumulative_logprob += lp[token]
        delta, stopped = req.detokenizer.append(token)
        if refused:
            logger.error("request %s: its grammar refused sampled token %d; aborting it", req.request_id, token)
            reason, stop_reason = "abort", None
        else:
            reason, stop_reason = check_stop(req, token, stopped, self.eos_token_ids, self.max_model_len)
        self._add_delta(req, delta, [token])
        if reason is not None:
            if not stopped:
                self._add_delta(req, req.detokenizer.flush(), [])
            req.stop_reason = stop_reason
            self._finish(req, reason)

    def _add_delta(self, req: Request, text: str, tokens: list[int]) -> None:
        d = self._parents[req.parent_id].deltas
        old_text, old_tokens = d.get(req.index, ("", []))
        d[req.index] = (old_text + text, old_tokens + tokens)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.scheduler.remove(req)
        self.grammars.discard(req)
        req.status = RequestStatus.FINISHED
        self.stats["finished"] += 1
        self._requests.pop(req.request_id, None)

    def _make_output(self, parent_id: str) -> RequestOutput:
        parent = self._parents[parent_id]
        outs = []
        for req in parent.children:
            text, toks = parent.deltas.get(req.index, ("", []))
            outs.append(CompletionOutput(
                index=req.index, text=req.detokenizer.output_text, token_ids=list(req.output_token_ids),
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=list(req.logprobs) if req.logprobs is not None else None,
                cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
                delta_text=text, delta_token_ids=toks))
        parent.deltas.clear()
        finished = all(r.is_finished for r in parent.children)
        first = parent.children[0]
        out = RequestOutput(parent_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                            prompt_logprobs=first.prompt_logprobs, num_cached_tokens=first.num_cached_tokens,
                            metrics={"arrival_time": parent.arrival_time, "first_token_time": parent.first_token_time,
                                     "finished_time": time.monotonic() if finished else None})
        if finished:
            del self._parents[parent_id]
            self.stats["prompt_tokens"] += len(parent.prompt_token_ids)
        return out

    def kv_stats(self) -> dict:
        return self.block_manager.stats()

