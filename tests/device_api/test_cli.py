"""The commands as real processes: `nanofleet device serve`, `nanofleet device chat`, `nanofleet bench`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import free_port, wait_port

pytestmark = pytest.mark.slow
NANOFLEET = [sys.executable, "-m", "nanofleet.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_serve_answers_the_openai_client_then_stops_on_sigterm(api_bundle) -> None:  # noqa: ANN001
    bundle, pub = api_bundle
    port = free_port()
    proc = subprocess.Popen(
        [
            *NANOFLEET,
            "device",
            "serve",
            "--bundle",
            str(bundle),
            "--pubkey",
            str(pub),
            "--port",
            str(port),
            "--threads",
            "2",
            "--api-key",
            "k",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, timeout=120)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=60).status_code == 200
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        model = c.models.list().data[0].id
        r = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out


def test_serve_refuses_a_bundle_signed_by_an_unknown_key(api_bundle, keypair) -> None:  # noqa: ANN001
    bundle, _ = api_bundle
    _key, _priv, other_pub = keypair
    p = subprocess.run(
        [*NANOFLEET, "device", "serve", "--bundle", str(bundle), "--pubkey", str(other_pub)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "unknown key" in " ".join(p.stderr.split())


def test_chat_streams_an_answer(api_bundle) -> None:  # noqa: ANN001
    bundle, _ = api_bundle
    p = subprocess.run(
        [*NANOFLEET, "device", "chat", "--bundle", str(bundle), "--temperature", "0", "--max-tokens", "12"],
        input="What is the capital of France?\n\n",
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr
    answer = p.stdout.split(">", 1)[-1].strip()
    assert len(answer) > 3, p.stdout


def test_bench_json_has_top_level_decode_tok_s(api_bundle) -> None:  # noqa: ANN001
    bundle, pub = api_bundle
    p = subprocess.run(
        [
            *NANOFLEET,
            "bench",
            str(bundle),
            "--pubkey",
            str(pub),
            "--prompt-tokens",
            "32",
            "--new-tokens",
            "8",
            "--runs",
            "1",
            "--threads",
            "2",
            "--json",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["decode_tok_s"] > 0 and res["ttft_ms"] > 0 and res["prefill_tok_s"] > 0
    assert res["prompt_tokens"] == 32 and res["new_tokens"] == 8
    assert res["peak_rss_mb"] > res["model_mb"] > 10


@pytest.mark.parametrize("cache_flags", [["--weights-cache", "{tmp}"], ["--no-weights-cache"]])
def test_bench_reports_where_the_weights_came_from(api_bundle, tmp_path: Path, cache_flags: list[str]) -> None:  # noqa: ANN001
    bundle, _pub = api_bundle
    flags = [f.format(tmp=tmp_path / "cache") for f in cache_flags]
    cmd = [*NANOFLEET, "bench", str(bundle), "--prompt-tokens", "16", "--new-tokens", "4", "--runs", "1", "--json"]
    runs = []
    for _ in range(2):  # with a cache: the first run builds the entry, the second only maps it
        p = subprocess.run([*cmd, *flags], env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        runs.append(json.loads(p.stdout)["weights"])
    cached = cache_flags[0] == "--weights-cache"
    assert runs == (["mapped", "mapped"] if cached else ["packed", "packed"])
    assert (tmp_path / "cache").exists() is cached


def test_bench_rejects_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    p = subprocess.run(
        [*NANOFLEET, "bench", str(tmp_path), "--json"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 1 and "neither a bundle" in " ".join(p.stderr.split())


def test_chat_with_a_json_schema_answers_json_that_validates(api_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    import jsonschema

    bundle, _ = api_bundle
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
    }
    (tmp_path / "s.json").write_text(json.dumps(schema))
    p = subprocess.run(
        [*NANOFLEET, "device", "chat", "--bundle", str(bundle), "--temperature", "0", "--max-tokens", "80",
         "--json-schema", str(tmp_path / "s.json")],
        input="What is the capital of France?\n\n",
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr
    answer = p.stdout.split(">", 1)[-1].strip().rstrip(">").strip()
    jsonschema.validate(json.loads(answer), schema)


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", ["is not JSON"]),
        ('{"type": "array", "uniqueItems": true}', ["uniqueItems"]),
        (None, ["cannot read"]),
    ],
)
def test_chat_refuses_a_bad_schema_file_in_one_line(api_bundle, tmp_path: Path, content, words) -> None:  # noqa: ANN001
    bundle, _ = api_bundle
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    p = subprocess.run(
        [*NANOFLEET, "device", "chat", "--bundle", str(bundle), "--json-schema", str(path)],
        input="\n", env=ENV, capture_output=True, text=True, timeout=120,
    )
    err = " ".join(p.stderr.split())
    assert p.returncode == 1 and all(w in err for w in words), p.stderr
    assert "Traceback" not in p.stderr
