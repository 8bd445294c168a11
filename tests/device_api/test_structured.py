"""response_format, tools and logprobs with the official openai client against a real server over the real
default bundle, streaming and not; the 400 cases; a property test over generated schemas."""

from __future__ import annotations

import json
import math
from enum import Enum

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from device.api import tools as toolcalls
from device.engine import Engine, EngineOptions, SamplingParams
from device.engine.constraints import Grammar, GrammarConstraint

pytestmark = pytest.mark.slow

PERSON = [{"role": "user", "content": "Describe a fictional person as JSON: name, age and city."}]
WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
}


def client(srv) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class Color(str, Enum):
    red = "red"
    green = "green"


class Pet(BaseModel):
    name: str = Field(max_length=30)
    legs: int = Field(ge=0, le=8)
    color: Color


class Household(BaseModel):
    city: str = Field(max_length=30)
    pets: list[Pet] = Field(max_length=3)


def test_parse_with_a_pydantic_model_both_client_entry_points(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    msgs = [{"role": "user", "content": "Describe a household with its pets."}]
    for parse in (c.chat.completions.parse, c.beta.chat.completions.parse):
        r = parse(model=engine.name, messages=msgs, response_format=Household, temperature=0, max_tokens=200)
        assert r.choices[0].finish_reason == "stop"
        got = r.choices[0].message.parsed
        assert isinstance(got, Household), r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), Household.model_json_schema())


def test_json_schema_stream_equals_non_stream_and_validates(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    full = c.chat.completions.create(model=engine.name, messages=PERSON, response_format=fmt, temperature=0,
                                     max_tokens=120)
    jsonschema.validate(json.loads(full.choices[0].message.content), PERSON_SCHEMA)
    chunks = list(c.chat.completions.create(model=engine.name, messages=PERSON, response_format=fmt,
                                            temperature=0, max_tokens=120, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    # unconstrained, the model writes prose or a fenced block, not bare JSON: the grammar did this
    free = c.chat.completions.create(model=engine.name, messages=PERSON, temperature=0, max_tokens=120)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


def test_json_object_and_completions_response_format(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    r = c.chat.completions.create(model=engine.name, messages=PERSON, response_format={"type": "json_object"},
                                  temperature=0, max_tokens=150)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    body = {"prompt": "A person, as JSON:", "max_tokens": 120, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}}
    r2 = httpx.post(srv.url + "/v1/completions", json=body, timeout=120).json()
    jsonschema.validate(json.loads(r2["choices"][0]["text"]), PERSON_SCHEMA)


def test_sampling_under_a_schema_is_seeded_and_honours_stop(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    kw = dict(model=engine.name, messages=PERSON, response_format=fmt, temperature=1.0, top_p=0.9, max_tokens=120)
    a, b = (c.chat.completions.create(**kw, seed=11).choices[0].message.content for _ in range(2))
    assert a == b
    others = {c.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3, 4)}
    assert len(others | {a}) > 1  # temperature still samples
    for text in others:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    cut = c.chat.completions.create(**kw, seed=11, stop=['"age"'])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == a[: a.index('"age"')]


def test_tool_call_required_streaming_and_not(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    kw = dict(model=engine.name, messages=WEATHER, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
              parallel_tool_calls=False, temperature=0, max_tokens=80)
    r = c.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    # streaming: the deltas add up to the same call
    chunks = list(c.chat.completions.create(**kw, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "tool_calls"
    ]
    # a named tool_choice forces that tool
    named = c.chat.completions.create(**{**kw, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert [t.function.name for t in named.choices[0].message.tool_calls] == ["get_time"]
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == {}


def test_tool_call_round_trip_and_none(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    history = [
        *WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    r = c.chat.completions.create(model=engine.name, messages=history, tools=[WEATHER_TOOL], tool_choice="none",
                                  temperature=0, max_tokens=40)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    # auto: either an answer or calls, and any call validates
    r = c.chat.completions.create(model=engine.name, messages=WEATHER, tools=[WEATHER_TOOL], temperature=0,
                                  max_tokens=80)
    msg = r.choices[0].message
    if msg.tool_calls:
        assert r.choices[0].finish_reason in ("tool_calls", "length")
    else:
        assert msg.content and not msg.content.startswith("<tool_call>")


QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Return each call as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{%- elif m.tool_calls %}<|im_start|>assistant\n{%- for tc in m.tool_calls %}"
    "<tool_call>\n{{ {'name': tc.function.name, 'arguments': tc.function.arguments} | tojson }}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_template_that_knows_tools_renders_them(serve, engine: Engine) -> None:  # noqa: ANN001
    native = Engine.from_parts(engine.model_path.parent, engine.arch, engine.graph,
                               EngineOptions(threads=2, spin_wait=False), chat_template=QWEN_STYLE_TEMPLATE)
    try:
        assert toolcalls.native_tools(native) and not toolcalls.native_tools(engine)
        prompt = native.render_chat(WEATHER, tools=[WEATHER_TOOL])
        assert "<tools>" in prompt and '"get_weather"' in prompt
        from device.api import ModelHolder

        srv, _ = serve(holder=ModelHolder(native), model_aliases=(engine.name,))
        r = client(srv).chat.completions.create(model=native.name, messages=WEATHER, tools=[WEATHER_TOOL],
                                                tool_choice="required", parallel_tool_calls=False,
                                                temperature=0, max_tokens=80)
        (call,) = r.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    finally:
        native.close()


def test_chat_logprobs_streaming_and_not(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    kw = dict(model=engine.name, messages=PERSON, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy: the chosen one is the top one
        assert bytes(t.bytes).decode(errors="replace") == t.token
    chunks = list(c.chat.completions.create(**kw, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    plain = c.chat.completions.create(model=engine.name, messages=PERSON, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_match_the_models_distribution(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    prompt = "The capital of France is"
    r = c.completions.create(model=engine.name, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    # the first token's logprob is the log-softmax of the prompt's last logits, computed here directly
    state = engine.new_state(64)
    logits = engine.prefill(state, __import__("numpy").asarray(engine.encode(prompt)))
    x = logits.astype("float64")
    ref = float(x.max() + math.log(float(__import__("numpy").exp(x - x.max()).sum())))
    first = engine.greedy(engine.encode(prompt), 1)[0]
    assert lp.token_logprobs[0] == pytest.approx(float(x[first]) - ref, abs=1e-4)
    assert list(lp.top_logprobs[0].values())[0] == pytest.approx(lp.token_logprobs[0], abs=1e-6)
    stream = list(c.completions.create(model=engine.name, prompt=prompt, max_tokens=3, temperature=0,
                                       logprobs=2, stream=True))
    got = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert got == lp.tokens


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/v1/completions", {"prompt": "Hi", "seed": -1}, "seed", ["greater than or equal to 0"]),
        ("/v1/completions", {"prompt": [1, 2**70]}, "prompt", ["out of range"]),
        ("/v1/chat/completions", {"messages": PERSON, "seed": 2**64}, "seed", ["less than or equal"]),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2**70}, "max_tokens", []),
        ("/v1/chat/completions", {"messages": PERSON, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format.json_schema.schema", ["uniqueItems"]),
        ("/v1/chat/completions", {"messages": PERSON, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "if": {}, "then": {}, "not": {}}}}},
         "response_format.json_schema.schema", ["if", "then", "not"]),
        ("/v1/chat/completions", {"messages": PERSON, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "dependentRequired": {"a": ["b"]}}}}]},
         "tools", ["dependentRequired"]),
        ("/v1/chat/completions", {"messages": PERSON, "top_logprobs": 3}, None, ["top_logprobs"]),
        ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 1}, "echo", ["echo"]),
    ],
)
def test_bad_structured_requests_are_400_with_a_reason(server, path, body, param, words) -> None:  # noqa: ANN001
    srv, holder = server
    r = httpx.post(srv.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param or (param and (err["param"] or "").startswith(param)), err
    assert all(w in err["message"] for w in words), err
    assert holder.stats.snapshot()["in_flight"] == 0


def test_a_constrained_stream_is_cancelled_by_a_disconnect(server) -> None:  # noqa: ANN001
    srv, holder = server
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    body = {"messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 2000,
            "stream": True, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        got = 0
        for line in resp.iter_lines():
            if '"content"' in line:
                got += 1
                if got >= 6:
                    break
    import time

    deadline = time.monotonic() + 30
    while holder.in_flight() or holder.stats.snapshot()["in_flight"]:
        assert time.monotonic() < deadline, "generation did not stop"
        time.sleep(0.05)
    assert holder.stats.snapshot()["tokens_out"] < 300


# ------------------------------------------------------------------------------------------ property test

NAMES = st.sampled_from(["id", "name", "count", "price", "tags", "kind", "ok", "note", "size", "items"])


def leaf() -> st.SearchStrategy[dict]:
    return st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 16)),
        st.builds(lambda a, w: {"type": "integer", "minimum": a, "maximum": a + w},
                  st.integers(-1000, 1000), st.integers(0, 5000)),
        st.builds(lambda a, m: {"type": "number", "minimum": a, "maximum": a + 100, "multipleOf": m},
                  st.integers(-100, 100), st.sampled_from([0.01, 0.5, 1])),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(lambda vs: {"enum": vs}, st.lists(st.sampled_from(["red", "green", 3, None, True]),
                                                     min_size=1, max_size=4, unique=True)),
        st.builds(lambda v: {"const": v}, st.sampled_from(["x", 1, False])),
        st.builds(lambda p: {"type": "string", "pattern": p},
                  st.sampled_from(["^[a-z]{2,5}$", "^[A-Z][0-9]{3}$", "^(yes|no)$"])),
        st.builds(lambda f: {"type": "string", "format": f}, st.sampled_from(["date", "uuid"])),
    )


def schemas() -> st.SearchStrategy[dict]:
    def objects(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
        def build(props: dict, k: int) -> dict:
            names = list(props)
            return {"type": "object", "properties": props, "required": names[:k]}

        return st.builds(build, st.dictionaries(NAMES, children, min_size=1, max_size=4), st.integers(0, 4))

    def arrays(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
        return st.builds(lambda i, lo, w: {"type": "array", "items": i, "minItems": lo, "maxItems": lo + w},
                         children, st.integers(0, 2), st.integers(0, 2))

    def unions(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
        return st.builds(lambda xs: {"anyOf": xs}, st.lists(children, min_size=2, max_size=3))

    nested = st.recursive(leaf(), lambda ch: st.one_of(objects(ch), arrays(ch), unions(ch)), max_leaves=8)
    return st.one_of(objects(nested), nested)


def worst_tokens(schema: dict) -> int:
    """An upper bound on the tokens an instance of ``schema`` takes (one token per character at worst)."""
    if "anyOf" in schema:
        return max(worst_tokens(s) for s in schema["anyOf"])
    if "enum" in schema or "const" in schema:
        return 8
    kind = schema.get("type")
    if kind == "object":
        return 2 + sum(4 + len(k) + worst_tokens(v) for k, v in schema["properties"].items())
    if kind == "array":
        return 2 + schema["maxItems"] * (2 + worst_tokens(schema["items"]))
    if kind == "string":
        return 2 + schema.get("maxLength", {"uuid": 36, "date": 10}.get(schema.get("format", ""), 12))
    return 12  # numbers, booleans, null


@settings(
    max_examples=12,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(schema=schemas(), seed=st.integers(0, 2**32), temperature=st.sampled_from([0.0, 0.8]))
def test_every_completion_of_a_generated_schema_validates(engine: Engine, schema: dict, seed: int,
                                                          temperature: float) -> None:
    """The supported subset, with sizes bounded so that the model can finish within max_tokens: strings
    (maxLength, bounded patterns, date and uuid formats: an email has no bound), arrays (maxItems), numbers
    (range, and multipleOf, which bounds the decimals: an unbounded fraction, or date-time's fractional
    seconds, lets this small model repeat a digit until max_tokens). Every completion ends by itself and
    validates."""
    assume(worst_tokens(schema) <= 350)  # bounded schemas that can still be too large for max_tokens
    msgs = [{"role": "user", "content": f"Reply with JSON matching this schema: {json.dumps(schema)}"}]
    grammar = Grammar.json_schema(schema)
    params = SamplingParams(max_new_tokens=400, temperature=temperature, seed=seed)
    events = list(engine.stream_text(engine.encode_chat(msgs), params, constraint=GrammarConstraint(engine, grammar)))
    text = "".join(ev.text for ev in events)
    assert events[-1].finish_reason == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema)
