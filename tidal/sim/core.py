"""The simulated engine core behind `tidal serve --simulate`: a replica with no model.

Owns: `SimulatedCore`, which has `EngineCore`'s interface (tokenizer, config, info(), snapshot(),
add_requests / abort_requests / step / has_unfinished_requests, block_manager, scheduler, stats,
shutdown), so `AsyncEngine(SimulatedCore(...))` under the real server gives the real HTTP API, metrics
and KV events with no weights loaded. Under it run the real `BlockManager` (paged KV, prefix caching,
LRU eviction, events) and the real `Scheduler` (max-num-seqs, token budget, chunked prefill,
preemption); only the model runner is replaced: a step sleeps for `SimConfig.step_seconds` of its
shape (uncached prompt tokens computed, sequences decoding) and samples deterministic pseudo-random
token ids from a pool of plain word tokens (no special tokens), seeded by the request's seed, or by
its prompt when greedy, so equal greedy requests get equal text. The stop conditions that need no
text are the real ones (stop_checks.py: max_tokens, the context, stop token ids, EOS when
`eos_probability` draws it unless ignore_eos); stop strings stay the frontend's.
The tokenizer is the model's, loaded alone (no weights), so the EPP's block hashes equal this
replica's. Structured output is not simulated: a grammar is ignored (the text will not match it),
logprobs are placeholders (0.0 for the sampled token) and prompt logprobs are not produced.
Must not: load weights, run a model (no torch op), or know about threads or HTTP (core_loop.py / the server do).
"""
from __future__ import annotations

import re
import time

from tidal.config import EngineConfig
from tidal.engine.core_base import CoreBase, new_stats
from tidal.engine.core_io import EngineCoreOutput, EngineCoreRequest
from tidal.engine.request import Request
from tidal.engine.scheduler import Scheduler
from tidal.engine.stop_checks import check_stop, eos_ids
from tidal.sim.latency import SimConfig, prefill_kctx
from tidal.kv.block_manager import BlockManager
from tidal.weights.generation_config import generation_defaults
from tidal.weights.loader import open_checkpoint

DEFAULT_NUM_KV_BLOCKS = 4096
_WORD = re.compile(r"^(\u0120|\u2581)?[A-Za-z]{2,10}$")   # a plain word, with its byte-level / sentencepiece space
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64: a cheap, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def word_token_pool(tokenizer, eos: set[int]) -> list[int]:
    """Token ids that decode to plain words (sorted, so the same on every replica); never special ids."""
    tok = tokenizer._tok if getattr(tokenizer, "is_light", False) else None   # LightTokenizer: no transformers
    vocab = tok.get_vocab() if tok is not None else tokenizer.get_vocab()
    special = set(eos)
    for name in ("bos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            special.add(value)
    pool = sorted(i for t, i in vocab.items() if _WORD.match(t) and i not in special)
    if len(pool) < 16:   # an unusual vocabulary: any id that is not special
        pool = sorted(i for i in vocab.values() if i not in special)
    return pool


class SimulatedCore(CoreBase):
    def __init__(self, config: EngineConfig, sim: SimConfig | None = None):
        self.config = config
        self.sim = sim = sim or SimConfig()
        ckpt = open_checkpoint(config.model, require_weights=False)
        self.tokenizer = ckpt.load_tokenizer(config.tokenizer)
        hf = ckpt.hf_config
        model_len = getattr(hf, "max_position_embeddings", None) or 2048
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        self.vocab_size = hf.vocab_size
        self.default_sampling, extra_eos = generation_defaults(config.model, ckpt.path, config.generation_config)
        self.eos_token_ids = eos_ids(self.tokenizer, hf) | extra_eos
        self._pool = word_token_pool(self.tokenizer, self.eos_token_ids)
        self._eos = min(self.eos_token_ids) if self.eos_token_ids else None
        num_blocks = sim.num_kv_blocks or config.num_kv_blocks or DEFAULT_NUM_KV_BLOCKS
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_event_publisher = None
        if getattr(config, "kv_events_endpoint", None):
            from tidal.kv.event_publisher import KVEventPublisher
            self.kv_event_publisher = KVEventPublisher(config.kv_events_endpoint).attach(self.block_manager)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.long_prefill_token_threshold, config.short_prefill_tokens)
        self._requests: dict[str, Request] = {}
        self._seeds: dict[str, int] = {}
        self.stats = new_stats()
        self.last_step_shape = (0, 0)   # (prefill tokens, decode sequences) of the latest step, for tests

    # ---- requests ----------------------------------------------------------------------------
    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        for r in requests:
            req = self._admit(r)
            if req is None:
                continue
            greedy = r.params.temperature is not None and r.params.temperature == 0
            # greedy: the output depends on the prompt only, as a real model's does
            self._seeds[req.request_id] = hash(tuple(req.prompt_token_ids)) & _MASK if greedy else r.seed & _MASK
            self.scheduler.add(req)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        t0 = time.perf_counter()
        so = self.scheduler.schedule()
        prefill_tokens = decode_seqs = 0
        kctx = 0.0
        for rid, n in so.num_scheduled_tokens.items():
            req = self._requests[rid]
            if n == 1 and req.output_token_ids and req.num_computed_tokens == req.num_tokens - 1:
                decode_seqs += 1
            else:   # a prompt chunk, or a preempted request's recompute
                prefill_tokens += n
                kctx += prefill_kctx(n, req.num_computed_tokens)
        self.last_step_shape, self.last_step_kctx = (prefill_tokens, decode_seqs), kctx
        # nothing fit (the pool is full of running requests' blocks): wait a base step rather than spin
        seconds = self.sim.step_seconds(prefill_tokens, decode_seqs, kctx) or self.sim.base_ms * self.sim.time_scale / 1000
        outputs: list[EngineCoreOutput] = []
        for rid, n in so.num_scheduled_tokens.items():
            req = self._requests[rid]
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(rid, req.all_token_ids, req.num_computed_tokens)
            if req.num_computed_tokens < req.num_tokens:   # a prefill chunk short of the prompt's end
                continue
            token = self._sample(req)
            o = EngineCoreOutput(rid, [token], [{token: 0.0}] if req.logprobs is not None else None,
                                 num_cached_tokens=req.num_cached_tokens)
            req.append_output(token)
            self.stats["generation_tokens"] += 1
            reason, stop_reason = check_stop(req, token, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                o.finish_reason, o.stop_reason = reason, stop_reason
                self._finish(req, reason)
            outputs.append(o)
        left = seconds - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return outputs

    def _sample(self, req: Request) -> int:
        p = req.params
        n = len(req.output_token_ids)
        h = _mix(self._seeds[req.request_id] ^ _mix(n))
        if (self._eos is not None and not p.ignore_eos and n >= p.min_tokens and self.sim.eos_probability > 0
                and (h >> 11) / 2**53 < self.sim.eos_probability):
            return self._eos
        return self._pool[_mix(h) % len(self._pool)]

    def _on_finish(self, req: Request) -> None:
        self._seeds.pop(req.request_id, None)

    def shutdown(self) -> None:
        if self.kv_event_publisher is not None:
            self.kv_event_publisher.close()
