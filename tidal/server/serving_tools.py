"""Tools in chat completions: a request's `tools` / `tool_choice`, and its output as `tool_calls`.

Owns: `ChatTools`, one request's tools, mode (none, auto, required, named), grammar and parser:
`constrain` puts the grammar of `required` / a named function on the SamplingParams (with another
output constraint beside it: 400); `template_inputs` gives the messages and tools as the chat
template takes them (a template that never reads `tools`, like SmolLM2's, gets them as a
Hermes-style system prompt, and earlier calls as `<tool_call>` text); `message` turns a choice's
text into the assistant message and finish_reason; `ToolStream` does the same as stream deltas (a
named function's arguments stream as they come; `required` and `auto` calls go out whole when the
choice ends, and `auto` holds back text that may be the start of a call).
Must not: tokenize, talk to the engine, or shape the rest of the response (serving_chat.py does).
"""
from __future__ import annotations

import json
import re
import uuid

from tidal.server.context import ServerContext
from tidal.server.errors import APIError
from tidal.structured.tool_parsers import ToolCall
from tidal.structured.tools import calls_from_required, check_tool_choice, check_tools, tool_spec

_READS_TOOLS = re.compile(r"\btools\b")
_SYSTEM_PROMPT = ("You can call these functions, given as JSON schemas in <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
                  "To call one, reply with <tool_call>{{\"name\": <function name>, \"arguments\": <arguments "
                  "object>}}</tool_call>")


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_delta(index: int, call: ToolCall) -> dict:
    return {"index": index, "id": _call_id(), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def reads_tools(chat_template) -> bool:
    templates = chat_template.values() if isinstance(chat_template, dict) else [chat_template or ""]
    return any(isinstance(t, str) and _READS_TOOLS.search(t) for t in templates)


class ChatTools:
    def __init__(self, tools, tool_choice, parser, parallel_tool_calls: bool | None = None):
        if tools is not None:   # JSON allows "\ud800"; no tokenizer does
            ServerContext.check_unicode(json.dumps(tools, ensure_ascii=False), "tools")
        self.functions = check_tools(tools) if tools is not None else []
        self.mode, self.named = check_tool_choice(tool_choice, self.functions)
        if not self.functions:   # tool_choice none / auto without tools: plain chat
            self.mode = "none"
        self.parser = parser
        self.parallel = parallel_tool_calls is not False
        self.spec = tool_spec(self.mode, self.functions, self.named, self.parallel)

    def constrain(self, params):
        """The mode's grammar on `params` (a SamplingParams from common.sampling_params)."""
        if self.spec is not None:
            if params.structured_outputs is not None:
                raise APIError(f"tool_choice {self.mode!r} constrains the output to tool calls; it cannot be "
                               "combined with response_format or guided_* (give one output constraint)",
                               param="tool_choice")
            params.structured_outputs = self.spec
        return params

    def template_inputs(self, messages: list[dict], chat_template) -> tuple[list[dict], list[dict] | None]:
        """-> (messages, tools) for tokenizer.apply_chat_template."""
        tools = [f.as_tool() for f in self.functions] or None
        if reads_tools(chat_template):
            return messages, tools
        out = []
        for m in messages:
            if m.get("tool_calls"):
                blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                     ensure_ascii=False) for c in m["tool_calls"]]
                text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
                m = {k: v for k, v in m.items() if k != "tool_calls"}
                m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
            out.append(m)
        if tools and self.mode != "none":
            prompt = _SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False,
                                                                      separators=(",", ":")) for t in tools))
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out, None

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished choice's text -> (content, tool calls); no calls: (text, [])."""
        if self.mode == "named":
            return None, [ToolCall(self.named.name, text)]
        if self.mode == "required":
            calls = calls_from_required(text)
            return (None, calls) if calls else (text, [])
        if self.mode == "auto":
            content, calls = self.parser.parse(text)
            return content, calls if self.parallel else calls[:1]
        return text, []

    def finish_reason(self, text: str, calls: list[ToolCall], finish_reason: str | None) -> str | None:
        """tool_calls when the calls are complete; a named function cut by max_tokens says length."""
        if not calls or (self.mode == "named" and not _parses(text)):
            return finish_reason
        return "tool_calls"

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        content, calls = self.calls(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        tool_calls = [{k: v for k, v in _call_delta(0, c).items() if k != "index"} for c in calls]
        return ({"role": "assistant", "content": content, "tool_calls": tool_calls},
                self.finish_reason(text, calls, finish_reason))

    def stream(self) -> "ToolStream":
        return ToolStream(self)


class ToolStream:
    """One choice's stream: feed(text so far, its new part, finish_reason) -> [(delta, finish_reason)]."""

    def __init__(self, tools: ChatTools):
        self.tools, self.sent, self.header_sent = tools, 0, False

    def feed(self, text: str, delta_text: str, finish_reason: str | None) -> list[tuple[dict, str | None]]:
        mode = self.tools.mode
        if mode == "none":
            return [({"content": delta_text} if delta_text else {}, finish_reason)] \
                if delta_text or finish_reason else []
        if mode == "named":
            return self._named(text, delta_text, finish_reason)
        events = []
        if mode == "auto":   # pass on text up to where a tool call may start, and whitespace before it
            hold = max(self.sent, self.tools.parser.hold_from(text))
            hold = self.sent + len(text[self.sent:hold].rstrip())
            if hold > self.sent and finish_reason is None:
                events.append(({"content": text[self.sent:hold]}, None))
                self.sent = hold
        if finish_reason is None:
            return events
        _, calls = self.tools.calls(text)
        if not calls:
            rest = text[self.sent:]
            return events + [({"content": rest} if rest else {}, finish_reason)]
        if mode == "auto":
            rest = text[self.sent:self.tools.parser.hold_from(text)].rstrip()
            if rest:
                events.append(({"content": rest}, None))
        events.append(({"tool_calls": [_call_delta(i, c) for i, c in enumerate(calls)]}, None))
        return events + [({}, self.tools.finish_reason(text, calls, finish_reason))]

    def _named(self, text, delta_text, finish_reason):
        events = []
        if not self.header_sent and (delta_text or finish_reason):
            call = ToolCall(self.tools.named.name, delta_text)
            events.append(({"tool_calls": [_call_delta(0, call)]}, None))
            self.header_sent = True
        elif delta_text:
            events.append(({"tool_calls": [{"index": 0, "function": {"arguments": delta_text}}]}, None))
        if finish_reason is not None:
            events.append(({}, self.tools.finish_reason(text, [ToolCall(self.tools.named.name, text)],
                                                          finish_reason)))
        return events
