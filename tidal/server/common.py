"""What chat and completions share before anything runs: a request's fields -> SamplingParams, and the
per-request limits.

Owns: `Prepared` (a request checked and tokenized: what serving_*.prepare_* hand to the engine, the
server's frontend or `tidal batch`'s LLMEngine alike), `usage`, `logprob_value`, `new_id`,
`sampling_params` (with `structured_outputs`, the request's grammar constraint), `check_request` /
`check_fits` (what a request may ask for). Running the requests and SSE live in streaming.py,
`ServerContext` in context.py.
Must not: know the JSON shapes of chat or completion responses (serving_*.py own those) or run requests.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass


from tidal.sampling import SamplingParams
from tidal.server.context import ServerContext
from tidal.server.errors import APIError
from tidal.server.protocol import MAX_N
from tidal.errors import TidalError
from tidal.structured.compiler import check as check_grammar
from tidal.structured.params import from_openai_request


@dataclass
class Prepared:
    """A request checked and tokenized (serving_chat.prepare_chat, serving_completions.prepare_completion),
    ready to be added to an engine; the same object then shapes the response body."""
    prompts: list[list[int]]
    params: SamplingParams
    tools: object = None              # chat: its serving_tools.ChatTools (the output may be tool_calls)
    echo: list[str] | None = None     # completions with echo=true: each prompt's text

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprob_value(v: float) -> float:
    """-inf (a token the sampler masked) and NaN are not JSON; OpenAI's floor is -9999."""
    return v if v == v and v > -9999.0 else -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req, max_tokens: int | None, logprobs: int | None, n: int,
                    defaults: dict | None = None) -> SamplingParams:
    """Map request fields onto SamplingParams, a knob the request leaves unset (None) taking its
    value from `defaults` (ServerContext.default_sampling); its checks raise TidalError -> 400."""
    for stop in [req.stop] if isinstance(req.stop, str) else req.stop or ():
        ServerContext.check_unicode(stop, "stop")
    for word in req.bad_words or ():
        ServerContext.check_unicode(word, "bad_words")
    defaults = defaults or {}
    if max_tokens is None:
        max_tokens = defaults.get("max_tokens")
    kw = dict(n=n, max_tokens=max_tokens, stop=req.stop, seed=req.seed, logprobs=logprobs,
              ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, stop_token_ids=req.stop_token_ids,
              skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
              logit_bias=req.logit_bias, allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:   # still None: SamplingParams' neutral default (OpenAI's temperature is 1)
            kw[name] = value
    kw["structured_outputs"] = structured_outputs(req)
    return SamplingParams(**kw)


def structured_outputs(req):
    """The request's one output constraint (response_format, vLLM's guided_* or structured_outputs),
    checked by xgrammar now, so a bad schema, regex or grammar is a 400 naming the field it came in."""
    rf = getattr(req, "response_format", None)
    fields = {"response_format": rf.as_dict() if rf is not None and rf.type != "text" else None,
              "guided_json": req.guided_json, "guided_regex": req.guided_regex, "guided_choice": req.guided_choice,
              "guided_grammar": req.guided_grammar, "structured_outputs": req.structured_outputs}
    spec = from_openai_request(fields["response_format"], **{k: v for k, v in fields.items() if k != "response_format"})
    if spec is not None:
        source = next(k for k, v in fields.items() if v is not None)
        try:
            check_grammar(spec)
        except TidalError as e:
            raise APIError(e.message.replace("structured_outputs", source, 1), param=source) from None
    return spec


def check_request(ctx: ServerContext, num_prompts: int, params: SamplingParams) -> None:
    """What can be refused before any tokenizing: too many sequences for one request, and a
    min_tokens that no prompt leaves room for."""
    seqs, cap = num_prompts * params.n, ctx.max_seqs_per_request
    if seqs > cap:
        asked = f"{num_prompts} prompts x n={params.n} = {seqs} sequences" if num_prompts > 1 else f"n={params.n}"
        raise APIError(f"this request asks for {asked}; the server runs at most {cap} sequences per request "
                       "(--max-seqs-per-request); split it into smaller requests",
                       param="n" if num_prompts == 1 or params.n > 1 else "prompt")
    if params.min_tokens >= ctx.max_model_len:
        raise APIError(f"min_tokens={params.min_tokens} can never be reached: this model's context is "
                       f"{ctx.max_model_len} tokens, prompt included", param="min_tokens")


def check_fits(ctx: ServerContext, prompt_len: int, params: SamplingParams) -> None:
    """Reject max_tokens or min_tokens past the context, and n samples that the whole KV cache could
    never hold."""
    if params.n > MAX_N:
        raise APIError(f"n must be at most {MAX_N}, got {params.n}", param="n")
    limit = ctx.max_model_len
    if params.max_tokens is not None and prompt_len < limit < prompt_len + params.max_tokens:
        # Like OpenAI and vLLM: an error, not a silent cut at the context (a too-long prompt is the
        # engine's error, with param "prompt").
        raise APIError(f"this model's context is {limit} tokens and the prompt has {prompt_len}, so max_tokens can be "
                       f"at most {limit - prompt_len}; you asked for {params.max_tokens}", param="max_tokens")
    if prompt_len < limit < prompt_len + params.min_tokens:
        raise APIError(f"this model's context is {limit} tokens and the prompt has {prompt_len}, so at most "
                       f"{limit - prompt_len} tokens can be generated; min_tokens={params.min_tokens} can never be "
                       "reached", param="min_tokens")
    per_seq = min(prompt_len + (params.max_tokens or ctx.max_model_len), ctx.max_model_len)
    need = per_seq * params.n
    if params.n > 1 and need > ctx.kv_capacity_tokens:
        raise APIError(f"n={params.n} samples of up to {per_seq} tokens need {need} tokens of KV cache but it holds "
                       f"{ctx.kv_capacity_tokens}; lower n or max_tokens", param="n")


__all__ = ["ServerContext", "Prepared", "usage", "logprob_value", "sampling_params", "check_request", "check_fits", "new_id"]
