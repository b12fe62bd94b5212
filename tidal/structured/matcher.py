"""One sequence's grammar state: `RequestGrammar`, a wrapper over xgrammar's `GrammarMatcher`.

Owns: waiting for the compiled grammar (a Future from compiler.py), the matcher built from it once
it is ready, and what the engine asks of it: accept a sampled token, roll back n tokens, whether the
grammar is terminated (its stop token accepted), and filling one row of a batch bitmask.
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
        return ok

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (rejected draft tokens, a truncated sequence)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} accepted tokens")
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    @property
    def is_terminated(self) -> bool:
        return self._matcher is not None and self._matcher.is_terminated()

    def fill_bitmask(self, bitmask, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (an xgrammar int32 bitmask, on the CPU)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
