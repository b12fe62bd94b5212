"""Which requests advance this step, and by how many tokens.

Owns: the waiting queue (ordered by priority, then arrival) and the running list, the
token budget, admission checks, and preemption. Prefill and decode share one rule: each
scheduled request's computed-token count catches up to its token count, as far as the
budget allows, so a long prompt is prefilled in chunks between running decodes.
A waiting request whose next uncached prompt block is being prefilled right now by a running request
(a burst of requests sharing a system prompt) waits until that block is computed, then takes it from
the prefix cache, instead of computing the same prefix again beside it (SGLang schedules bursts the
same way); the requests behind it in the queue still go ahead.
`schedule()` returns a plain-data `SchedulerOutput` (engine/step_io.py): a request the runner
has no state for goes in full (`NewRequestData`), a running one as the block ids added since
the last step and its computed-token count; finished, aborted and preempted ids since the last
step go in `finished_req_ids`, so the runner drops their state. A preempted request comes back
later as a new one carrying its output tokens (recompute).
Must not: touch tensors or the model; it speaks block ids through the BlockManager.
"""
from __future__ import annotations

import bisect

from tidal.engine.request import Request, RequestStatus
from tidal.engine.step_io import NewRequestData, SchedulerOutput
from tidal.kv.block_manager import BlockManager, hash_block


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0, short_prefill_tokens: int = 0):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # vLLM's knob: a prefill gets at most this many tokens a step (0: no cap), so a long cold prompt
        # leaves budget for short ones behind it (e.g. the rest of its group, warm in the prefix cache)
        self.long_prefill_token_threshold = long_prefill_token_threshold
        # shortest-first between prefills: a waiting request needing at most this many prompt tokens
        # (0: off) goes ahead of running prefills that need more, so a burst's warm followers are not
        # stuck behind another prompt's cold 2,048-token prefill (TTFT tail)
        self.short_prefill_tokens = short_prefill_tokens
        self._budget = 0   # tokens left in the step being scheduled
        self._pending: set[int] | None = None   # its prompt blocks being prefilled (_pending_blocks)
        self.waiting: list[Request] = []   # sorted by sort_key
        self.running: list[Request] = []   # in admission order
        self.num_preemptions = 0
        # block ids already sent to the runner per request it holds state for; a request not here goes
        # to the runner as a new one
        self._num_sent_blocks: dict[str, int] = {}
        self._finished_ids: set[str] = set()   # to tell the runner at the next schedule()
        # chain hashes of the full blocks of requests waiting or in prefill, computed once each
        self._hashes: dict[str, list[int]] = {}
        self.num_prefix_waits = 0   # steps a waiting request was held back for a prefix being computed

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        keys = [r.sort_key for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, req.sort_key), req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request and release its blocks."""
        self._forget(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.bm.free(req.request_id)

    def _forget(self, req: Request) -> None:
        """The runner is to drop req's state (it may not have any: then the id is ignored there)."""
        self._num_sent_blocks.pop(req.request_id, None)
        self._hashes.pop(req.request_id, None)
        self._finished_ids.add(req.request_id)

    def schedule(self) -> SchedulerOutput:
        reqs: list[Request] = []          # scheduled this step, in row order
        num_new_tokens: list[int] = []
        preempted: list[Request] = []
        self._budget = self.max_num_batched_tokens
        self._pending = None
        short = self.short_prefill_tokens
        # with short_prefill_tokens: running prefills longer than that wait until decodes and the
        # waiting requests that need at most that many tokens (warm in the prefix cache) are in
        now, later = [], []
        for r in self.running:
            (later if short and r.num_tokens - r.num_computed_tokens > short else now).append(r)
        self._continue_all(now, reqs, num_new_tokens, preempted)
        if short:
            self._admit(reqs, num_new_tokens, preempted, short)
            self._continue_all(later, reqs, num_new_tokens, preempted)
        self._admit(reqs, num_new_tokens, preempted, 0)
        return self._output(reqs, num_new_tokens, preempted)

    def _continue_all(self, running: list[Request], reqs: list[Request], num_new_tokens: list[int],
                      preempted: list[Request]) -> None:
        for req in running:
            if self._budget == 0:
                break
            if req.status == RequestStatus.RUNNING:  # not preempted earlier in this step
                self._continue(req, reqs, num_new_tokens, preempted)

    def _continue(self, req: Request, reqs: list[Request], num_new_tokens: list[int], preempted: list[Request]) -> None:
        """Schedule running req's next tokens, preempting the latest arrivals while memory is short."""
        num_new = min(req.num_tokens - req.num_computed_tokens, self._budget, self._cap)
        while not self.bm.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, num_new):
            victim = max(self.running, key=lambda r: r.sort_key)
            self._budget += self._preempt(victim, reqs, num_new_tokens, preempted)
            if victim is req:
                return
        reqs.append(req)
        num_new_tokens.append(num_new)
        self._budget -= num_new

    def _admit(self, reqs: list[Request], num_new_tokens: list[int], preempted: list[Request], at_most: int) -> None:
        """Admit waiting requests in queue order while budget, slots and memory last; with `at_most`,
        only those whose uncached prompt is at most that many tokens (the others keep their place)."""
        # memory is tight when something was preempted: let the running set drain before admitting more
        if preempted or not self.waiting:
            return
        if self._pending is None:   # once a step; requests admitted here add theirs below
            self._pending = self._pending_blocks()
        pending = self._pending
        i = 0
        while i < len(self.waiting) and self._budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[i]
            tokens = req.all_token_ids
            reuse = req.params.prompt_logprobs is None and self.bm.enable_prefix_caching
            if reuse:
                computed_blocks, num_cached = self.bm.get_computed_blocks(tokens)
                hashes, nxt = self._block_hashes(req), num_cached // self.bm.block_size
                if nxt < len(hashes) and hashes[nxt] in pending:
                    self.num_prefix_waits += 1
                    i += 1   # its next block is being computed: take it from the cache in a later step
                    continue
            else:  # prompt logprobs need logits at every prompt position, so nothing may be skipped
                computed_blocks, num_cached = [], 0
            if at_most and len(tokens) - num_cached > at_most:
                i += 1
                continue
            num_new = min(len(tokens) - num_cached, self._budget, self._cap)
            if not self.bm.allocate_slots(req.request_id, tokens, num_cached, num_new, computed_blocks):
                break
            self.waiting.pop(i)
            if reuse:
                pending.update(hashes[nxt:])
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            self.running.append(req)
            reqs.append(req)
            num_new_tokens.append(num_new)
            self._budget -= num_new

    @property
    def _cap(self) -> int:
        return self.long_prefill_token_threshold if self.long_prefill_token_threshold > 0 else self.max_num_batched_tokens

    def _block_hashes(self, req: Request) -> list[int]:
        """Chain hashes of req's full blocks (the block manager's), kept while it waits or prefills."""
        bs, tokens = self.bm.block_size, req.all_token_ids
        hashes = self._hashes.get(req.request_id)
        if hashes is None or len(hashes) != len(tokens) // bs:
            hashes, parent = [], None
            for i in range(len(tokens) // bs):
                parent = hash_block(parent, tokens[i * bs:(i + 1) * bs])
                hashes.append(parent)
            self._hashes[req.request_id] = hashes
        return hashes

    def _pending_blocks(self) -> set[int]:
        """Hashes of the full blocks that running requests are still prefilling."""
        if not self.bm.enable_prefix_caching:
            return set()
        pending: set[int] = set()
        for req in self.running:
            if req.num_computed_tokens + 1 >= req.num_tokens or req.params.prompt_logprobs is not None:
                self._hashes.pop(req.request_id, None)   # decoding: its blocks are all computed
                continue
            pending.update(self._block_hashes(req)[req.num_computed_tokens // self.bm.block_size:])
        return pending

    def _output(self, reqs: list[Request], num_new_tokens: list[int], preempted: list[Request]) -> SchedulerOutput:
        """The step as plain data. O(scheduled requests + new blocks), except a request the runner does
        not hold yet, which goes once in full."""
        so = SchedulerOutput(total_num_scheduled_tokens=sum(num_new_tokens), finished_req_ids=self._finished_ids,
                             preempted_req_ids={r.request_id for r in preempted})
        self._finished_ids = set()
        for req, n in zip(reqs, num_new_tokens):
            rid = req.request_id
            so.num_scheduled_tokens[rid] = n
            sent = self._num_sent_blocks.get(rid)
            forced, req.forced_token_ids = req.forced_token_ids, []   # the runner learns them here
            if sent is None:
                block_ids = self.bm.get_block_table(rid)
                so.scheduled_new_reqs.append(NewRequestData(
                    rid, req.prompt_token_ids, list(req.output_token_ids), req.params, req.seed, block_ids,
                    req.num_computed_tokens))
                self._num_sent_blocks[rid] = len(block_ids)
            else:
                new_blocks = self.bm.new_block_ids(rid, sent)
                so.scheduled_cached_reqs.append(rid, new_blocks, req.num_computed_tokens, forced)
                self._num_sent_blocks[rid] = sent + len(new_blocks)
        return so

    def _preempt(self, req: Request, reqs: list[Request], num_new_tokens: list[int], preempted: list[Request]) -> int:
        """Recompute-style preemption: drop the KV, requeue; the prefix cache often gives most of it back.
        Returns the tokens it had been given this step, which go back to the budget."""
        self.running.remove(req)
        self.bm.free(req.request_id)
        self._forget(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        returned = 0
        if req in reqs:
            i = reqs.index(req)
            reqs.pop(i)
            returned = num_new_tokens.pop(i)
        preempted.append(req)
        self.add(req)
        req.status = RequestStatus.PREEMPTED
        return returned
