"""The batched logits pipeline: a step's `SamplingParams` -> token ids.

Owns: `SamplingMetadata` (the batch's `SamplingParams` as [B] tensors for one step) and `Sampler`
(logits [B, V] -> token ids, with logprobs). The pipeline runs on whole batches with no Python
loop over rows and no host sync: logit controls (allowed_token_ids, bad_words, logit_bias; see
sampling_logits.py) -> penalties (repetition, presence, frequency) -> min_tokens mask -> greedy
argmax | temperature -> top-k -> top-p -> min-p -> draw. Logprobs are the model's own (before any
of this), as in vLLM's default. Seeded draws come from
`sampling_rng`, so a row's token depends only on its logits, its seed and its step.
`SamplingParams` itself (one request's knobs and their validation) lives in sampling_params.py;
`from tidal.sampling import SamplingParams` keeps working, as the rest of tidal imports it so.
Must not: touch the model, KV cache or scheduler; stop-condition checks and detokenization
belong to the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tidal.sampling_logits import LogitControls, uses_controls
from tidal.sampling_params import SamplingParams
from tidal.sampling_rng import draw, to_int64_seed


@dataclass
class SamplingMetadata:
    """One step's sampling knobs as [B] tensors, plus flags that let the sampler skip stages."""

    vocab_size: int
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows so the division is harmless
    greedy: torch.Tensor  # [B] bool
    seeds: torch.Tensor  # [B] int64 (low 64 bits of the seed)
    steps: torch.Tensor  # [B] int64: tokens generated so far by the row
    all_greedy: bool
    any_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, 0 = disabled; None when no row uses it
    max_top_k: int  # largest enabled top_k (sizes a torch.topk instead of a full sort)
    top_p: torch.Tensor | None  # [B] float32, None when every row has 1.0
    min_p: torch.Tensor | None  # [B] float32, None when every row has 0.0
    # Penalties: None when no row uses any. Token lists are padded with `vocab_size`, an id
    # one past the vocabulary that scatters into a spare column the sampler drops.
    repetition_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    prompt_token_ids: torch.Tensor | None  # [B, Lp] int64 (only when a row has a repetition penalty)
    output_token_ids: torch.Tensor | None  # [B, Lo] int64
    # min_tokens: (row, token) pairs to set to -inf this step; None when no row is below its minimum.
    min_tokens_rows: torch.Tensor | None
    min_tokens_ids: torch.Tensor | None
    max_num_logprobs: int | None  # None = no row asked for logprobs
    # allowed_token_ids, bad_words, logit_bias: None when no row uses any
    controls: LogitControls | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], eos_token_ids: set[int] | list[int], vocab_size: int,
              device: torch.device) -> "SamplingMetadata":
        eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        temp, greedy, top_k, top_p, min_p, rep, pres, freq, steps = ([] for _ in range(9))
        mt_rows, mt_ids, num_logprobs = [], [], []
        for i, (p, outs) in enumerate(zip(params, output_token_ids)):
            greedy.append(p.greedy)
            temp.append(1.0 if p.greedy else p.temperature)
            top_k.append(p.top_k if 0 < p.top_k < vocab_size else 0)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            rep.append(p.repetition_penalty)
            pres.append(p.presence_penalty)
            freq.append(p.frequency_penalty)
            steps.append(len(outs))
            if len(outs) < p.min_tokens:
                # With ignore_eos, eos is not a stop token, so generating it early is allowed.
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
                banned = [t for t in banned if t < vocab_size]
                mt_rows += [i] * len(banned)
                mt_ids += banned
            if p.logprobs is not None:
                num_logprobs.append(p.logprobs)

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        any_rep = any(r != 1.0 for r in rep)
        any_penalty = any_rep or any(pres) or any(freq)
        enabled_k = [k for k, g in zip(top_k, greedy) if k and not g]
        return cls(
            vocab_size=vocab_size,
            temperature=t(temp, torch.float32),
            greedy=t(greedy, torch.bool),
            seeds=t([to_int64_seed(s) for s in seeds], torch.int64),
            steps=t(steps, torch.int64),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            top_k=t(top_k, torch.int64) if enabled_k else None,
            max_top_k=max(enabled_k, default=0),
            top_p=t(top_p, torch.float32) if any(p < 1.0 for p, g in zip(top_p, greedy) if not g) else None,
            min_p=t(min_p, torch.float32) if any(m > 0.0 for m, g in zip(min_p, greedy) if not g) else None,
            repetition_penalty=t(rep, torch.float32) if any_penalty else None,
            presence_penalty=t(pres, torch.float32) if any_penalty else None,
            frequency_penalty=t(freq, torch.float32) if any_penalty else None,
            prompt_token_ids=t(_pad(prompt_token_ids, vocab_size), torch.int64) if any_rep else None,
            output_token_ids=t(_pad(output_token_ids, vocab_size), torch.int64) if any_penalty else None,
            min_tokens_rows=t(mt_rows, torch.int64) if mt_rows else None,
            min_tokens_ids=t(mt_ids, torch.int64) if mt_rows else None,
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            controls=LogitControls.build(params, output_token_ids, vocab_size, device),
        )


def _pad(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max(1, max((len(r) for r in rows), default=0))  # width 1 keeps empty batches 2-D
    return [list(r) + [pad] * (width - len(r)) for r in rows]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, logprob of the chosen token (None if no row asked)
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # (values [B, K], ids [B, K]), K = max asked


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF: divide positive / multiply negative logits of every token seen in the
    prompt or output), then frequency (minus count * f) and presence (minus p if seen in output)."""
    B, V = logits.shape
    outs = meta.output_token_ids
    counts = torch.zeros(B, V + 1, dtype=torch.float32, device=logits.device)
    counts.scatter_add_(1, outs, torch.ones_like(outs, dtype=torch.float32))
    counts = counts[:, :V]
    in_output = counts > 0
    if meta.prompt_token_ids is not None:
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, meta.prompt_token_ids, True)
        seen = seen[:, :V] | in_output
        rp = meta.repetition_penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - meta.frequency_penalty[:, None] * counts
    return logits - meta.presence_penalty[:, None] * in_output


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k, then outside its top-p nucleus.

    top-k keeps every logit >= the k-th largest, so ties at the k-th value are all kept.
    top-p is computed on the distribution left after top-k (renormalized) and keeps the
    smallest prefix of the descending order whose probability mass reaches top_p; at least
    the most likely token always survives. Rows with top_k 0 / top_p 1 are untouched.
    """
    if top_k is None and top_p is None:
        return logits
    neg_inf = torch.tensor(-math.inf, device=logits.device)
    if top_p is None:  # top-k alone: a partial torch.topk instead of sorting the whole vocabulary
        kth_index = (top_k.clamp(min=1) - 1).clamp(max=max_top_k - 1)[:, None]
        kth = logits.topk(max_top_k, dim=-1).values.gather(1, kth_index)
        kth = torch.where(top_k[:, None] > 0, kth, neg_inf)
        return logits.masked_fill(logits < kth, -math.inf)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k.clamp(min=1) - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, neg_inf)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
    probs = sorted_logits.softmax(dim=-1)
    # Mass strictly before each token; the token stays while that mass is still short of top_p.
    before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=1)
    # Rows at top_p == 1 keep everything even where float rounding pushes `before` to 1.0.
    drop = (before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf tokens whose probability is below min_p * (the row's top probability)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def plain_greedy(params: list[SamplingParams], output_token_ids: list[list[int]]) -> bool:
    """True when the raw logits' argmax is the whole step for every row: greedy, no logprobs, no
    penalties or logit controls, and min_tokens reached (nothing banned). The runner then skips building
    `SamplingMetadata` (a dozen small tensors a step: ~0.1 ms, 2 % of a one-stream decode step)."""
    for p, outs in zip(params, output_token_ids):
        if (not p.greedy or p.logprobs is not None or uses_controls(p)
                or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                or len(outs) < p.min_tokens):
            return False
    return True


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """float32 logits after logit controls, penalties and min_tokens: what greedy rows take the argmax of."""
    logits = logits.to(torch.float32)
    if meta.controls is not None:
        logits = meta.controls.apply(logits)
    if meta.repetition_penalty is not None:
        logits = apply_penalties(logits, meta)
    if meta.min_tokens_rows is not None:
        logits = logits.index_put((meta.min_tokens_rows, meta.min_tokens_ids),
                                  torch.tensor(-math.inf, device=logits.device))
    return logits


def filter_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Processed logits -> temperature-scaled logits with top-k, top-p and min-p applied."""
    logits = logits / meta.temperature[:, None]
    logits = apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    return logits


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw = logits.to(torch.float32)
        logprobs = top = None
        if meta.max_num_logprobs is not None:
            # Like vLLM's default: logprobs of the model's own distribution, before any processing.
            all_logprobs = raw.log_softmax(dim=-1)
        processed = process_logits(raw, meta)
        if meta.all_greedy:
            token_ids = processed.argmax(dim=-1)
        else:
            token_ids = draw(filter_logits(processed, meta), meta.seeds, meta.steps)
            if meta.any_greedy:
                token_ids = torch.where(meta.greedy, processed.argmax(dim=-1), token_ids)
        if meta.max_num_logprobs is not None:
            logprobs = all_logprobs.gather(1, token_ids[:, None]).squeeze(1)
            if meta.max_num_logprobs > 0:
                top = all_logprobs.topk(meta.max_num_logprobs, dim=-1)
                top = (top.values, top.indices)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=top)
