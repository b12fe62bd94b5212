"""Structured output through the HTTP server (issue #11): `response_format` json_object / json_schema
and vLLM's guided_* / structured_outputs fields are enforced by a grammar, so the output always parses
and validates; a bad schema or regex is a 400 naming the field; a cut mid-object says "length"."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from server_fixtures import server  # noqa: F401 (fixture)

S = {"type": "string", "maxLength": 12}


def _obj(props: dict, required=None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


def schemas() -> list[dict]:
    """50 varied schemas: nested objects, bounded arrays, enums, integer and number bounds, optional
    fields, anyOf, string patterns (strings bounded so every output fits the test context)."""
    out = []
    for i in range(10):
        out.append(_obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120 + i}}))
        out.append(_obj({"tags": {"type": "array", "items": S, "minItems": 1 + i % 3, "maxItems": 3 + i % 3}}))
        out.append(_obj({"color": {"enum": ["red", "green", "blue", f"c{i}"]},
                         "score": {"type": "number", "minimum": -1, "maximum": 1},
                         "note": S}, required=["color", "score"]))
        out.append(_obj({"user": _obj({"id": {"type": "integer", "minimum": i, "maximum": 999},
                                       "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
                         "active": {"type": "boolean"}}))
        out.append(_obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, S]},
                         "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,3}$"},
                         "items": {"type": "array", "items": _obj({"k": S, "v": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}}),
                                   "maxItems": 2}}))
    return out


def _chat(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fifty_json_schemas_always_validate(server, temperature):  # noqa: F811
    def one(i_schema):
        i, schema = i_schema
        body = {"messages": [{"role": "user", "content": f"Give example #{i} as JSON."}], "max_tokens": 160,
                "temperature": temperature, "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                            "strict": True}}}
        r = _chat(server.url, body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return schema, choice["message"]["content"], choice["finish_reason"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, enumerate(schemas())))
    bad = []
    for schema, text, reason in results:
        try:
            assert reason == "stop", reason
            jsonschema.validate(json.loads(text), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            bad.append((text, str(e)[:120]))
    assert not bad, f"{len(bad)} of {len(results)} outputs invalid, e.g. {bad[:3]}"


def test_json_object_regex_choice_and_grammar(server):  # noqa: F811
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    msg = [{"role": "user", "content": "Describe a cat."}]
    r = client.chat.completions.create(model="smollm2", messages=msg, max_tokens=120, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model="smollm2", messages=msg, max_tokens=20, temperature=0.8, seed=3,
                                       extra_body={"guided_regex": "[a-z]{3,6}-[0-9]{2}"})
    import re
    assert re.fullmatch("[a-z]{3,6}-[0-9]{2}", r.choices[0].message.content)
    r = client.completions.create(model="smollm2", prompt="The best pet is", max_tokens=8, temperature=0.8, seed=1,
                                  extra_body={"guided_choice": ["cat", "dog", "fish"]})
    assert r.choices[0].text in ("cat", "dog", "fish")
    r = client.completions.create(model="smollm2", prompt="Answer:", max_tokens=8, temperature=0,
                                  extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}})
    assert r.choices[0].text in ("yes", "no")
    # streaming deltas concatenate to valid JSON too
    stream = client.chat.completions.create(model="smollm2", messages=msg, max_tokens=120, temperature=0, stream=True,
                                            response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_bad_specs_are_400_naming_the_field(server):  # noqa: F811
    msg = [{"role": "user", "content": "hi"}]
    cases = [({"guided_regex": "a(b"}, "guided_regex"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                          "schema": {"type": "nonsense"}}}},
              "response_format"),
             ({"guided_choice": ["a"], "guided_regex": "a"}, None),
             ({"response_format": {"type": "yaml"}}, None)]
    for extra, param in cases:
        r = _chat(server.url, {"messages": msg, "max_tokens": 4, **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["type"] == "BadRequestError" or err["code"] == 400 or "invalid" in err["type"].lower(), err
        if param:
            assert err.get("param") == param or param in err["message"], err


def test_cut_mid_object_says_length(server):  # noqa: F811
    schema = _obj({"story": {"type": "string", "minLength": 200}})
    r = _chat(server.url, {"messages": [{"role": "user", "content": "Tell a story as JSON."}], "max_tokens": 5,
                           "temperature": 0, "response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "s", "schema": schema}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])
