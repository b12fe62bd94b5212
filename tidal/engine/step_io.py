"""The step contract: the plain-data messages between the scheduler, the model runner and the engine.

Owns: `SchedulerOutput` (what the scheduler decided this step: new requests in full, running ones as
new block ids and token counts, finished ids, the grammar bitmask rows), `ModelRunnerOutput` (what
the runner sampled: token ids per request, logprobs, prompt logprobs), and a msgpack encoder/decoder
for them (torch tensors travel as dtype, shape and bytes), so the same messages can cross a process
boundary to N workers. vLLM v1's shape: the runner keeps its own per-request state and is told only
what changed, so building a message costs O(scheduled requests + new blocks), never O(tokens) per
request per step (the runner appends its own sampled tokens).
Must not: hold engine objects (`Request`) or live tensors other than the grammar bitmask; import the
scheduler, the runner or the engine.
"""
from __future__ import annotations

import msgspec
import torch

from tidal.sampling import SamplingParams
from tidal.structured.bitmask import GrammarBitmask


class NewRequestData(msgspec.Struct):
    """A request the runner has no state for: first scheduled, or resumed after a preemption
    (recompute: `output_token_ids` holds what it generated before, and its KV is computed again)."""
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    block_ids: list[int]             # its whole block table
    num_computed_tokens: int         # tokens already in the cache (a prefix-cache hit), before this step
    # Room for multimodal inputs (not built): each item's content hash joins the block hash of the
    # blocks it covers as an extra key, and the runner feeds `inputs_embeds` at its positions.
    mm_features: list | None = None


class CachedRequestData(msgspec.Struct):
    """Running requests the runner already holds, in parallel lists."""
    req_ids: list[str] = msgspec.field(default_factory=list)
    new_block_ids: list[list[int]] = msgspec.field(default_factory=list)   # appended to its table this step
    num_computed_tokens: list[int] = msgspec.field(default_factory=list)   # before this step
    # tokens the engine appended that the runner did not sample (jump-forward; later, accepted drafts)
    new_token_ids: list[list[int]] = msgspec.field(default_factory=list)

    def append(self, req_id: str, new_block_ids: list[int], num_computed_tokens: int,
               new_token_ids: list[int] | None = None) -> None:
        self.req_ids.append(req_id)
        self.new_block_ids.append(new_block_ids)
        self.num_computed_tokens.append(num_computed_tokens)
        self.new_token_ids.append(new_token_ids or [])


class SchedulerOutput(msgspec.Struct):
    scheduled_new_reqs: list[NewRequestData] = msgspec.field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = msgspec.field(default_factory=CachedRequestData)
    # req id -> tokens to compute this step; its order is the batch's row order
    num_scheduled_tokens: dict[str, int] = msgspec.field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # finished, aborted or preempted since the last step: the runner drops their state first
    finished_req_ids: set[str] = msgspec.field(default_factory=set)
    preempted_req_ids: set[str] = msgspec.field(default_factory=set)   # the preempted subset of those
    # the allowed tokens of the scheduled requests that sample under a grammar (filled by the engine)
    grammar_bitmask: GrammarBitmask | None = None


class ModelRunnerOutput(msgspec.Struct):
    req_ids: list[str] = msgspec.field(default_factory=list)     # every scheduled request, in row order
    # per request the accepted token ids: [] for a prefill chunk short of its end, one token today,
    # k + 1 after speculative verification
    sampled_token_ids: list[list[int]] = msgspec.field(default_factory=list)
    # per request, one {token id: logprob} per sampled token (the chosen one and the top-k), or None
    logprobs: list[list[dict[int, float]] | None] = msgspec.field(default_factory=list)
    # req id -> this chunk's prompt logprobs (None for the first prompt token, which nothing predicts)
    prompt_logprobs: dict[str, list[dict[int, float] | None]] = msgspec.field(default_factory=dict)


def _enc_hook(obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return [str(t.dtype).removeprefix("torch."), list(t.shape), t.numpy().tobytes()]
    raise NotImplementedError(f"{type(obj).__name__} cannot be sent in a step message")


def _dec_hook(type_, obj):
    if type_ is torch.Tensor:
        dtype, shape, data = obj
        return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)
    raise NotImplementedError(f"{type_} cannot be read from a step message")


encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
scheduler_output_decoder = msgspec.msgpack.Decoder(SchedulerOutput, dec_hook=_dec_hook)
runner_output_decoder = msgspec.msgpack.Decoder(ModelRunnerOutput)
