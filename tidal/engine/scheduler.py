"""Which requests advance this step, and by how many tokens.

Owns: the waiting queue (ordered by priority, then arrival) and the running list, the
token budget, admission checks, and preemption. Prefill and decode share one rule: each
scheduled request's computed-token count catches up to its token count, as far as the
budget allows, so a long prompt is prefilled in chunks between running decodes.
Must not: touch tensors or the model; it speaks block ids through the BlockManager.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tidal.engine.request import Request, RequestStatus
from tidal.kv.block_manager import BlockManager


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []   # sorted by sort_key
        self.running: list[Request] = []   # in admission order
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        keys = [r.sort_key for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, req.sort_key), req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request and release its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.bm.free(req.request_id)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.bm.allocate_slots(req.request_id, req.all_token_ids, req.num_computed_tokens, num_new):
                victim = max(self.running, key=lambda r: r.sort_key)
                budget += self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
        if batch.preempted:  # memory is tight: let the running set drain before admitting more
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            tokens = req.all_token_ids
            if req.params.prompt_logprobs is None:
                computed_blocks, num_cached = self.bm.get_computed_blocks(tokens)
            else:  # prompt logprobs need logits at every prompt position, so nothing may be skipped
                computed_blocks, num_cached = [], 0
            num_new = min(len(tokens) - num_cached, budget)
            if not self.bm.allocate_slots(req.request_id, tokens, num_cached, num_new, computed_blocks):
                break
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, req: Request, batch: ScheduledBatch) -> int:
        """Recompute-style preemption: drop the KV, requeue; the prefix cache often gives most of it back.
        Returns the tokens it had been given this step, which go back to the budget."""
        self.running.remove(req)
        self.bm.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        returned = 0
        if req in batch.requests:
            i = batch.requests.index(req)
            batch.requests.pop(i)
            returned = batch.num_new_tokens.pop(i)
        batch.preempted.append(req)
        self.add(req)
        req.status = RequestStatus.PREEMPTED
        return returned
