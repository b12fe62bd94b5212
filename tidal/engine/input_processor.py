"""The frontend's side of a new request: checks, then the core requests it becomes.

Owns: `InputProcessor.process`: admission checks (an empty prompt, one past the context, token ids
outside the vocabulary, a request the whole KV cache could never hold), the token-level controls
(`bad_words` tokenized, ids checked), the structured-output spec checked (a bad schema is a TidalError
here, before anything is queued; the core compiles it later), and the n > 1 fan-out into one
`EngineCoreRequest` per sample, each with its own seed (params.seed + i, or drawn from the engine seed).
Everything it needs is static (core_io.CoreInfo), so the thread and process frontends both run it in
the caller's thread and a rejected request never reaches the core.
Must not: touch the core, the scheduler or the runner.
"""
from __future__ import annotations

import random
import time

from tidal.engine.core_io import CoreInfo, EngineCoreRequest
from tidal.errors import TidalError
from tidal.sampling import SamplingParams


def child_id(request_id: str, index: int, n: int) -> str:
    """The core's id for sample `index` of a request with n samples."""
    return request_id if n == 1 else f"{request_id}#{index}"


class InputProcessor:
    def __init__(self, tokenizer, info: CoreInfo, seed: int):
        self.tokenizer = tokenizer
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.kv_capacity_tokens = info.kv_capacity_tokens
        self._rng = random.Random(seed)

    def process(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
                arrival_time: float | None = None) -> tuple[SamplingParams, list[EngineCoreRequest]]:
        """(the params as resolved, one core request per sample). Raises TidalError for a request the
        engine cannot serve, naming the field."""
        self.check_admission(prompt_token_ids, params)
        params = params.resolve_token_controls(self.tokenizer, self.vocab_size)   # bad_words -> ids
        if params.structured_outputs is not None:
            from tidal.structured.compiler import check
            check(params.structured_outputs)
        now = arrival_time if arrival_time is not None else time.monotonic()
        ids = list(prompt_token_ids)
        children = [EngineCoreRequest(child_id(request_id, i, params.n), ids, params,
                                      params.seed + i if params.seed is not None else self._rng.getrandbits(63),
                                      priority, now)
                    for i in range(params.n)]
        return params, children

    def check_admission(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise TidalError("the prompt is empty; give at least one token", param="prompt")
        if n >= self.max_model_len:
            raise TidalError(f"the prompt has {n} tokens but this model's context is {self.max_model_len} tokens "
                             "(prompt plus at least one generated token); shorten the prompt", param="prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise TidalError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                             param="prompt")
        total = min(n + (params.max_tokens or self.max_model_len), self.max_model_len)
        if total > self.kv_capacity_tokens:
            raise TidalError(f"the request needs up to {total} tokens of KV cache but the whole cache holds "
                             f"{self.kv_capacity_tokens}; lower max_tokens or give the engine more --kv-mem",
                             param="max_tokens")
