"""Per-request state inside the engine.

Owns: `Request` (one sequence being generated, as the engine core sees it: its token ids, how many
have KV in the cache, status, sampling params, seed, grammar matcher, logprobs) and `RequestStatus`.
Text, stop strings and n > 1 parents are the frontend's (output_processor.py).
Must not: allocate blocks or run the model.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tidal.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    priority: int = 0                  # smaller runs first and is preempted last (vLLM's convention)
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None       # for n > 1: the user's request id
    index: int = 0                     # which of the parent's n samples
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0       # tokens whose K/V are in the cache
    num_cached_tokens: int = 0         # prompt tokens served by the prefix cache at admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list | None = None        # [] when the request asked for logprobs (the core's flag)
    num_preemptions: int = 0
    # structured/matcher.RequestGrammar when the params ask for structured output. A preempted request
    # keeps it: recompute re-feeds the same tokens, so the matcher's state stays right.
    grammar: object = None
    # tokens the core appended without sampling them (jump-forward), not yet sent to the runner
    forced_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        # prompt + output kept as one list, appended in place: the scheduler, the block manager and
        # the runner read it every step, and rebuilding it there cost O(tokens) per request per step
        self.all_token_ids: list[int] = self.prompt_token_ids + self.output_token_ids

    def append_output(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.all_token_ids.append(token)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def sort_key(self):
        return (self.priority, self.arrival_time)
