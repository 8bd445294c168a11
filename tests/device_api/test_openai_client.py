"""The official openai client against a real running server, streaming and not."""

from __future__ import annotations

import httpx
import openai
import pytest

from device.engine import Engine, SamplingParams

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(srv) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_non_stream_is_the_engines_greedy_answer(server, engine: Engine) -> None:  # noqa: ANN001
    srv, holder = server
    r = client(srv).chat.completions.create(
        model=engine.name, messages=QUESTION, temperature=0, max_tokens=24
    )
    expected = engine.complete(engine.encode_chat(QUESTION), SamplingParams(max_new_tokens=24, temperature=0))
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(engine.encode_chat(QUESTION))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.object == "chat.completion" and r.model == engine.name
    snap = holder.stats.snapshot()
    assert snap["requests"] == 1 and snap["errors"] == 0 and snap["ttft_p50_ms"] > 0


def test_chat_stream_matches_non_stream_and_ends_with_done(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    full = c.chat.completions.create(model=engine.name, messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(
        c.chat.completions.create(
            model=engine.name,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the raw wire format ends with [DONE]
    with httpx.stream(
        "POST",
        srv.url + "/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_completions_and_models(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    assert [m.id for m in c.models.list().data] == [engine.name]
    # Which version of the bundle serves (the id stays the bundle's name across updates).
    (listed,) = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"]
    assert listed["version"] == engine.manifest.version and listed["bundle"] == engine.manifest.ref
    r = c.completions.create(
        model=engine.name, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    ids = engine.encode("The capital of France is")
    assert r.choices[0].text == engine.decode(engine.greedy(ids, 8))
    assert r.choices[0].finish_reason == "length"
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=engine.name, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
        if ch.choices
    )
    assert streamed == r.choices[0].text


def test_stop_sequence_and_seed(server, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = server
    c = client(srv)
    full = c.completions.create(model=engine.name, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert " 6" in text, text
    cut = c.completions.create(
        model=engine.name, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"]
    )
    assert cut.choices[0].text == text[: text.index(" 6")]
    assert cut.choices[0].finish_reason == "stop"
    a, b = (
        c.completions.create(
            model=engine.name, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7
        )
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text


def test_bearer_token(serve, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = serve(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError):
        client(srv).models.list()
    ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
    assert ok.models.list().data[0].id == engine.name
    assert httpx.get(srv.url + "/healthz").status_code == 200
