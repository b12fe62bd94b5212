"""The engine's side of structured output: requests with a grammar, from add_request to their bitmask.

Owns: `GrammarRequests`: the grammar compile cache for the engine's tokenizer, a `RequestGrammar`
(its own matcher) for each sequence whose params ask for structured output, the requests that wait
for their grammar to compile (the scheduler never sees them until it is ready, so a compile never
stalls a step), and each step's `GrammarBitmask` for the scheduled requests that sample.
Must not: schedule, run the model or decide stop conditions (core.py does, asking
`RequestGrammar.is_terminated`).
"""
from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, wait

from tidal.engine.request import Request
from tidal.sampling import SamplingParams
from tidal.structured.bitmask import GrammarBitmask, build_bitmask
from tidal.structured.compiler import GrammarCompilerCache
from tidal.structured.matcher import RequestGrammar

logger = logging.getLogger("tidal.engine")

# With nothing else to run, a step waits this long for a compile to finish rather than spin; short,
# so new requests and aborts are still taken between steps.
_IDLE_WAIT_S = 0.05


class GrammarRequests:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        self.vocab_size = vocab_size
        self.compiler = GrammarCompilerCache(tokenizer, vocab_size, sorted(stop_token_ids))
        self.waiting: list[Request] = []   # grammar still compiling

    def compile(self, params: SamplingParams):
        """The compiled grammar's Future for `params`, or None. Raises TidalError for a bad spec, so a
        request is refused at add_request time; a compile of the same spec is then served from the cache."""
        if params.structured_outputs is None:
            return None
        return self.compiler.submit(params.structured_outputs)

    def attach(self, req: Request, compiled) -> bool:
        """Give `req` its own matcher. True if it may be scheduled now, False if it waits for the compile."""
        req.grammar = RequestGrammar(compiled)
        if req.grammar.ready:
            return True
        self.waiting.append(req)
        return False

    def take_compiled(self, idle: bool) -> tuple[list[Request], list[Request]]:
        """(requests whose grammar is ready to schedule, requests whose compile failed). `idle`: the
        scheduler has nothing else, so wait briefly for a compile."""
        if not self.waiting:
            return [], []
        if idle:
            wait([r.grammar.future for r in self.waiting], timeout=_IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        ready, failed, still = [], [], []
        for req in self.waiting:
            if not req.grammar.ready:
                still.append(req)
            elif req.grammar.future.exception() is not None:
                logger.error("grammar compile failed for request %s: %s", req.request_id, req.grammar.future.exception())
                failed.append(req)
            else:
                ready.append(req)
        self.waiting = still
        return ready, failed

    def discard(self, req: Request) -> None:
        if req.grammar is not None and req in self.waiting:
            self.waiting.remove(req)

    def bitmask(self, requests: list[Request], num_new_tokens: list[int]) -> GrammarBitmask | None:
        """The allowed tokens of the scheduled requests that sample this step under a grammar (a prefill
        chunk that stops short of the end samples nothing); None, and no work, when there are none."""
        ids, grammars = [], []
        for req, n in zip(requests, num_new_tokens):
            if req.grammar is not None and req.num_computed_tokens + n == req.num_tokens:
                ids.append(req.request_id)
                grammars.append(req.grammar)
        return build_bitmask(ids, grammars, self.vocab_size) if ids else None

    def shutdown(self) -> None:
        self.compiler.shutdown()
