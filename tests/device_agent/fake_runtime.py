"""A fake model runtime for the agent's tests (never used in production).

A fake bundle's ``model.onnx`` is JSON: {"answer": [token ids], "nan": false, "sleep_ms": 0}. The fake
model's greedy output is ``answer`` (cut or padded to the length asked), so a manifest whose golden
``expected_token_ids`` differ from it fails the health check. ``factory(config)`` is the plug-in entry
used by real agent processes (config ``runtime: tests.device_agent.fake_runtime:factory``); it serves
GET /model on the config's API port with what is in service, so a test can ask the process itself.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from device.agent.runtime import ServingInfo
from manifests import BundleManifest


class FakeModel:
    def __init__(self, path: Path, manifest: BundleManifest) -> None:
        doc = json.loads((path / "model.onnx").read_text())
        self.answer: list[int] = list(doc.get("answer", []))
        self.nan = bool(doc.get("nan", False))
        self.sleep_ms = float(doc.get("sleep_ms", 0))
        self.ref = manifest.ref
        self.closed = False

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        time.sleep(self.sleep_ms / 1000)
        return (self.answer + [0] * max_new_tokens)[:max_new_tokens]

    def perplexity(self, token_ids: Sequence[int]) -> float:
        return float("nan") if self.nan else 12.5

    def close(self) -> None:
        self.closed = True


class FakeRuntime:
    def __init__(self, port: int | None = None, bind: str = "127.0.0.1") -> None:
        self.port = port
        self.bind = bind
        self.model: FakeModel | None = None
        self.info: ServingInfo | None = None
        self.loads: list[str] = []
        self.served: list[ServingInfo] = []
        self.fail_load = False
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        if self.port is None:
            return
        runtime = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                info = runtime.info
                body = json.dumps(info.__dict__ if info else None).encode()
                self.send_response(200 if info else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> FakeModel:
        if self.fail_load:
            raise RuntimeError("fake load failure")
        self.loads.append(manifest.ref)
        return FakeModel(bundle_dir, manifest)

    def serve(self, model: FakeModel, info: ServingInfo) -> None:  # type: ignore[override]
        previous, self.model, self.info = self.model, model, info
        self.served.append(info)
        if previous is not None and previous is not model:
            previous.close()

    def serving(self) -> ServingInfo | None:
        return self.info

    def stats(self) -> dict[str, Any]:
        return {
            "decode_tok_s": 42.0,
            "ttft_p50_ms": 10.0,
            "ttft_p95_ms": 20.0,
            "requests": 3,
            "errors": 0,
            "queue_depth": 0,
        }

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def factory(config: Any) -> FakeRuntime:
    return FakeRuntime(port=config.api.port, bind=config.api.bind)
