"""The frontend's side of generation: core outputs (new token ids) in, `RequestOutput`s out.

Owns: `OutputProcessor`: per user request (a parent of n samples) its samples' incremental
detokenizers, token ids, logprobs and cumulative logprob, prompt logprobs, timings; turning each
step's `EngineCoreOutput`s into one `RequestOutput` per request that advanced (text deltas included);
stop strings (found in the detokenized text: the sample ends there, and its id is handed back so the
caller tells the core to drop it); aborts from the caller's side.
Thread-safety: none of its own; one thread at a time (LLMEngine's caller, or the frontend under its lock).
Must not: touch the core, the scheduler or the runner; decide stops that need no text (the core does).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tidal.engine.core_io import EngineCoreOutput
from tidal.engine.detokenizer import IncrementalDetokenizer
from tidal.engine.input_processor import child_id
from tidal.outputs import CompletionOutput, RequestOutput
from tidal.sampling import SamplingParams


@dataclass
class _Sample:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class _Parent:
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    arrival_time: float
    first_token_time: float | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._sample_of: dict[str, tuple[str, int]] = {}   # core id -> (parent id, sample index)

    def __len__(self) -> int:
        return len(self._parents)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parents

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            arrival_time: float) -> None:
        samples = []
        for i in range(params.n):
            s = _Sample(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params))
            if params.logprobs is not None:
                s.logprobs = []
            samples.append(s)
            self._sample_of[child_id(request_id, i, params.n)] = (request_id, i)
        self._parents[request_id] = _Parent(prompt, list(prompt_token_ids), samples, arrival_time)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """(one RequestOutput per request that advanced, core ids that a stop string ended: the caller
        aborts them in the core with reason "stop")."""
        touched: dict[str, None] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for o in outputs:
            where = self._sample_of.get(o.request_id)
            if where is None:   # finished here already (a stop string) while the core ran on
                continue
            parent = self._parents[where[0]]
            s = parent.samples[where[1]]
            if s.finish_reason is not None:
                continue
            touched[where[0]] = None
            if s.index == 0:
                parent.num_cached_tokens = o.num_cached_tokens
                if o.new_prompt_logprobs is not None:
                    parent.prompt_logprobs = (parent.prompt_logprobs or []) + o.new_prompt_logprobs
            if o.new_token_ids and parent.first_token_time is None:
                parent.first_token_time = now
            if self._append(s, o):
                stopped.append(o.request_id)
            elif o.finish_reason is not None:
                s.finish_reason, s.stop_reason = o.finish_reason, o.stop_reason
                s.delta_text += s.detokenizer.flush()
            if s.finish_reason is not None:
                del self._sample_of[o.request_id]
        return [self._make_output(pid) for pid in touched], stopped

    def _append(self, s: _Sample, o: EngineCoreOutput) -> bool:
        """Add o's new tokens to sample s; True when a stop string ended it before the core did."""
        for j, token in enumerate(o.new_token_ids):
            s.token_ids.append(token)
            s.delta_token_ids.append(token)
            if s.logprobs is not None and o.new_logprobs:
                lp = o.new_logprobs[j]
                s.logprobs.append(lp)
                s.cumulative_logprob += lp[token]
            delta, stopped = s.detokenizer.append(token)
            s.delta_text += delta
            if stopped:
                s.finish_reason, s.stop_reason = "stop", s.detokenizer.stop_reason
                # the core ended it at this very token too (EOS, length): nothing left to drop there
                return not (o.finish_reason is not None and j == len(o.new_token_ids) - 1)
        return False

    def abort(self, request_id: str) -> tuple[RequestOutput | None, list[str]]:
        """End a request from the caller's side -> (its final output, the core ids still running)."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None, []
        running = []
        n = len(parent.samples)
        for s in parent.samples:
            if s.finish_reason is None:
                s.finish_reason = "abort"
                cid = child_id(request_id, s.index, n)
                running.append(cid)
                self._sample_of.pop(cid, None)
        return self._make_output(request_id), running

    def fail(self, core_id: str) -> tuple[str | None, list[str]]:
        """The core could not serve sample `core_id`: drop its whole request -> (parent id, sibling core ids
        still running)."""
        where = self._sample_of.get(core_id)
        if where is None:
            return None, []
        _, running = self.abort(where[0])   # every sample now has a reason, so the request is gone
        return where[0], [c for c in running if c != core_id]

    def _make_output(self, request_id: str) -> RequestOutput:
        parent = self._parents[request_id]
        outs = []
        for s in parent.samples:
            outs.append(CompletionOutput(
                index=s.index, text=s.detokenizer.output_text, token_ids=list(s.token_ids),
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                delta_text=s.delta_text, delta_token_ids=s.delta_token_ids))
            s.delta_text, s.delta_token_ids = "", []
        finished = parent.finished
        out = RequestOutput(request_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                            prompt_logprobs=parent.prompt_logprobs, num_cached_tokens=parent.num_cached_tokens,
                            metrics={"arrival_time": parent.arrival_time, "first_token_time": parent.first_token_time,
                                     "finished_time": time.monotonic() if finished else None})
        if finished:
            del self._parents[request_id]
        return out
