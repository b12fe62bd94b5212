"""Grammar bitmasks for a batch: built by the engine, applied to the logits by the runner.

Owns: `GrammarBitmask` (plain data handed to the runner: the request ids that sample under a grammar
this step and one packed int32 row per request, bit j of a row = token j allowed), `build_bitmask`
(fills the rows from each request's matcher) and `apply_bitmask` (sets the disallowed logits of those
rows to -inf, in place, with xgrammar's kernel; rows without a grammar are not touched).
Must not: decide which requests sample (the engine tells it) or sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tidal.structured.matcher import RequestGrammar


@dataclass
class GrammarBitmask:
    request_ids: list[str]
    bitmask: torch.Tensor   # [len(request_ids), ceil(vocab_size / 32)] int32, on the CPU
    vocab_size: int         # tokens the bitmask speaks for (the model's logits width)


def build_bitmask(request_ids: list[str], grammars: list[RequestGrammar], vocab_size: int) -> GrammarBitmask:
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
    for row, grammar in enumerate(grammars):
        grammar.fill_bitmask(bitmask, row)
    return GrammarBitmask(list(request_ids), bitmask, vocab_size)


def apply_bitmask(logits: torch.Tensor, rows: list[int], mask: GrammarBitmask) -> None:
    """Mask `logits[rows[i]]` with `mask.bitmask[i]`. Logit columns past the bitmask's vocabulary
    (padding) are disallowed too: no grammar can produce them."""
    import xgrammar as xgr
    width = logits.shape[-1]
    covered = min(width, mask.vocab_size, mask.bitmask.shape[-1] * 32)
    # xgrammar's `indices` index the logits and the bitmask alike, so the rows go to their logits' places
    full = torch.full((logits.shape[0], math.ceil(width / 32)), -1, dtype=torch.int32)
    full[rows, :mask.bitmask.shape[-1]] = mask.bitmask[:, :full.shape[-1]]
    xgr.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True), vocab_size=covered,
                                    indices=rows)
    if covered < width:
        logits[rows, covered:] = -math.inf
