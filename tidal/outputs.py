"""What generation returns (vLLM's shape, which users already know).

Owns: `RequestOutput` (one per prompt, in input order) and `CompletionOutput` (one per
sample when n > 1). `RequestOutput.text/.token_ids/.finish_reason` read the first sample.
Must not: hold engine state; these are plain results.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None        # "stop", "length", "abort", or None while running
    stop_reason: str | int | None = None    # the stop string or stop token that ended it
    logprobs: list[dict[int, float]] | None = None   # per token: {token id: logprob} (chosen + top-k)
    cumulative_logprob: float | None = None
    delta_text: str = ""                     # what this step added (streaming)
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)   # arrival, first_token, finished times (time.monotonic)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
