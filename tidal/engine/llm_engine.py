"""The engine in the caller's thread: frontend processing around an `EngineCore`, for offline use.

Owns: `LLMEngine` (add_request / abort_request / step), what `LLM`, `tidal chat`/`generate`, `tidal batch`
and `tidal bench` drive: a prompt string tokenized, the request checked and fanned out
(input_processor.py), the core stepped (core.py), its new tokens turned into `RequestOutput`s with text
(output_processor.py), and a sample a stop string ended dropped from the core before the next step.
The server runs the same three pieces with the core in a thread or a process (frontend.py).
Must not: know about HTTP or threads; decide anything the core or the processors decide.
"""
from __future__ import annotations

import time

from tidal.config import EngineConfig
from tidal.engine.core import EngineCore
from tidal.engine.input_processor import InputProcessor
from tidal.engine.output_processor import OutputProcessor
from tidal.errors import TidalError
from tidal.outputs import RequestOutput
from tidal.sampling import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, verbose: bool = False):
        self.config = config
        self.core = core = EngineCore(config, verbose=verbose)
        self.tokenizer = core.tokenizer
        self.inputs = InputProcessor(self.tokenizer, core.info(), config.seed)
        self.outputs = OutputProcessor(self.tokenizer)
        self._counter = 0

    # what tests, benchmarks and the offline API read from the core
    runner = property(lambda self: self.core.runner)
    scheduler = property(lambda self: self.core.scheduler)
    block_manager = property(lambda self: self.core.block_manager)
    grammars = property(lambda self: self.core.grammars)
    resolved = property(lambda self: self.core.resolved)
    max_model_len = property(lambda self: self.core.max_model_len)
    vocab_size = property(lambda self: self.core.vocab_size)
    default_sampling = property(lambda self: self.core.default_sampling)
    eos_token_ids = property(lambda self: self.core.eos_token_ids)
    stats = property(lambda self: self.core.stats)
    last_scheduler_output = property(lambda self: self.core.last_scheduler_output)
    num_running = property(lambda self: len(self.core.scheduler.running))
    num_waiting = property(lambda self: len(self.core.scheduler.waiting))

    def add_request(self, request_id: str | None, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> str:
        params = params or SamplingParams()
        if request_id is None:
            request_id = str(self._counter)
            self._counter += 1
        if request_id in self.outputs:
            raise TidalError(f"request id '{request_id}' is already in use", param="request_id")
        if isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise TidalError("a request needs a prompt string or prompt token ids", param="prompt")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        now = arrival_time if arrival_time is not None else time.monotonic()
        params, children = self.inputs.process(request_id, prompt_token_ids, params, priority, now)
        self.outputs.add(request_id, prompt, prompt_token_ids, params, now)
        self.core.add_requests(children)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks return to the pool. Returns its final output (finish_reason "abort")."""
        out, running = self.outputs.abort(request_id)
        self.core.abort_requests(running)
        return out

    def has_unfinished_requests(self) -> bool:
        return len(self.outputs) > 0

    def step(self) -> list[RequestOutput]:
        outs, stopped = self.outputs.process(self.core.step())
        if stopped:   # a stop string ended these: free their blocks before the next step computes more
            self.core.abort_requests(stopped, reason="stop")
        return outs

    def kv_stats(self) -> dict:
        return self.core.kv_stats()
