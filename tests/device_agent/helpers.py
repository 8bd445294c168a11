"""Helpers for the agent tests: tiny signed bundles and a real HTTP artifact server with Range."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from manifests import (
    ArchConfig,
    BundleManifest,
    GoldenCheck,
    GraphSpec,
    Provenance,
    Recipe,
    Runtime,
    SigningKey,
    describe_file,
    sha256_file,
    write_signed_manifest,
)
from manifests.mqtt import BundleRef

GOLDEN_PROMPT = [1, 2, 3]


def make_bundle(
    root: Path,
    key: SigningKey,
    *,
    name: str = "tiny",
    version: int = 1,
    answer: list[int] | None = None,
    golden: list[int] | None = None,
    expires_in: dt.timedelta | None = dt.timedelta(days=30),
    pad_bytes: int = 4096,
    latency_budget_ms: float = 5000,
    extra_files: dict[str, bytes] | None = None,
    nan: bool = False,
) -> Path:
    """A signed fake bundle. ``answer`` is what the fake model says; ``golden`` what the manifest expects."""
    root.mkdir(parents=True, exist_ok=True)
    answer = answer if answer is not None else [version * 10 + i for i in range(4)]
    golden = golden if golden is not None else answer
    (root / "model.onnx").write_text(json.dumps({"answer": answer, "nan": nan, "version": version}))
    # Deterministic padding so downloads take several chunks and can be cut in the middle.
    pattern = bytes((i * 7 + version) % 256 for i in range(251))
    (root / "weights.bin").write_bytes((pattern * (pad_bytes // 251 + 1))[:pad_bytes])
    (root / "tokenizer.json").write_text("{}")
    files = [
        describe_file(root, "model.onnx", "model"),
        describe_file(root, "weights.bin", "data"),
        describe_file(root, "tokenizer.json", "tokenizer"),
    ]
    for rel, data in (extra_files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files.append(describe_file(root, rel, "data"))
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    manifest = BundleManifest(
        name=name,
        version=version,
        created_at=now - dt.timedelta(days=1),
        expires_at=(now + expires_in) if expires_in is not None else None,
        arch=ArchConfig(
            architecture="llama",
            num_layers=2,
            hidden_size=8,
            num_attention_heads=2,
            num_kv_heads=1,
            head_dim=4,
            vocab_size=100,
            context_length=64,
            eos_token_ids=[2],
            bos_token_id=1,
        ),
        graph=GraphSpec(kind="optimum-kv", input_names=["input_ids"], output_names=["logits"]),
        runtime=Runtime(target="arm64", min_onnxruntime="1.20", operators=["ai.onnx:MatMul"]),
        recipe=Recipe(precision="fp32", method="none"),
        files=files,
        golden=GoldenCheck(
            prompt_token_ids=GOLDEN_PROMPT, expected_token_ids=golden, latency_budget_ms=latency_budget_ms
        ),
        provenance=Provenance(source="test", source_kind="folder"),
    )
    write_signed_manifest(root, manifest, key)
    return root


def sign_raw_manifest(root: Path, key: SigningKey, manifest: BundleManifest, **overrides: Any) -> None:
    """Sign a manifest with fields pydantic would refuse (unsafe paths), to test the device's checks."""
    from manifests import atomic_write_bytes
    from manifests.bundle import MANIFEST_NAME, SIGNATURE_NAME

    data = manifest.model_dump(mode="json")
    data.update(overrides)
    import yaml

    body = yaml.safe_dump(data, sort_keys=False).encode()
    atomic_write_bytes(root / MANIFEST_NAME, body)
    atomic_write_bytes(root / SIGNATURE_NAME, key.sign(body).to_json().encode())


def ref_for(bundle: Path, base_url: str) -> BundleRef:
    from manifests import read_manifest_unverified

    m = read_manifest_unverified(bundle)
    return BundleRef(
        name=m.name,
        version=m.version,
        base_url=base_url,
        manifest_sha256=sha256_file(bundle / "manifest.yaml"),
    )


@dataclass
class ServedRequest:
    path: str
    range: str | None
    status: int
    bytes_sent: int


@dataclass
class ArtifactServer:
    """A real threaded HTTP server over a folder, with Range, a request log and fault injection."""

    root: Path
    port: int = 0
    log: list[ServedRequest] = field(default_factory=list)
    # path -> byte count: the first GET of that path sends only that many bytes, then drops the connection
    truncate_once: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    # path -> (bytes per second, n): the next n GETs of that path send their body at that rate
    throttle: dict[str, tuple[float, int]] = field(default_factory=dict)
    # path -> extra bytes: the body is the file plus that many more (Content-Length says so too)
    oversize: dict[str, int] = field(default_factory=dict)
    # paths whose GETs never end: the file, then junk forever (chunked, no Content-Length)
    endless: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                rel = self.path.lstrip("/")
                full = (server.root / rel).resolve()
                if not full.is_file() or not full.is_relative_to(server.root.resolve()):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    server.log.append(ServedRequest(rel, None, 404, 0))
                    return
                data = full.read_bytes()
                rng = self.headers.get("Range")
                start, status = 0, 200
                if rng and not server.ignore_range:
                    m = re.match(r"bytes=(\d+)-$", rng)
                    if m:
                        start, status = int(m.group(1)), 206
                        if start >= len(data):
                            self.send_response(416)
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            server.log.append(ServedRequest(rel, rng, 416, 0))
                            return
                if rel in server.endless:
                    self._endless(rel, rng, data[start:])
                    return
                body = data[start:] + b"\xee" * server.oversize.get(rel, 0)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.truncate_once.pop(rel, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    server.log.append(ServedRequest(rel, rng, status, cut))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                rate, left = server.throttle.get(rel, (0.0, 0))
                if left > 0:
                    server.throttle[rel] = (rate, left - 1)
                    self._trickle(rel, rng, status, body, rate)
                    return
                try:
                    self.wfile.write(body)
                except OSError:  # the client hung up (e.g. it stopped reading at the signed size)
                    self.close_connection = True
                server.log.append(ServedRequest(rel, rng, status, len(body)))

            def _trickle(self, rel: str, rng: str | None, status: int, body: bytes, rate: float) -> None:
                sent = 0
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        sent += 1
                        time.sleep(1.0 / rate)
                except OSError:  # the client gave up on us: what it got is logged
                    self.close_connection = True
                server.log.append(ServedRequest(rel, rng, status, sent))

            def _endless(self, rel: str, rng: str | None, first: bytes) -> None:
                self.send_response(206 if rng else 200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                sent = 0
                try:
                    for piece in itertools.chain([first], itertools.repeat(b"\xee" * 65536)):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        sent += len(piece)
                except OSError:
                    self.close_connection = True
                server.log.append(ServedRequest(rel, rng, 206 if rng else 200, sent))

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def bytes_for(self, suffix: str) -> int:
        return sum(r.bytes_sent for r in self.log if r.path.endswith(suffix))

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def tree_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
