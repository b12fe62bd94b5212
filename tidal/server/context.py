"""What every route shares: the model's limits, the tokenizer workers, the server's limits and defaults.

Owns: `ServerContext`: the model names, the model's limits (`max_model_len`, `kv_capacity_tokens`),
the sampling defaults a request leaves unset (`default_sampling`), per-request limits (`max_seqs_per_request`), tokenization off the event
loop, the cheap "this text cannot fit" bound that runs before any tokenizing, the warning about
unknown request fields, and the shutdown cut (`cut_streams`: --shutdown-timeout ran out, so every
request still being served ends with a 503 error instead of being dropped).
It takes the figures it checks requests against, not an engine: the server passes its frontend's
(and the frontend itself, `engine`, which common.py runs requests on and the metrics read);
`tidal batch` builds one from its offline `LLMEngine` with no frontend, so a batch line goes
through the same preparation (serving_*.prepare_*) as an HTTP body.
Must not: know the JSON shapes of responses (serving_*.py) or run engine requests (common.py).
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from tidal.sampling import SamplingParams
from tidal.server.errors import APIError
from tidal.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from tidal.engine.frontend import EngineFrontend

logger = logging.getLogger("tidal.server")

DEFAULT_MAX_SEQS_PER_REQUEST = 256
# Texts above this many characters (ids above LONG_IDS) are tokenized (decoded) on their own
# worker, so a megabyte prompt (seconds of tokenizing) never queues in front of short ones.
LONG_CHARS = 32_768
LONG_IDS = 8_192
_SAMPLING_KNOBS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")
_MAX_WARNED_FIELDS = 256   # unknown field names are client input: remember a bounded number


def neutral_sampling() -> dict:
    """SamplingParams' own defaults for the knobs a request may leave unset (OpenAI's too)."""
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    return {k: defaults[k] for k in _SAMPLING_KNOBS}


class ServerContext:
    def __init__(self, tokenizer, served_model_name: str, model_aliases: tuple[str, ...] = (), *,
                 max_model_len: int, kv_capacity_tokens: int, default_sampling: dict | None = None,
                 max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST, engine: EngineFrontend | None = None):
        """`engine`: the frontend that runs the requests (streaming.add_requests) and that the metrics
        read; None for an offline user (`tidal batch`) that only prepares requests and shapes results."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        self.served_model_name = served_model_name
        self.model_names = {served_model_name, *model_aliases}
        self.metrics = ServerMetrics(engine, served_model_name) if engine is not None else None
        self.created = int(time.time())
        self.max_seqs_per_request = max_seqs_per_request
        # What a request that leaves a knob unset gets (the model's generation config may fill it).
        self.default_sampling = {**neutral_sampling(), **(default_sampling or {})}
        self.max_chars_per_token = max_chars_per_token(self.tokenizer)
        # One worker per tokenizer instance: HF tokenizers may fail with "Already borrowed" when one
        # instance is used from several threads at once. Long texts get a copy and a worker of their own.
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidal-tokenize")
        self._long_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidal-tokenize-long")
        self._long_tokenizer: Future = self._tok_pool.submit(_copy_or_none, self.tokenizer)
        self.shutdown_message: str | None = None   # set by cut_streams
        self.live: set[asyncio.Queue] = set()   # output queues of requests being served (streaming.iterate)
        self._warned_fields: set[str] = set()

    def check_model(self, model: str | None) -> str:
        """A missing `model` means the served one (vLLM's rule; OpenAI's API requires the field)."""
        if model is not None and model not in self.model_names:
            raise APIError(f"the model `{model}` does not exist; this server serves `{self.served_model_name}` "
                           "(see GET /v1/models)", status=404, param="model", code="model_not_found")
        return self.served_model_name

    def warn_unknown_fields(self, route: str, req) -> None:
        """Unknown fields are accepted and ignored, as vLLM does; the log names each one once."""
        new = [k for k in (getattr(req, "model_extra", None) or {}) if k not in self._warned_fields]
        if not new or len(self._warned_fields) >= _MAX_WARNED_FIELDS:
            return
        self._warned_fields.update(new)
        logger.warning("%s: ignoring unknown request field(s) %s (logged once per name)", route,
                       ", ".join(repr(k[:64]) for k in new))

    # ---- tokenization ------------------------------------------------------------------------
    def check_length(self, chars: int) -> None:
        """Reject, before tokenizing, text that no tokenization could fit into the context."""
        limit = self.max_model_len * self.max_chars_per_token
        if self.max_chars_per_token and chars > limit:
            raise APIError(f"the prompt has {chars:,} characters; this model's context is {self.max_model_len} "
                           f"tokens and a token here covers at most {self.max_chars_per_token} characters, so no "
                           f"text over {limit:,} characters fits; shorten the prompt", param="prompt")

    @staticmethod
    def check_unicode(text: str, param: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # JSON allows "\ud800"; no tokenizer does
            raise APIError(f"`{param}` holds a lone UTF-16 surrogate (\\u{ord(text[e.start]):04x}) at character "
                           f"{e.start}; send valid Unicode text", param=param) from None

    async def run_in_tokenizer(self, fn: Callable, *args, long: bool = False):
        """fn(tokenizer, *args) on a tokenizer worker; `long` work goes to its own worker and copy."""
        loop = asyncio.get_running_loop()
        if long:
            tokenizer = await asyncio.wrap_future(self._long_tokenizer)
            if tokenizer is not None:
                return await loop.run_in_executor(self._long_pool, fn, tokenizer, *args)
        return await loop.run_in_executor(self._tok_pool, fn, self.tokenizer, *args)

    async def encode(self, text: str, add_special_tokens: bool = True, long: bool = False) -> list[int]:
        self.check_length(len(text))
        self.check_unicode(text, "prompt")
        return await self.run_in_tokenizer(lambda tok: list(tok.encode(text, add_special_tokens=add_special_tokens)),
                                           long=long or len(text) > LONG_CHARS)

    async def decode(self, ids: list[int]) -> str:
        return await self.run_in_tokenizer(lambda tok: tok.decode(ids), long=len(ids) > LONG_IDS)

    async def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                                  tools: list[dict] | None = None) -> list[int]:
        """`tools`: OpenAI function tools, for a template that writes them into the prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError("this model has no chat template; use /v1/completions with a plain prompt",
                           param="messages")
        texts = [m["content"] for m in messages] + [m["name"] for m in messages if "name" in m]
        texts += [json.dumps(m["tool_calls"], ensure_ascii=False) for m in messages if m.get("tool_calls")]
        tools_text = json.dumps(tools, ensure_ascii=False) if tools else ""
        chars = sum(map(len, texts)) + len(tools_text)
        self.check_length(chars)   # the template only adds text around the contents
        for text in texts:
            self.check_unicode(text, "messages")
        self.check_unicode(tools_text, "tools")

        def work(tok):
            out = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                          tokenize=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        try:
            return await self.run_in_tokenizer(work, long=chars > LONG_CHARS)
        except (ValueError, TypeError, KeyError) as e:   # jinja's TemplateError is an Exception subclass too
            raise APIError(f"the chat template rejected these messages: {e}", param="messages")
        except Exception as e:
            if type(e).__module__.startswith("jinja2"):
                raise APIError(f"the chat template rejected these messages: {e}", param="messages")
            raise

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- shutdown ----------------------------------------------------------------------------
    def cut_streams(self, message: str) -> int:
        """End every request still being served with a 503 (streams get it as an error event, then
        [DONE]); requests that arrive later get it at once. Returns how many were cut."""
        self.shutdown_message = message
        for queue in list(self.live):
            queue.put_nowait((None, None, self.shutdown_error()))
        return len(self.live)

    def shutdown_error(self) -> APIError:
        return APIError(self.shutdown_message or "the server is shutting down", status=503,
                        code="server_shutting_down")

    def close(self) -> None:
        self._tok_pool.shutdown(wait=False, cancel_futures=True)
        self._long_pool.shutdown(wait=False, cancel_futures=True)


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on how many characters of text one token can stand for; 0 when there is none.

    A BPE token covers at most its vocabulary string's length in characters (byte-level vocabularies
    spell one byte per character, and a character is at least one byte). A normalizer may compose
    characters (NFC: at most 3 into 1), hence the 4x. Tokenizers that can map an unbounded run of
    text to one token (WordPiece's [UNK] for a whole word, fused unknowns) get no bound."""
    try:
        model = tokenizer.backend_tokenizer.model
        if type(model).__name__ != "BPE" or (model.unk_token and model.fuse_unk and not model.byte_fallback):
            return 0
        longest = max(map(len, tokenizer.get_vocab()))
        return max(longest, 1) * (1 if tokenizer.backend_tokenizer.normalizer is None else 4)
    except Exception:   # a slow (Python) tokenizer or an unusual one: no cheap bound, tokenize everything
        return 0


def _copy_or_none(tokenizer):
    try:
        return copy.deepcopy(tokenizer)
    except Exception:   # long texts then share the one worker, as before
        logger.warning("the tokenizer cannot be copied; long prompts share the tokenizer worker")
        return None
