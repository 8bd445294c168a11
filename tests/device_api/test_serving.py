"""Errors, queueing, cancellation, hot swap and memory of the real server."""

from __future__ import annotations

import gc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from device.api import ModelHolder
from device.engine import Engine, EngineOptions

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def wait_for(cond, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"messages": MSG, "temperature": 2.5}, "temperature"),
        ({"messages": MSG, "temperature": -0.1}, "temperature"),
        ({"messages": MSG, "top_p": 0}, "top_p"),
        ({"messages": MSG, "n": 3}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({}, "messages"),
    ],
)
def test_bad_params_are_400(server, body, param) -> None:  # noqa: ANN001
    srv, holder = server
    err = assert_openai_error(httpx.post(srv.url + CHAT, json=body), 400)
    assert err["param"].startswith(param)
    assert holder.stats.snapshot()["errors"] == 1


def test_bad_json_unknown_model_and_oversized_body(serve, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = serve(max_body_bytes=4096)
    r = httpx.post(srv.url + CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_json")
    assert_openai_error(
        httpx.post(srv.url + CHAT, json={"model": "gpt-9", "messages": MSG}), 404, "model_not_found"
    )
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_openai_error(httpx.post(srv.url + CHAT, json=big), 413, "body_too_large")
    # a chunked body without Content-Length is counted as it arrives
    chunks = (json.dumps(big).encode()[i : i + 1000] for i in range(0, 10_100, 1000))
    assert_openai_error(httpx.post(srv.url + CHAT, content=chunks), 413, "body_too_large")


def test_prompt_longer_than_context_is_400(server, engine: Engine) -> None:  # noqa: ANN001
    srv, holder = server
    long_text = "hello " * (engine.context_length + 50)
    err = assert_openai_error(
        httpx.post(srv.url + "/v1/completions", json={"prompt": long_text, "max_tokens": 1}, timeout=60),
        400,
        "context_length_exceeded",
    )
    assert str(engine.context_length) in err["message"]
    # prompt fits but prompt + max_tokens does not
    ids = list(range(100, 100 + engine.context_length - 5))
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": ids, "max_tokens": 10}, timeout=60)
    assert_openai_error(r, 400, "context_length_exceeded")
    assert holder.stats.snapshot()["in_flight"] == 0 and holder.in_flight() == 0


def test_parallel_requests_complete_and_full_queue_is_429(serve) -> None:  # noqa: ANN001
    srv, holder = serve(max_concurrency=1, max_queue=2)
    body = {"prompt": "One, two, three,", "max_tokens": 6, "temperature": 0}

    def post(_: int) -> httpx.Response:
        return httpx.post(srv.url + "/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(3) as ex:  # 1 running + 2 queued: all fit
        results = list(ex.map(post, range(3)))
    assert [r.status_code for r in results] == [200, 200, 200]
    assert len({r.json()["choices"][0]["text"] for r in results}) == 1

    long = {"prompt": "One, two, three,", "max_tokens": 40, "ignore_eos": True}
    with ThreadPoolExecutor(8) as ex:
        results = list(
            ex.map(lambda _: httpx.post(srv.url + "/v1/completions", json=long, timeout=300), range(8))
        )
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 3 and codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}
    for r in results:
        if r.status_code == 429:
            assert_openai_error(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
    snap = holder.stats.snapshot()
    assert snap["rejected"] == codes.count(429) and snap["queue_depth"] == 0 and snap["in_flight"] == 0
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'nanofleet_requests_total{endpoint="/v1/completions",status="429"}' in metrics


def test_queue_full_can_answer_503(serve) -> None:  # noqa: ANN001
    srv, _ = serve(max_concurrency=1, max_queue=0, queue_full_status=503)
    long = {"prompt": "Hello", "max_tokens": 60, "ignore_eos": True}
    with ThreadPoolExecutor(3) as ex:
        results = list(
            ex.map(lambda _: httpx.post(srv.url + "/v1/completions", json=long, timeout=300), range(3))
        )
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes


def test_stream_disconnect_cancels_generation(server, engine: Engine) -> None:  # noqa: ANN001
    srv, holder = server
    body = {"messages": MSG, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + CHAT, json=body, timeout=60) as resp:
        got = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                got += 1
                if got >= 4:
                    break  # leaving the block closes the connection mid-stream
    wait_for(lambda: holder.in_flight() == 0 and holder.stats.snapshot()["in_flight"] == 0, 30)
    snap = holder.stats.snapshot()
    assert snap["tokens_out"] < 200, snap  # nowhere near 2000: generation stopped


def test_non_stream_disconnect_cancels_generation(server) -> None:  # noqa: ANN001
    srv, holder = server
    body = {"messages": MSG, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + CHAT, json=body, timeout=httpx.Timeout(2.0, connect=5.0))
    wait_for(lambda: holder.in_flight() == 0, 30)
    assert holder.stats.snapshot()["tokens_out"] < 300


def test_health_readiness_and_metrics(serve, engine: Engine) -> None:  # noqa: ANN001
    srv, _ = serve(holder=ModelHolder(None))
    assert httpx.get(srv.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(srv.url + "/readyz").status_code == 503
    assert_openai_error(httpx.post(srv.url + CHAT, json={"messages": MSG}), 503, "model_not_loaded")
    srv2, _ = serve()
    r = httpx.get(srv2.url + "/readyz", timeout=60)
    assert r.status_code == 200 and r.json()["model"] == engine.name
    httpx.post(srv2.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    text = httpx.get(srv2.url + "/metrics").text
    for name in (
        "nanofleet_requests_total",
        "nanofleet_prompt_tokens_total",
        "nanofleet_completion_tokens_total",
        "nanofleet_ttft_seconds_bucket",
        "nanofleet_decode_seconds_per_token_bucket",
        "nanofleet_queue_depth",
        "nanofleet_errors_total",
        "nanofleet_in_flight",
    ):
        assert name in text, name
    assert f'nanofleet_model_info{{name="{engine.name}",version="{engine.version}"}} 1.0' in text


def test_swap_drains_in_flight_stream_then_closes_old(serve, engine: Engine) -> None:  # noqa: ANN001
    fresh = Engine.from_bundle(engine.model_path.parent, None, EngineOptions(threads=2, spin_wait=False))
    holder = ModelHolder(fresh)
    srv, _ = serve(holder=holder, max_concurrency=2)
    body = {"messages": MSG, "max_tokens": 40, "ignore_eos": True, "stream": True}
    swapped = threading.Event()
    pieces: list[str] = []
    with httpx.stream("POST", srv.url + CHAT, json=body, timeout=120) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if '"content"' in line:
                break
        swapper = threading.Thread(target=lambda: (holder.swap(engine), swapped.set()))
        swapper.start()
        wait_for(lambda: holder.engine is engine, 10)
        # new requests already go to the new engine while the stream still runs on the old one
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        assert not swapped.is_set() and not fresh.closed
        pieces = [ln for ln in lines if ln]
    swapper.join(60)
    assert swapped.is_set() and fresh.closed and not engine.closed
    assert pieces[-1] == "data: [DONE]"
    finish = [json.loads(p[6:]) for p in pieces if p.startswith("data: {")][-1]
    assert finish["choices"][0]["finish_reason"] == "length"  # the stream ran to the end on the old engine
    assert holder.in_flight() == 0


def test_rss_does_not_grow_over_200_requests(server) -> None:  # noqa: ANN001
    srv, _ = server
    proc = psutil.Process()
    body = {"prompt": "Hi there", "max_tokens": 2, "temperature": 0.7, "seed": 1}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(30):  # warm up arenas and caches
            assert c.post("/v1/completions", json=body).status_code == 200
        gc.collect()
        before = proc.memory_info().rss
        for i in range(200):
            r = c.post(
                "/v1/chat/completions" if i % 2 else "/v1/completions",
                json=body if i % 2 == 0 else {"messages": MSG, "max_tokens": 2, "stream": i % 4 == 1},
            )
            assert r.status_code == 200
        gc.collect()
        after = proc.memory_info().rss
    assert after - before < 25 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 200 requests"
