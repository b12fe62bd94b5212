"""What a request's output must match: `StructuredOutputsParams`, and the OpenAI request mapping.

Owns: the plain-data spec (vLLM's field names: `json`, `json_object`, `regex`, `choice`, `grammar`,
`disable_any_whitespace`), its validation (exactly one constraint, right types) and its cache key,
and `from_openai_request`, which turns OpenAI's `response_format` and vLLM's `guided_*` /
`structured_outputs` request fields into one spec.
Must not: import xgrammar or torch (SamplingParams imports this module, and requests cross a process
boundary as msgpack dicts: every field is a builtin type); compiling belongs to compiler.py.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, fields

from tidal.errors import TidalError

_PARAM = "structured_outputs"
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    json: dict | str | None = None        # a JSON schema, as an object or its JSON text
    json_object: bool = False             # any JSON object
    regex: str | None = None
    choice: list[str] | None = None       # the output is exactly one of these strings
    grammar: str | None = None            # EBNF (GBNF style, as xgrammar reads it); the start rule is `root`
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens

    def __post_init__(self):
        if isinstance(self.json, str):
            try:
                parsed = _json.loads(self.json)
            except ValueError as e:
                raise TidalError(f"structured_outputs.json is not valid JSON ({e}); give a JSON schema",
                                 param=_PARAM) from None
            _need(isinstance(parsed, dict), "json", "must be a JSON schema object")
        else:
            _need(self.json is None or isinstance(self.json, dict), "json",
                  "must be a JSON schema (an object, or its JSON text)")
        _need(isinstance(self.json_object, bool), "json_object", "must be true or false")
        _need(isinstance(self.disable_any_whitespace, bool), "disable_any_whitespace", "must be true or false")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            _need(v is None or (isinstance(v, str) and v != ""), name, "must be a non-empty string")
        if self.choice is not None:
            _need(isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                  and all(isinstance(c, str) and c for c in self.choice), "choice",
                  "must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise TidalError("structured outputs need exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) if given else 'none'}", param=_PARAM)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple:
        """Equal for specs that compile to the same grammar (a schema's key order does not matter)."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            value = _json.dumps(_json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        elif self.kind == "choice":
            value = tuple(value)
        return self.kind, value, self.disable_any_whitespace

    @classmethod
    def from_dict(cls, d: dict) -> "StructuredOutputsParams":
        if not isinstance(d, dict):
            raise TidalError(f"structured_outputs must be an object, not {type(d).__name__}", param=_PARAM)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TidalError(f"structured_outputs has unknown field(s) {unknown}; known: {sorted(known)}",
                             param=_PARAM)
        return cls(**d)


def _need(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise TidalError(f"structured_outputs.{field_name} {message}", param=_PARAM)


def from_openai_request(response_format: dict | None = None, guided_json=None, guided_regex=None,
                        guided_choice=None, guided_grammar=None,
                        structured_outputs: dict | None = None) -> StructuredOutputsParams | None:
    """One spec from a request's OpenAI `response_format` and vLLM's extensions; None if it has none.
    `{"type": "text"}` means no constraint. Giving two constraints is an error."""
    specs: list[tuple[str, StructuredOutputsParams]] = []
    if structured_outputs is not None:
        specs.append(("structured_outputs", StructuredOutputsParams.from_dict(structured_outputs)))
    rf = _from_response_format(response_format)
    if rf is not None:
        specs.append(("response_format", rf))
    for name, field_name, value in (("guided_json", "json", guided_json), ("guided_regex", "regex", guided_regex),
                                    ("guided_choice", "choice", guided_choice),
                                    ("guided_grammar", "grammar", guided_grammar)):
        if value is not None:
            try:
                specs.append((name, StructuredOutputsParams(**{field_name: value})))
            except TidalError as e:
                raise TidalError(e.message.replace(f"structured_outputs.{field_name}", name), param=name) from None
    if len(specs) > 1:
        raise TidalError(f"give one output constraint, not several: {', '.join(n for n, _ in specs)}",
                         param=specs[1][0])
    return specs[0][1] if specs else None


def _from_response_format(rf) -> StructuredOutputsParams | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise TidalError('response_format must be an object with a "type": "text", "json_object" or "json_schema"',
                         param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise TidalError(f'response_format type "{kind}" is not supported; use "text", "json_object" or '
                         '"json_schema"', param="response_format")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise TidalError('response_format "json_schema" needs a "json_schema" object with a "name" and a "schema"',
                         param="response_format")
    schema = spec.get("schema", spec.get("json_schema"))   # vLLM also reads the field under its alias
    if schema is None:   # OpenAI lets the schema be left out: then any JSON object will do
        return StructuredOutputsParams(json_object=True)
    if not isinstance(schema, dict):
        raise TidalError("response_format.json_schema.schema must be a JSON schema object, not "
                         f"{type(schema).__name__}", param="response_format")
    return StructuredOutputsParams(json=schema)
