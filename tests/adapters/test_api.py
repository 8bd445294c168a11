"""The local API over a base with two adapters (real HTTP, real model): ids in /v1/models, selection by a
request's model, concurrent requests on different adapters, unloading under a running stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from device.api import ApiServer, ApiSettings, ModelHolder, create_app
from device.engine import Engine
from manifests import TrustStore
from tests.conftest import free_port

pytestmark = pytest.mark.slow
PROMPT = "The misting pumps run for forty seconds"


@pytest.fixture
def api(engine_int8: Engine) -> Iterator[str]:
    app = create_app(ModelHolder(engine_int8), ApiSettings(port=free_port(), max_concurrency=3, max_queue=8))
    srv = ApiServer(app, port=app.state.service.settings.port).start()
    try:
        yield srv.url
    finally:
        srv.stop()


def _complete(url: str, model: str, n: int = 12, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _expected(engine: Engine, adapter: str | None, n: int = 12) -> str:
    return engine.decode(engine.greedy(engine.encode(PROMPT), n, adapter))


def test_models_lists_the_base_and_each_adapter(api: str, engine_int8: Engine) -> None:
    data = httpx.get(f"{api}/v1/models", timeout=30).json()["data"]
    base = engine_int8.name
    assert [m["id"] for m in data] == [base, f"{base}:all", f"{base}:qv"]
    assert all(m["parent"] == base and m["version"] == 1 for m in data[1:]) and "parent" not in data[0]


def test_a_request_selects_its_adapter_by_model_id(api: str, engine_int8: Engine) -> None:
    base = engine_int8.name
    texts = {}
    for model, adapter in ((base, None), (f"{base}:qv", "qv"), (f"{base}:all", "all")):
        r = _complete(api, model)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        texts[model] = r.json()["choices"][0]["text"]
        assert texts[model] == _expected(engine_int8, adapter)
    assert len(set(texts.values())) == 3  # three different models answering
    chat = httpx.post(f"{api}/v1/chat/completions", timeout=120, json={
        "model": f"{base}:qv", "messages": [{"role": "user", "content": "What does the amber light mean?"}],
        "max_tokens": 8, "temperature": 0})  # fmt: skip
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]


def test_concurrent_requests_on_different_adapters_each_get_their_own(api: str, engine_int8: Engine) -> None:
    base = engine_int8.name
    models = [base, f"{base}:qv", f"{base}:all"] * 2
    want = {m: _expected(engine_int8, m.partition(":")[2] or None, 24) for m in set(models)}
    with ThreadPoolExecutor(len(models)) as pool:
        got = list(pool.map(lambda m: _complete(api, m, 24), models))
    for model, r in zip(models, got, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want[model], model


def test_an_unknown_model_or_adapter_is_a_404_naming_what_exists(api: str, engine_int8: Engine) -> None:
    base = engine_int8.name
    for model in (f"{base}:nope", f"{base}:", "other:qv", "nope"):
        r = _complete(api, model)
        assert r.status_code == 404, (model, r.text)
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert f"'{base}:qv'" in err["message"] and f"'{base}:all'" in err["message"]


def test_unloading_an_adapter_does_not_drop_its_running_stream(
    api: str, engine_int8: Engine, qv_int8: tuple[Path, dict], trust: TrustStore
) -> None:
    base = engine_int8.name
    body = {"model": f"{base}:qv", "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    parts: list[str] = []
    try:
        with httpx.stream("POST", f"{api}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                parts.append(json.loads(line[6:])["choices"][0]["text"])
                if len(parts) == 3:
                    engine_int8.unload_adapter("qv")  # mid-stream
                    assert _complete(api, f"{base}:qv").status_code == 404
    finally:
        engine_int8.load_adapter(qv_int8[0], trust)
    assert "".join(parts) == _expected(engine_int8, "qv", 48)
