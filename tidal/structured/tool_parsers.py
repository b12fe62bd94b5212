"""The model's own tool-call formats, parsed from generated text (tool_choice "auto").

Owns: `ToolCall` (a function name and its arguments as JSON text), the parsers (`HermesParser`:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen2.5 and Hermes write it;
`Llama3JsonParser`: `{"name": ..., "parameters": {...}}` at the start, after an optional
`<|python_tag|>`, several joined by `;`), each a pure `parse(text) -> (content, tool_calls)` plus
`hold_from(text)`: where text that may still become a tool call starts, so a stream holds it back;
and `get_parser(name, chat_template)`, which picks one for `--tool-parser auto` from the template.
Text with no tool call, or a malformed one (bad JSON, no name), is plain content: never an error.
Must not: import the server, the engine or xgrammar; know about requests or responses.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

PARSERS = ("hermes", "llama3_json")


@dataclass
class ToolCall:
    name: str
    arguments: str   # JSON text of an object, as OpenAI's `function.arguments`


def _call(obj, *arg_keys: str) -> ToolCall | None:
    """{"name": str, <arg key>: object or its JSON text} -> ToolCall; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in arg_keys if k in obj), None)
    args = {} if key is None else obj[key]
    if isinstance(args, str):   # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _partial_marker_start(text: str, marker: str) -> int:
    """Index of the longest tail of `text` that is a proper prefix of `marker` (len(text) if none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)


class HermesParser:
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.START)
        if start < 0:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text[start:]):
            try:
                call = _call(json.loads(body), "arguments", "parameters")
            except ValueError:
                call = None
            if call is None:   # one malformed block: the whole text stays text
                return text, []
            calls.append(call)
        content = text[:start].strip()
        return content or None, calls

    def hold_from(self, text: str) -> int:
        start = text.find(self.START)
        return start if start >= 0 else _partial_marker_start(text, self.START)


class Llama3JsonParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        rest = text.strip()
        if rest.startswith(self.TAG):
            rest = rest[len(self.TAG):].lstrip()
        if not rest.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(rest):
            try:
                obj, pos = decoder.raw_decode(rest, pos)
            except ValueError:
                return text, []
            call = _call(obj, "parameters", "arguments")
            if call is None:
                return text, []
            calls.append(call)
            pos = _skip(rest, pos, " \t\r\n;")
        return None, calls

    def hold_from(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("{", self.TAG)) or self.TAG.startswith(stripped):
            return 0   # the reply may be a tool call: hold all of it
        tag = text.find(self.TAG)
        return tag if tag >= 0 else _partial_marker_start(text, self.TAG)


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def get_parser(name: str, chat_template: str | None = None):
    """`hermes`, `llama3_json`, or `auto`: the template's own format (`<tool_call>` -> hermes;
    `<|python_tag|>` or the `ipython` role -> llama3_json), hermes when it shows neither."""
    if name == "auto":
        template = chat_template if isinstance(chat_template, str) else ""
        if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
            name = "llama3_json"
        else:
            name = "hermes"
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"unknown tool parser {name!r}; choose one of {', '.join(PARSERS)} or auto")
