"""Tool calling (issue #11 item 4): the hermes and llama3_json parsers, streaming hold-back, the
tools' grammars, and end to end on the real model through the official openai client: tool_choice
"required" and a named function give tool_calls whose arguments validate against the schema
(streaming and not), "none" gives text, tool results go back through the template, bad tools are
400s naming `tools`, and a `tidal batch` line means what the same HTTP body means."""
import json

import httpx
import jsonschema
import openai
import pytest

from server_fixtures import MODEL, server  # noqa: F401 (fixture)
from tidal.errors import TidalError
from tidal.server.serving_tools import ChatTools
from tidal.structured.tool_parsers import HermesParser, Llama3JsonParser, get_parser
from tidal.structured.tools import calls_from_required, check_tools, tool_spec

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- parsers (no model) ------------------------------------------------------------------------

def test_hermes_parser_reads_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    content, calls = HermesParser().parse(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "C"}
    assert json.loads(calls[1].arguments) == {"a": 1, "b": 2}   # arguments given as JSON text
    content, calls = HermesParser().parse('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert content is None and calls[0].name == "add"   # an unclosed last tag still counts


def test_llama3_json_parser_reads_calls():
    content, calls = Llama3JsonParser().parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                                              '{"name": "get_weather", "arguments": {"city": "Rome"}}')
    assert content is None and [c.name for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0].arguments) == {"a": 1, "b": 2} and json.loads(calls[1].arguments) == {"city": "Rome"}
    assert Llama3JsonParser().parse(' {"name": "f", "parameters": {}}')[1][0].arguments == "{}"


@pytest.mark.parametrize("parser,text", [
    (HermesParser(), "The weather in Paris is mild."),
    (Llama3JsonParser(), "The weather in Paris is mild."),
    (HermesParser(), '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>'),   # malformed JSON
    (HermesParser(), '<tool_call>{"arguments": {"a": 1}}</tool_call>'),                 # no name
    (HermesParser(), '<tool_call>{"name": "add", "arguments": [1]}</tool_call>'),        # arguments not an object
    (Llama3JsonParser(), '{"name": "add", "parameters": {"a": 1}'),                       # cut short
    (Llama3JsonParser(), '{"name": "add", "parameters": {}} and some words'),
    (Llama3JsonParser(), 'Here: {"name": "add", "parameters": {}}'),                       # not at the start
])
def test_text_without_a_valid_call_is_plain_content(parser, text):
    assert parser.parse(text) == (text, [])


def test_get_parser_picks_by_template():
    assert get_parser("auto", "{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert get_parser("auto", "{{ '<|python_tag|>' }} ipython").name == "llama3_json"
    assert get_parser("auto", "{{ message['content'] }}").name == "hermes"
    assert get_parser("auto", None).name == "hermes"
    assert get_parser("llama3_json").name == "llama3_json"
    with pytest.raises(ValueError):
        get_parser("mistral")


def _stream_events(tools: ChatTools, pieces: list[str], finish: str = "stop"):
    state, text, events = tools.stream(), "", []
    for k, piece in enumerate(pieces):
        text += piece
        events += state.feed(text, piece, finish if k == len(pieces) - 1 else None)
    return events


def test_auto_stream_holds_back_a_tool_call_and_sends_it_whole():
    tools = ChatTools(TOOLS, "auto", HermesParser())
    pieces = ["Sure", ". <", "tool", "_call>", '{"name": "add", ', '"arguments": {"a": 1, "b": 2}}', "</tool_call>"]
    events = _stream_events(tools, pieces)
    content = "".join(d.get("content", "") for d, _ in events)
    assert content == "Sure." and "<" not in content
    calls = [c for d, _ in events for c in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "add" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert events[-1] == ({}, "tool_calls")
    # A "<" that turns out not to start a call is released; a malformed call comes out as text.
    events = _stream_events(tools, ["a <", "b", " <tool_call>{bad json"], "length")
    assert "".join(d.get("content", "") for d, _ in events) == "a <b <tool_call>{bad json"
    assert events[-1][1] == "length" and not any("tool_calls" in d for d, _ in events)


def test_auto_stream_llama3_holds_a_leading_json_call():
    tools = ChatTools(TOOLS, "auto", Llama3JsonParser())
    events = _stream_events(tools, ["<|python", '_tag|>{"name": "add", ', '"parameters": {"a": 3, "b": 4}}'])
    assert not any(d.get("content") for d, _ in events)
    assert events[-2][0]["tool_calls"][0]["function"]["name"] == "add" and events[-1] == ({}, "tool_calls")
    events = _stream_events(tools, ["Hello", " there"])
    assert [d.get("content") for d, _ in events] == ["Hello", " there"] and events[-1][1] == "stop"


# ---- tools, tool_choice and their grammars (no model) ------------------------------------------

@pytest.mark.parametrize("tools,choice,param", [
    ("get_weather", None, "tools"),
    ([], None, "tools"),
    ([{"type": "retrieval"}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], None, "tools"),
    ([{"type": "function", "function": {"name": ""}}], None, "tools"),
    (TOOLS + TOOLS[:1], None, "tools"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_and_tool_choice_name_the_param(tools, choice, param):
    with pytest.raises(TidalError) as e:
        ChatTools(tools, choice, HermesParser())
    assert e.value.param == param


def test_required_grammar_hoists_defs_and_reads_back():
    ref = {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}}, "required": ["p"],
           "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    fns = check_tools([{"type": "function", "function": {"name": "draw", "parameters": ref}}] + TOOLS)
    schema = tool_spec("required", fns).json
    assert "point" in schema["$defs"]
    good = [{"name": "draw", "parameters": {"p": {"x": 1}}}, {"name": "add", "parameters": {"a": 1, "b": 2}}]
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "parameters": {"a": "one", "b": 2}}], schema)
    calls = calls_from_required(json.dumps(good))
    assert [c.name for c in calls] == ["draw", "add"] and json.loads(calls[1].arguments) == {"a": 1, "b": 2}
    assert calls_from_required('[{"name": "add", "parameters": {"a"') is None
    assert tool_spec("required", fns, parallel=False).json["maxItems"] == 1
    assert tool_spec("auto", fns) is None and tool_spec("named", fns, fns[1]).json == WEATHER


def test_template_without_tools_gets_a_system_prompt_and_tool_call_text():
    tools = ChatTools(TOOLS, "auto", HermesParser())
    history = [{"role": "user", "content": "Add 1 and 2"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    messages, template_tools = tools.template_inputs(history, "{{ message['content'] }}")
    assert template_tools is None and messages[0]["role"] == "system" and '"name":"add"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert "tool_calls" not in messages[2] and messages[3] == history[2]
    messages, template_tools = tools.template_inputs(history, "{% for t in tools %}{{ t }}{% endfor %}")
    assert messages == history and [t["function"]["name"] for t in template_tools] == ["get_weather", "add"]
    none = ChatTools(TOOLS, "none", HermesParser())
    assert none.template_inputs(history[:1], "{{ x }}")[0] == history[:1]   # none: no tools prompt


# ---- end to end on the real model --------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _check_calls(tool_calls, names):
    assert tool_calls and all(c.type == "function" and c.id.startswith("call_") for c in tool_calls)
    for c in tool_calls:
        assert c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _collect_stream(stream):
    """Streamed chunks -> (content, tool calls as {index: [id, name, arguments]}, finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or ():
                entry = calls.setdefault(d.index, [d.id, d.function.name, ""])
                entry[2] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "add"}),
    ({"type": "function", "function": {"name": "add"}}, {"add"}),
])
def test_required_and_named_give_valid_tool_calls(client, choice, names):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0,
              parallel_tool_calls=False)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    _check_calls(c.message.tool_calls, names)
    content, calls, finish = _collect_stream(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == "" and len(calls) == len(c.message.tool_calls)
    for (cid, name, args), want in zip(calls.values(), c.message.tool_calls):
        assert cid.startswith("call_") and name == want.function.name
        assert json.loads(args) == json.loads(want.function.arguments)   # greedy: the same call both ways


def test_named_function_at_temperature_validates(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=1.0,
                                           seed=seed, tool_choice={"type": "function",
                                                                   "function": {"name": "get_weather"}})
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message.tool_calls, {"get_weather"})


def test_none_gives_plain_content_and_leaves_the_prompt_alone(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       temperature=0)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.message.content == plain.choices[0].message.content
    assert c.finish_reason in ("stop", "length") and r.usage.prompt_tokens == plain.usage.prompt_tokens


def test_auto_stream_and_non_stream_agree(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=24, temperature=0)
    r = client.chat.completions.create(**kw)   # tool_choice defaults to auto
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 40   # the tools went into the prompt
    content, calls, finish = _collect_stream(client.chat.completions.create(**kw, stream=True))
    c = r.choices[0]
    if c.message.tool_calls:
        assert finish == "tool_calls" and [v[1] for v in calls.values()] == [t.function.name for t in c.message.tool_calls]
    else:
        assert content == c.message.content and finish == c.finish_reason and not calls


def test_tool_results_go_back_through_the_template(client, server):  # noqa: F811
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    convo = [{"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model=MODEL, messages=convo, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bare = [convo[0], {"role": "assistant", "content": ""}, convo[2]]
    r2 = client.chat.completions.create(model=MODEL, messages=bare, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > r2.usage.prompt_tokens + 10   # the earlier call is in the prompt
    bad = [convo[0], {"role": "assistant", "tool_calls": [{**call, "function": {"name": "add", "arguments": "{x"}}]}]
    resp = httpx.post(server.url + "/v1/chat/completions", json={"messages": bad, "max_tokens": 4}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"


@pytest.mark.parametrize("body,param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tools_are_400s_naming_the_param(server, body, param):  # noqa: F811
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_batch_line_means_what_the_http_body_means(tmp_path):
    import torch

    from tidal.batch import process
    from tidal.config import EngineConfig
    from tidal.engine.llm_engine import LLMEngine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LLMEngine(EngineConfig.from_kwargs(model="smollm2", dtype="float32", device="cpu", num_kv_blocks=64,
                                                    max_num_seqs=4))
        body = {"messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0, "parallel_tool_calls": False}
        lines = [{"custom_id": "named", "body": {**body, "tool_choice": {"type": "function",
                                                                          "function": {"name": "add"}}}},
                 {"custom_id": "required", "body": {**body, "tool_choice": "required"}},
                 {"custom_id": "bad", "body": {**body, "tools": [{"type": "function", "function": {"name": 3}}]}}]
        (tmp_path / "in.jsonl").write_text("".join(json.dumps({**x, "method": "POST", "url": "/v1/chat/completions"})
                                                   + "\n" for x in lines))
        process(engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), progress=False)
    finally:
        torch.set_num_threads(threads)
    recs = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert recs["bad"]["error"]["param"] == "tools"
    for cid, names in (("named", {"add"}), ("required", {"get_weather", "add"})):
        choice = recs[cid]["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        for call in choice["message"]["tool_calls"]:
            assert call["function"]["name"] in names
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
