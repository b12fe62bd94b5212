"""OpenAI function tools as output constraints: checking `tools` / `tool_choice`, and their grammars.

Owns: `check_tools` (a request's `tools` -> `Function`s, each `parameters` schema checked by
xgrammar, so a bad one is a TidalError naming `tools`), `check_tool_choice` (`none`, `auto`,
`required` or `{"type": "function", "function": {"name": ...}}` -> the mode and the named function),
`tool_spec` (the grammar of a mode: a named function's output is its arguments object, matching its
`parameters`; `required`'s is a JSON array of `{"name", "parameters"}` objects, one `anyOf` branch
per function, as vLLM does), and `calls_from_required` (that array -> ToolCalls).
Must not: import the server or the engine; parse the model's free-text formats (tool_parsers.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from tidal.errors import TidalError
from tidal.structured.compiler import check
from tidal.structured.params import StructuredOutputsParams
from tidal.structured.tool_parsers import ToolCall

MODES = ("none", "auto", "required")
_DEFS = ("$defs", "definitions")


@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict   # a JSON schema; {"type": "object"} when the tool gives none

    def as_tool(self) -> dict:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


def _bad(message: str, param: str = "tools") -> TidalError:
    return TidalError(message, param=param)


def check_tools(tools) -> list[Function]:
    if not isinstance(tools, list) or not tools:
        raise _bad('`tools` must be a non-empty list of {"type": "function", "function": {...}} objects')
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise _bad(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}; '
                       "only function tools are supported")
        fn = tool["function"]
        name, description, params = fn.get("name"), fn.get("description"), fn.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}.function.name must be a non-empty string")
        if name in seen:
            raise _bad(f"{where}.function.name `{name}` is given twice; tool names must be unique")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{where}.function.description must be a string")
        if not isinstance(params, dict):
            raise _bad(f"{where}.function.parameters must be a JSON schema object, not {type(params).__name__}")
        try:
            check(StructuredOutputsParams(json=params))   # remembered: tools repeat across requests
        except TidalError as e:
            detail = e.message.split(": ", 1)[-1]
            raise _bad(f"{where}.function.parameters is not a usable JSON schema ({detail})") from None
        seen.add(name)
        out.append(Function(name, description, params))
    return out


def check_tool_choice(choice, functions: list[Function] | None) -> tuple[str, Function | None]:
    """-> (mode, the named function or None). No tools: only none / auto; with tools, default auto."""
    if choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(choice, str):
        if choice not in MODES:
            raise _bad(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                       f'{{"name": ...}}}}, not {choice!r}', "tool_choice")
        if choice == "required" and not functions:
            raise _bad('tool_choice "required" needs `tools`', "tool_choice")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                   '{"name": ...}}', "tool_choice")
    match = next((f for f in functions or () if f.name == name), None)
    if match is None:
        known = ", ".join(f.name for f in functions or ()) or "none"
        raise _bad(f"tool_choice names the function `{name}`, which is not in `tools` (given: {known})",
                   "tool_choice")
    return "named", match


def tool_spec(mode: str, functions: list[Function], named: Function | None = None,
              parallel: bool = True) -> StructuredOutputsParams | None:
    """The grammar the output must match in this mode; None for none / auto (free text). `parallel`
    false: `required` asks for exactly one call (small models otherwise tend to repeat a call)."""
    if mode == "named":
        return StructuredOutputsParams(json=named.parameters)
    if mode != "required":
        return None
    defs, branches = {}, []
    for f in functions:
        params = dict(f.parameters)
        for key in _DEFS:   # a nested schema's "#/$defs/..." refs resolve against the root: hoist them
            for name, schema in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(name, schema) != schema:
                    raise _bad(f"two tools define `{key}/{name}` differently; rename one")
        branches.append({"type": "object", "properties": {"name": {"const": f.name}, "parameters": params},
                         "required": ["name", "parameters"]})
    schema = {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": branches},
              **defs}
    spec = StructuredOutputsParams(json=schema)
    try:
        check(spec)
    except TidalError as e:
        raise _bad(f"the tools' parameters schemas do not combine into one grammar ({e.message.split(': ', 1)[-1]})")
    return spec


def calls_from_required(text: str) -> list[ToolCall] | None:
    """The `required` grammar's array -> ToolCalls. An array cut by max_tokens (a small model may
    repeat calls until then) gives its complete calls; None when not even one is complete."""
    try:
        items = json.loads(text)
    except ValueError:
        items = _complete_items(text)
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))
    return calls


def _complete_items(text: str) -> list:
    """The whole elements at the start of a JSON array that was cut off."""
    decoder, items = json.JSONDecoder(), []
    pos = text.find("[") + 1
    if pos == 0:
        return items
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return items
        items.append(item)
