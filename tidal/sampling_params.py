"""One request's sampling knobs: `SamplingParams`, validated in __post_init__.

Owns: the fields and their defaults, their normalisation (`stop` as a list, `structured_outputs`
from a dict, `logit_bias` keys as ints) and range checks, each failing with a TidalError that
names the parameter, `greedy` (the temperature below which a row takes the argmax), and
`resolve_token_controls` (the checks that need the vocabulary, and `bad_words` -> token ids, which
the engine runs at add_request since only it has the tokenizer).
Must not: import torch or touch logits; turning a batch of these into tensors and sampling from
them belongs to sampling.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tidal.errors import TidalError
from tidal.structured.params import StructuredOutputsParams

# Below this a temperature is treated as greedy: dividing by it would overflow float32.
_GREEDY_EPS = 1e-5
_MAX_LOGPROBS = 20
_MAX_LOGIT_BIAS = 100.0   # OpenAI's range for a logit_bias value


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise TidalError(message, param=param)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _token_id(key) -> int | None:
    """A logit_bias key as a token id: an int, or its decimal string (JSON object keys are strings)."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        key = int(key)
    return key if _is_int(key) and key >= 0 else None


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None = until the context limit
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top logprobs per generated token (0 = only the chosen token's)
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # a grammar the output must match (JSON schema, regex, choice, EBNF); a dict is converted. Annotated
    # without `dict` so msgspec can decode SamplingParams (engine/step_io.py's messages carry it)
    structured_outputs: StructuredOutputsParams | None = None
    # Logit controls (vLLM's semantics), applied before penalties, temperature and the filters:
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None   # only these may be sampled
    bad_words: list[str] | None = None           # never generated, with or without a leading space
    # bad_words as token sequences: filled by resolve_token_controls (the engine), or given directly
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self):
        if isinstance(self.structured_outputs, dict):   # also how it arrives over msgpack
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "structured_outputs must be a StructuredOutputsParams or a dict of its fields")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "stop must be a non-empty string or a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "stop_token_ids must be a list of non-negative token ids")
        _check(_is_int(self.n) and self.n >= 1, "n", f"n must be an integer >= 1, got {self.n!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               f"max_tokens must be an integer >= 1 (or null for no limit), got {self.max_tokens!r}")
        _check(_is_num(self.temperature) and 0 <= self.temperature < math.inf, "temperature",
               f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p",
               f"top_p must be in (0, 1] (1 = disabled), got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k",
               f"top_k must be an integer >= 1, or 0 / -1 to disable it, got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p",
               f"min_p must be in [0, 1] (0 = disabled), got {self.min_p!r}")
        _check(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf, "repetition_penalty",
               f"repetition_penalty must be a number > 0 (1 = disabled), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, name, f"{name} must be in [-2, 2], got {v!r}")
        _check(self.seed is None or _is_int(self.seed), "seed", f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and 0 <= v <= _MAX_LOGPROBS), name,
                   f"{name} must be an integer in [0, {_MAX_LOGPROBS}], got {v!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        self._check_token_controls()

    def _check_token_controls(self) -> None:
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias",
                   "logit_bias must be an object mapping token ids to biases in [-100, 100]")
            bias = {}
            for key, value in self.logit_bias.items():
                tid = _token_id(key)
                _check(tid is not None, "logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
                _check(_is_num(value) and -_MAX_LOGIT_BIAS <= value <= _MAX_LOGIT_BIAS, "logit_bias",
                       f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {key}")
                bias[tid] = float(value)
            self.logit_bias = bias or None   # keys arrive as strings from JSON
        if self.allowed_token_ids is not None:
            _check(isinstance(self.allowed_token_ids, (list, tuple)) and len(self.allowed_token_ids) > 0
                   and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids), "allowed_token_ids",
                   "allowed_token_ids must be a non-empty list of token ids (integers >= 0)")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.bad_words is not None:
            _check(isinstance(self.bad_words, (list, tuple))
                   and all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
                   "bad_words must be a list of words, each with some non-whitespace text")
            self.bad_words = list(self.bad_words) or None
        if self.bad_words_token_ids is not None:
            _check(isinstance(self.bad_words_token_ids, (list, tuple))
                   and all(isinstance(seq, (list, tuple)) and seq and all(_is_int(t) and t >= 0 for t in seq)
                           for seq in self.bad_words_token_ids), "bad_words",
                   "bad_words_token_ids must be a list of non-empty token id lists")
            self.bad_words_token_ids = [list(seq) for seq in self.bad_words_token_ids] or None

    def resolve_token_controls(self, tokenizer, vocab_size: int) -> "SamplingParams":
        """These params with `bad_words` tokenized (vLLM's way: each word with and without a leading
        space, duplicates dropped) and every token id checked against the vocabulary. Returns self when
        there is nothing to resolve, else a copy (the caller's object is left as it was)."""
        bad_ids = self.bad_words_token_ids
        if self.bad_words:
            bad_ids = []
            for word in self.bad_words:
                for text in (word.lstrip(), " " + word.lstrip()):
                    ids = list(tokenizer.encode(text, add_special_tokens=False))
                    if ids and ids not in bad_ids:
                        bad_ids.append(ids)
        for param, ids in (("logit_bias", self.logit_bias or ()), ("allowed_token_ids", self.allowed_token_ids or ()),
                           ("bad_words", [t for seq in bad_ids or () for t in seq])):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise TidalError(f"{param} has token id {bad}, outside this model's vocabulary "
                                 f"(0..{vocab_size - 1})", param=param)
        if bad_ids == self.bad_words_token_ids:
            return self
        return replace(self, bad_words_token_ids=bad_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS
