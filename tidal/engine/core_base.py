"""What every engine core shares: the real one (core.py) and the simulated one (sim/core.py).

Owns: `CoreBase`: the sequences a core holds (`_requests`), turning an `EngineCoreRequest` into a
`Request` (`_admit`), aborting and finishing them (blocks back to the pool, counters), and the
`CoreInfo` / `CoreStats` the frontend reads. A subclass sets `config`, `tokenizer`, `max_model_len`,
`vocab_size`, `default_sampling`, `eos_token_ids`, `block_manager`, `scheduler` and `stats`, and
implements `add_requests` and `step`; `_on_finish(req)` drops its own per-request state.
Must not: schedule, run a model or sample.
"""
from __future__ import annotations

import logging
import time

from tidal.engine.core_io import CoreInfo, CoreStats, EngineCoreOutput, EngineCoreRequest
from tidal.engine.request import Request, RequestStatus

logger = logging.getLogger("tidal.engine")


def new_stats() -> dict:
    return {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "aborted": 0, "jump_forward_tokens": 0}


class CoreBase:
    _requests: dict[str, Request]

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def info(self) -> CoreInfo:
        return CoreInfo(self.max_model_len, self.vocab_size, self.kv_capacity_tokens, dict(self.default_sampling),
                        sorted(self.eos_token_ids), self.snapshot())

    def snapshot(self, step_seconds: float = 0.0) -> CoreStats:
        return CoreStats(len(self.scheduler.running), len(self.scheduler.waiting), self.block_manager.stats(),
                         dict(self.stats), step_seconds)

    def _admit(self, r: EngineCoreRequest) -> Request | None:
        """A Request for `r`, held by this core; None for an id it already holds (a retry is a no-op)."""
        if r.request_id in self._requests:
            logger.warning("request %s is already in the engine; ignoring the second add", r.request_id)
            return None
        req = Request(r.request_id, list(r.prompt_token_ids), r.params, r.seed, priority=r.priority,
                      arrival_time=r.arrival_time or time.monotonic())
        if r.params.logprobs is not None:
            req.logprobs = []
        self._requests[req.request_id] = req
        return req

    def abort_requests(self, request_ids: list[str], reason: str = "abort") -> list[EngineCoreOutput]:
        """Stop sequences now; their blocks return to the pool. reason "abort" (the client left) is counted
        as aborted; "stop" (the frontend found a stop string) only drops a sequence that already ended."""
        outs = []
        for rid in request_ids:
            req = self._requests.get(rid)
            if req is None:
                continue
            self._finish(req, "abort")
            if reason == "abort":
                self.stats["aborted"] += 1
            outs.append(EngineCoreOutput(rid, [], finish_reason="abort", num_cached_tokens=req.num_cached_tokens))
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.scheduler.remove(req)
        self._on_finish(req)
        req.status = RequestStatus.FINISHED
        self.stats["finished"] += 1
        self.stats["prompt_tokens"] += len(req.prompt_token_ids)
        self._requests.pop(req.request_id, None)

    def _on_finish(self, req: Request) -> None:
        """A subclass's own per-request state goes here."""

    def kv_stats(self) -> dict:
        return self.block_manager.stats()
