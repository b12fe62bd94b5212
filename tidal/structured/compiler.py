"""Specs -> compiled xgrammar grammars, validated at once, compiled off the engine's step loop.

Owns: `GrammarCompilerCache`: the xgrammar `TokenizerInfo` and `GrammarCompiler` for one tokenizer
(built on first use, in the worker thread), `validate` (spec -> xgrammar `Grammar`, which catches a
bad schema, regex or EBNF at add_request time as a TidalError), and an LRU of `Future`s of
`CompiledGrammar`, keyed by the spec's cache key, filled by a small thread pool (xgrammar's compile
runs in C++; the step loop only polls the future).
Must not: hold per-request state (matcher.py) or touch logits (bitmask.py).
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from tidal.errors import TidalError
from tidal.structured.params import StructuredOutputsParams

_CACHE_ENTRIES = 128
_MAX_MESSAGE = 300


class GrammarCompilerCache:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_entries: int = _CACHE_ENTRIES,
                 num_threads: int = 1):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._lock = threading.Lock()   # guards _cache: futures finish on the pool's threads
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self.max_entries = max_entries
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="tidal-grammar")
        self.num_compiled = 0   # grammars actually compiled (not served from the cache)

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar for `spec`, as a Future. Raises TidalError now if the spec is invalid."""
        key = spec.cache_key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
        grammar = validate(spec)   # outside the lock: a big schema takes a while to convert
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                return fut
            fut = self._cache[key] = self._pool.submit(self._compile, grammar)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        # outside the lock: a future already done runs the callback here, at once
        fut.add_done_callback(lambda f: self._forget_if_failed(key, f))
        return fut

    def _forget_if_failed(self, key: tuple, fut: Future) -> None:
        """A failed compile is not cached: the next request with that spec tries again."""
        if fut.cancelled() or fut.exception() is not None:
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]

    def _compile(self, grammar):
        compiler = self._get_compiler()
        compiled = compiler.compile_grammar(grammar)
        self.num_compiled += 1
        return compiled

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                # xgrammar reads a transformers tokenizer's vocabulary; a LightTokenizer (weights/
                # light_tokenizer.py, tidal chat's fast start) hands over the one it wraps
                hf = getattr(self._tokenizer, "hf_tokenizer", self._tokenizer)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_token_ids or None)
                # our LRU is the cache; xgrammar's own would grow without bound
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def __len__(self) -> int:
        return len(self._cache)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_checked: OrderedDict[tuple, None] = OrderedDict()   # cache keys of specs known to be valid
_CHECKED_MAX = 256
_checked_lock = threading.Lock()


def check(spec: StructuredOutputsParams) -> None:
    """`validate`, remembered: a front end (the server) that checks every request before queueing it
    converts each distinct spec once, not once per request."""
    key = spec.cache_key()
    with _checked_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return
    validate(spec)
    with _checked_lock:
        _checked[key] = None
        while len(_checked) > _CHECKED_MAX:
            _checked.popitem(last=False)


def validate(spec: StructuredOutputsParams):
    """spec -> xgrammar Grammar; a TidalError that names the problem if xgrammar refuses it."""
    import xgrammar as xgr
    kind = spec.kind
    try:
        if kind == "json":
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            return xgr.Grammar.from_json_schema(schema, any_whitespace=not spec.disable_any_whitespace)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=not spec.disable_any_whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            # JSON string literals are EBNF string literals in xgrammar (same escapes)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                "choice": "choice list", "grammar": "grammar"}[kind]
        raise TidalError(f"structured_outputs.{kind}: invalid {what}: {_short(str(e))}",
                         param="structured_outputs") from None


def _short(message: str) -> str:
    """xgrammar's C++ message without its '[time] /path/file.cc:123: ' prefix, check text or trailing dump."""
    message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message.strip())
    message = message.replace("Check failed: (error.empty()) is false: ", "")
    message = message.split(" The JSON string is:")[0].strip()
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE - 3] + "..."
