"""One sequence's grammar state: `RequestGrammar`, a wrapper over xgrammar's `GrammarMatcher`.

Owns: waiting for the compiled grammar (a Future from compiler.py), the matcher built from it once
it is ready, and what the engine asks of it: accept a sampled token, roll back n tokens, whether the
grammar is terminated (its stop token accepted), filling one row of a batch bitmask, and the one token
the grammar allows next when it allows exactly one (jump-forward decoding). The row computed for that
question is kept until the matcher moves, so the step's batch bitmask copies it instead of refilling.
Each sequence has its own (n > 1 siblings share the compiled grammar, never the matcher).
Must not: schedule, sample or touch logits.
"""
from __future__ import annotations

from concurrent.futures import Future


class RequestGrammar:
    def __init__(self, compiled: Future):
        self._compiled = compiled
        self._matcher = None
        self.num_accepted = 0   # tokens the matcher holds; equals the sequence's output length
        self._row = None        # [1, ceil(V/32)] int32: the next-token mask, valid while `_row_fresh`
        self._row_fresh = False

    @property
    def ready(self) -> bool:
        """Compiled (or failed: `matcher` then raises the compile error)."""
        return self._compiled.done()

    @property
    def future(self) -> Future:
        return self._compiled

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr
            self._matcher = xgr.GrammarMatcher(self._compiled.result())
        return self._matcher

    def accept(self, token: int) -> bool:
        """Advance by one sampled token. False if the grammar does not allow it (the matcher is unchanged)."""
        ok = self.matcher.accept_token(token)
        if ok:
            self.num_accepted += 1
            self._row_fresh = False
        return ok

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (rejected draft tokens, a truncated sequence)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} accepted tokens")
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens
            self._row_fresh = False

    @property
    def is_terminated(self) -> bool:
        return self._matcher is not None and self._matcher.is_terminated()

    def fill_bitmask(self, bitmask, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (an xgrammar int32 bitmask, on the CPU)."""
        if self._row_fresh and self._row.shape[-1] == bitmask.shape[-1]:
            bitmask[row] = self._row[0]
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def forced_token(self, vocab_size: int) -> int | None:
        """The token id the grammar allows next when it allows exactly one, else None. Masked decoding can
        only sample that token there, whatever the logits, so appending it without a decode step gives
        the same output (xgrammar's own jump-forward re-tokenizes the forced text, which can differ)."""
        if self.matcher.is_terminated():
            return None
        if self._row is None:
            import xgrammar as xgr
            self._row = xgr.allocate_token_bitmask(1, vocab_size)
        if not self._row_fresh:
            self.matcher.fill_next_token_bitmask(self._row, 0)
            self._row_fresh = True
        words = self._row[0].nonzero()
        if words.numel() != 1:
            return None
        w = int(words[0])
        bits = int(self._row[0, w]) & 0xFFFFFFFF
        if bits & (bits - 1):
            return None
        token = w * 32 + bits.bit_length() - 1
        return token if token < vocab_size else None
