"""The model runner's own per-request state (its persistent input batch) and the flat tensors built from it.

Owns: `CachedRequestState` (one request as the runner knows it: prompt and output token ids, sampling
params, seed, block ids, computed-token count), `InputBatch` (those states by request id, updated from
each `SchedulerOutput`: finished / preempted ids dropped first, new requests added, running ones given
their new block ids, computed-token count and any tokens the engine appended; the runner appends its own
sampled tokens), and
`prepare_batch` (the scheduled rows -> token ids, positions, slot mapping, padded block tables, sequence
lengths and query offsets as `AttentionMetadata`; which rows sample; which need prompt logprobs).
Must not: read scheduler- or engine-owned objects (`Request`, the block manager): everything comes from
the `SchedulerOutput` messages (engine/step_io.py); run the model or sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tidal.engine.step_io import SchedulerOutput
from tidal.kernels.metadata import AttentionMetadata
from tidal.sampling import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    block_ids: list[int]
    num_computed_tokens: int
    token_ids: list[int] = field(init=False)   # prompt + output, appended in place (no per-step rebuild)

    def __post_init__(self):
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    def append_output(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.token_ids.append(token)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


# one scheduled row: the request's state and the tokens it computes this step
Row = tuple[CachedRequestState, int]


class InputBatch:
    def __init__(self):
        self.requests: dict[str, CachedRequestState] = {}

    def update(self, so: SchedulerOutput) -> list[Row]:
        """Apply one step's changes; returns the scheduled rows in the scheduler's order."""
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            # the runner appends to its own lists: copies, so a message (or an in-process sender) is never edited
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, new.prompt_token_ids, list(new.output_token_ids), new.sampling_params, new.seed,
                list(new.block_ids), new.num_computed_tokens)
        cached = so.scheduled_cached_reqs
        forced = cached.new_token_ids or [()] * len(cached.req_ids)   # optional in a hand-made message
        for req_id, new_blocks, num_computed, new_tokens in zip(
                cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, forced):
            state = self.requests[req_id]
            state.block_ids.extend(new_blocks)
            state.num_computed_tokens = num_computed
            for token in new_tokens:   # appended by the engine (jump-forward), after the runner's own
                state.append_output(token)
        return [(self.requests[req_id], n) for req_id, n in so.num_scheduled_tokens.items()]


@dataclass
class BatchLayout:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_idx: list[int]                      # flat rows whose logits are sampled
    sample_states: list[CachedRequestState]    # their requests
    plp_rows: list                             # (state, flat start, tokens) that need prompt logprobs
    # Room for multimodal inputs (not built): embeddings that replace the token embeddings at their
    # positions; the model would take them instead of `input_ids` there.
    inputs_embeds: torch.Tensor | None = None


def prepare_batch(rows: list[Row], block_size: int, device: torch.device) -> BatchLayout:
    bs = block_size
    input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
    sample_idx, sample_states, plp_rows = [], [], []
    for state, n in rows:
        start, end = state.num_computed_tokens, state.num_computed_tokens + n
        table = state.block_ids
        flat_start = len(input_ids)
        input_ids.extend(state.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        query_lens.append(n)
        seq_lens.append(end)
        if state.sampling_params.prompt_logprobs is not None and start < state.num_prompt_tokens:
            plp_rows.append((state, flat_start, min(end, state.num_prompt_tokens) - start))
        if end == state.num_tokens:  # a chunk that stops short of the end samples nothing
            sample_idx.append(len(input_ids) - 1)
            sample_states.append(state)
    max_blocks = max(len(s.block_ids) for s, _ in rows)
    bt = torch.tensor([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s, _ in rows], dtype=torch.int64)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True),
        block_tables=bt.to(device, non_blocking=True),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64).to(device, non_blocking=True),
        query_lens_list=query_lens, seq_lens_list=seq_lens,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=bs)
    return BatchLayout(torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
                       torch.tensor(positions, dtype=torch.int64).to(device, non_blocking=True),
                       meta, sample_idx, sample_states, plp_rows)
