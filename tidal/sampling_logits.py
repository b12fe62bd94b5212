"""Logit controls for a batch: `allowed_token_ids`, `bad_words` and `logit_bias` (vLLM's semantics).

Owns: `LogitControls` (one step's controls as flat (row, token) tensors), `uses_controls` (whether a
request has any) and `bad_word_bans`
(which tokens a row's bad words forbid next, given its output so far). They are applied together,
before penalties, temperature and the filters, in vLLM's order: the allowed-ids mask, then bad
words, then the bias. A step where no row uses any of them builds nothing and costs nothing.
Must not: tokenize (the engine turns `bad_words` into `bad_words_token_ids` at add_request, see
`SamplingParams.resolve_token_controls`) or sync with the host: all it reads on the host are the
params and the token lists the engine already holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tidal.sampling_params import SamplingParams


def uses_controls(p: SamplingParams) -> bool:
    """Whether `p` asks for any logit control (the sampler builds `LogitControls` only then)."""
    return bool(p.logit_bias or p.allowed_token_ids or p.bad_words_token_ids)


def bad_word_bans(bad_words_token_ids: list[list[int]], output_token_ids: Sequence[int]) -> list[int]:
    """Tokens a row may not sample next: the last token of each bad word whose other tokens are the
    row's latest output tokens (so a one-token word is always banned). Only the output counts, not
    the prompt, as in vLLM."""
    banned = []
    n = len(output_token_ids)
    for word in bad_words_token_ids:
        k = len(word) - 1
        if k <= n and (k == 0 or list(output_token_ids[n - k:]) == word[:-1]):
            banned.append(word[-1])
    return banned


@dataclass
class LogitControls:
    """The batch's logit controls as flat (row, token) pairs. Ids outside the vocabulary, which
    the engine refuses at add_request, are dropped here rather than indexed."""

    restricted: torch.Tensor | None  # [B] bool: rows limited to their allowed_token_ids
    allowed_rows: torch.Tensor | None  # [N] int64, with allowed_ids: the (row, token) pairs allowed
    allowed_ids: torch.Tensor | None
    banned_rows: torch.Tensor | None  # bad words' (row, token) pairs, set to -inf
    banned_ids: torch.Tensor | None
    bias_rows: torch.Tensor | None  # logit_bias's (row, token) pairs and the float32 bias added there
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None

    @classmethod
    def build(cls, params: list[SamplingParams], output_token_ids: list[Sequence[int]], vocab_size: int,
              device: torch.device) -> "LogitControls | None":
        if not any(uses_controls(p) for p in params):
            return None
        restricted, al_rows, al_ids, ban_rows, ban_ids, b_rows, b_ids, b_vals = ([] for _ in range(8))
        for i, (p, outs) in enumerate(zip(params, output_token_ids)):
            restricted.append(bool(p.allowed_token_ids))
            if p.allowed_token_ids:
                ids = [t for t in p.allowed_token_ids if t < vocab_size]
                al_rows += [i] * len(ids)
                al_ids += ids
            if p.bad_words_token_ids:
                ids = [t for t in bad_word_bans(p.bad_words_token_ids, outs) if t < vocab_size]
                ban_rows += [i] * len(ids)
                ban_ids += ids
            if p.logit_bias:
                pairs = [(t, b) for t, b in p.logit_bias.items() if t < vocab_size]
                b_rows += [i] * len(pairs)
                b_ids += [t for t, _ in pairs]
                b_vals += [b for _, b in pairs]

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device) if values else None

        return cls(restricted=t(restricted, torch.bool) if any(restricted) else None,
                   allowed_rows=t(al_rows, torch.int64), allowed_ids=t(al_ids, torch.int64),
                   banned_rows=t(ban_rows, torch.int64), banned_ids=t(ban_ids, torch.int64),
                   bias_rows=t(b_rows, torch.int64), bias_ids=t(b_ids, torch.int64),
                   bias_values=t(b_vals, torch.float32))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, V] -> a new tensor with the controls applied; rows without any are
        left bit-identical. A token both banned and biased stays -inf (-inf + bias)."""
        neg_inf = torch.tensor(-math.inf, device=logits.device)
        if self.restricted is not None:
            allowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            if self.allowed_rows is not None:
                allowed.index_put_((self.allowed_rows, self.allowed_ids), torch.tensor(True, device=logits.device))
            logits = logits.masked_fill(self.restricted[:, None] & ~allowed, -math.inf)
        if self.banned_rows is not None:
            logits = logits.index_put((self.banned_rows, self.banned_ids), neg_inf)
        if self.bias_rows is not None:
            logits = logits.index_put((self.bias_rows, self.bias_ids), self.bias_values, accumulate=True)
        return logits
