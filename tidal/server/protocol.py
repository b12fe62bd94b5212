"""Request models of the OpenAI-compatible API (pydantic), with vLLM's names for the extras.

Owns: the JSON shape and types of every request body (chat, completions, tokenize, detokenize),
which is also what /openapi.json publishes. Types are strict (a string is not a number), so a
wrong type is a 400, never a silent coercion. Value checks that the engine already makes
(temperature range, stop strings, ...) stay in `SamplingParams`, so there is one rule per knob.
Like vLLM (and unlike OpenAI's API), `model` is optional and unknown top-level fields are accepted
and ignored; the server logs each unknown name once.
Must not: build responses or talk to the engine (serving_*.py do).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_N = 16
MAX_LOGPROBS = 20

# JSON Schema counts 3.0 as an integer, so an integral float is accepted as an int; a bool or a
# string is not (strict mode).
Int = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]


class _Strict(BaseModel):
    # Inside nested objects, unknown fields are dropped silently.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Request(_Strict):
    # A request body's unknown top-level fields are kept (in `model_extra`) only so the server can
    # log each name once, then ignored: vLLM's rule (OpenAI's API answers 400 instead), since clients
    # send many optional extras.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(_Strict):
    name: str = Field(description="required, as in OpenAI's API")
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema", description="the JSON Schema the output must match")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="json_object and json_schema are enforced by a grammar (xgrammar): the output always parses")
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict:
        d = {"type": self.type}
        if self.json_schema is not None:
            d["json_schema"] = {"name": self.json_schema.name, "strict": self.json_schema.strict}
            if self.json_schema.json_schema is not None:
                d["json_schema"]["schema"] = self.json_schema.json_schema
        return d


class _SamplingFields(_Request):
    """Knobs shared by chat and completions."""
    model: str | None = Field(None, description="optional: a missing model means the served one (as in vLLM)")
    n: Int = Field(1, ge=1, le=MAX_N)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit; -100 bans it")
    # vLLM extras
    top_k: Int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Int = Field(0, ge=0)
    priority: Int = 0
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[Int] | None = Field(None, description="only these token ids may be sampled")
    bad_words: list[str] | None = Field(None, description="words never generated (with or without a leading space)")
    # vLLM's structured-output extras (one constraint per request, response_format included)
    structured_outputs: dict | None = Field(None, description="vLLM's form: {json|regex|choice|grammar|json_object: ...}")
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = Field(None, description="an EBNF grammar (xgrammar's GBNF dialect)")


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="the arguments object as JSON text, as OpenAI's API sends it")


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant message's earlier tool calls")
    tool_call_id: str | None = Field(None, description="a tool message: the id of the call it answers")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list | None = Field(None, description='[{"type": "function", "function": {"name", "description", '
                               '"parameters": <JSON schema>}}]; checked by the server (a bad one: 400 naming tools)')
    tool_choice: str | dict | None = Field(None, description='"none", "auto" (the default with tools), "required" or '
                                           '{"type": "function", "function": {"name": ...}}; the last two are '
                                           "enforced by a grammar")
    parallel_tool_calls: bool | None = Field(None, description='false: at most one tool call (tool_choice "required" '
                                             "then asks the grammar for exactly one)")
    add_generation_prompt: bool = True


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[Int], list[list[Int]]]
    max_tokens: Int | None = Field(16, ge=1)   # OpenAI's legacy default for completions
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    response_format: ResponseFormat | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int]
