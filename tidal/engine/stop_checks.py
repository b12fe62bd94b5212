"""When a sequence stops: the stop conditions checked after each token the engine appends.

Owns: `check_stop` (`stop_token_ids` and EOS once `min_tokens` are out, unless `ignore_eos`; a grammar's
end; `max_tokens`; the context length) and `eos_ids` (the tokenizer's and the model config's
end-of-sequence ids).
Must not: change the request (the core finishes it), read the runner's state, or look at text: stop
strings are the frontend's (output_processor.py), found in the detokenized text.
"""
from __future__ import annotations


def check_stop(req, token: int, eos_token_ids: set[int], max_model_len: int) -> tuple[str | None, int | None]:
    """(finish reason or None, stop token id) after `token` was appended to `req`."""
    p = req.params
    n_out = len(req.output_token_ids)
    if n_out >= p.min_tokens and token in (p.stop_token_ids or ()):
        return "stop", token
    if n_out >= p.min_tokens and not p.ignore_eos and token in eos_token_ids:
        return "stop", None
    if req.grammar is not None and req.grammar.is_terminated:   # the grammar's end: it took a stop token
        return "stop", None
    if p.max_tokens is not None and n_out >= p.max_tokens:
        return "length", None
    if req.num_tokens >= max_model_len:
        return "length", None
    return None, None


def eos_ids(tokenizer, hf_config) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
