"""Bytes a board downloads per release (not CI; results feed docs/benchmarks.md, "OTA bytes").

A real `nanofleet fleet serve`, one board enrolled with `nanofleet device enroll` and running `nanofleet device
run` with the real engine on a base bundle (bootstrapped from a local folder: not counted), its artifact
requests going through a counting HTTP proxy (every response byte the board received, manifests and chunk maps
included), and four releases rolled out through the fleet in turn:

    adapter-only      a LoRA adapter bundle for the running base (nothing of the base is fetched)
    same weights      the base re-signed as the next version, every file unchanged
    one layer changed the next version with one decoder layer's tensors altered (golden tokens recomputed with
                      the engine so the board's activation check passes), everything else byte-identical

For each: the release's size, bytes on the wire (proxy), and the agent's own count (fetched / copied from files
it held / chunks reused), from the result event the fleet stored.

    /work/heavy.sh --exclusive .venv/bin/python benchmarks/ota_bytes.py \\
        --base .cache/test-adapters/base-int8-*/bundle --adapter .cache/test-adapters/adapter-qv-int8-*/adapter \\
        --key .cache/test-adapters/keys/nanofleet.key --json benchmarks/results/ota_bytes.json
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from manifests import (  # noqa: E402
    GoldenCheck,
    SigningKey,
    describe_file,
    read_manifest_unverified,
    write_keypair,
    write_signed_manifest,
)

CLI = [sys.executable, "-m", "nanofleet.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


class CountingProxy:
    """A reverse proxy in front of the fleet's artifacts: counts the response bytes each request path got."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.bytes: list[tuple[str, int]] = []
        proxy = self
        client = httpx.Client(timeout=120)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "if-none-match")}
                r = client.get(proxy.upstream + self.path, headers=headers)
                body = r.content
                self.send_response(r.status_code)
                for k in ("content-type", "content-range", "etag", "accept-ranges"):
                    if k in r.headers:
                        self.send_header(k, r.headers[k])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                proxy.bytes.append((self.path, len(body)))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self) -> tuple[int, int]:
        """(bytes, requests) of bundle files since the last call."""
        got, self.bytes = self.bytes, []
        got = [(p, n) for p, n in got if p.startswith("/bundles/")]
        return sum(n for _, n in got), len(got)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def resign(src: Path, dest: Path, key: SigningKey, version: int) -> Path:
    """The same files (hard links), the next version, signed again."""
    dest.mkdir(parents=True)
    m = read_manifest_unverified(src)
    for f in m.files:
        os.link(src / f.path, dest / f.path)
    write_signed_manifest(dest, m.model_copy(update={"version": version}), key)
    return dest


def change_one_layer(src: Path, dest: Path, key: SigningKey, version: int, layer: int) -> tuple[Path, int]:
    """A copy whose decoder layer ``layer`` has every tensor altered (floats scaled by 1.01, one byte in 64 of
    packed weights flipped in its low bit); golden tokens recomputed through the engine. Returns (bundle, bytes
    of that layer's tensors)."""
    import onnx

    from device.engine import Engine, EngineOptions

    shutil.copytree(src, dest)
    data_path = dest / "model.onnx_data"
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    raw = np.memmap(data_path, dtype=np.uint8, mode="r+")
    touched = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if f"layers.{layer}." not in t.name or "offset" not in ext:
            continue
        off, n = int(ext["offset"]), int(ext["length"])
        if t.data_type == onnx.TensorProto.FLOAT:
            view = raw[off : off + n].view(np.float32)
            view[:] = view * np.float32(1.01)
        elif t.data_type == onnx.TensorProto.FLOAT16:
            view = raw[off : off + n].view(np.float16)
            view[:] = view * np.float16(1.01)
        else:
            raw[off : off + n : 64] ^= 1
        touched += n
    raw.flush()
    del raw
    m = read_manifest_unverified(dest)
    files = [describe_file(dest, f.path, f.role) if f.path == "model.onnx_data" else f for f in m.files]
    m = m.model_copy(update={"version": version, "files": files})
    write_signed_manifest(dest, m, key)
    assert m.golden is not None
    with Engine.from_bundle(dest, None, EngineOptions(threads=1, spin_wait=False)) as engine:
        expected = engine.greedy(m.golden.prompt_token_ids, len(m.golden.expected_token_ids))
    golden = GoldenCheck(prompt_token_ids=m.golden.prompt_token_ids, expected_token_ids=expected,
                         latency_budget_ms=m.golden.latency_budget_ms)  # fmt: skip
    write_signed_manifest(dest, m.model_copy(update={"golden": golden}), key)
    return dest, touched


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    key = SigningKey.load(args.key)
    pub = work / "keys"
    _, pubfile = write_keypair(pub, key)
    base = read_manifest_unverified(args.base)
    releases = work / "releases"
    releases.mkdir()
    resigned = resign(args.base, releases / "resigned", key, base.version + 1)
    layer, layer_bytes = change_one_layer(args.base, releases / "layer", key, base.version + 2, args.layer)

    fleet_dir = work / "fleet"
    fleet_dir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proxy = CountingProxy(url)  # devices reach the fleet (its artifacts) through it: public_url
    (fleet_dir / "fleet.yaml").write_text(yaml.safe_dump({
        "data_dir": str(fleet_dir / "data"), "host": "127.0.0.1", "port": port, "public_url": proxy.url,
        "trusted_keys": [str(pubfile)], "tick_s": 0.2}))  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    log = open(work / "procs.log", "ab")  # noqa: SIM115 - closed at the end
    try:
        procs.append(subprocess.Popen([*CLI, "fleet", "serve", "--config", str(fleet_dir / "fleet.yaml"),
                                       "--log-level", "warning"], env=ENV, stdout=log, stderr=log))  # fmt: skip
        token_file = fleet_dir / "data" / "admin.token"
        wait_for(lambda: token_file.is_file() and _up(url), 60, "the fleet")
        from fleet.client import FleetClient

        admin = FleetClient(url, token_file.read_text().strip(), timeout=300)
        for b in (args.base, resigned, layer, args.adapter):
            admin.upload_bundle(b)
        enrol = admin.enrollment_token(uses=1)["token"]
        board = work / "board"
        r = subprocess.run([*CLI, "device", "enroll", "--fleet", url, "--token", enrol, "--data-dir", str(board),
                            "--device-id", "bench-1", "--json"], env=ENV, capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"enrol failed: {r.stderr}")
        cfg = yaml.safe_load((board / "agent.yaml").read_text())
        cfg.update(runtime="engine", bootstrap_bundle=str(args.base.resolve()))
        cfg["api"] = {**cfg.get("api", {}), "port": free_port()}
        cfg.setdefault("limits", {}).update(threads=1, weights_cache=False, disk_margin_bytes=0)
        (board / "agent.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([*CLI, "device", "run", "--config", str(board / "agent.yaml")], env=ENV,
                                      stdout=log, stderr=log))  # fmt: skip

        def reported() -> dict[str, Any]:
            return admin.device("bench-1").get("reported") or {}

        wait_for(lambda: reported().get("state") == "committed", 300, "the board serving its base")
        proxy.take()
        rows = []
        adapter = read_manifest_unverified_any(args.adapter)
        for label, name, version, folder in (
            ("adapter-only", adapter["name"], adapter["version"], args.adapter),
            ("same weights, re-signed", base.name, base.version + 1, resigned),
            (f"one layer changed (layer {args.layer})", base.name, base.version + 2, layer),
        ):
            dep = f"bench-{len(rows)}"
            t0 = time.monotonic()
            admin.apply({"apiVersion": "nanofleet/v1", "kind": "Deployment", "metadata": {"name": dep},
                         "spec": {"bundle": {"name": name, "version": version},
                                  "selector": {"device_ids": ["bench-1"]}}})  # fmt: skip
            d = wait_for(lambda dep=dep: (x := admin.deployment(dep))["status"] != "in_progress" and x, 600, dep)
            seconds = time.monotonic() - t0
            if d["status"] != "completed":
                raise RuntimeError(f"{dep}: {d['status']}: {d['targets']}")
            events = admin.request("GET", "/api/v1/devices/bench-1/events")
            result = [e["payload"] for e in events if e["kind"] == "result" and e["deployment_id"] == d["id"]][-1]
            wire, requests = proxy.take()
            size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
            rows.append({"release": label, "bundle_bytes": size, "wire_bytes": wire, "requests": requests,
                         "agent": result["details"].get("bytes"), "seconds": round(seconds, 1)})  # fmt: skip
        return {"layer_tensor_bytes": layer_bytes, "rows": rows, "chunk_size": 256 * 1024}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


def read_manifest_unverified_any(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((Path(folder) / "manifest.yaml").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a signed base bundle with LoRA slots")
    ap.add_argument("--adapter", type=Path, required=True, help="an adapter bundle built for --base")
    ap.add_argument("--key", type=Path, required=True, help="the private key that signed both (signs releases)")
    ap.add_argument("--layer", type=int, default=5, help="the decoder layer the third release changes")
    ap.add_argument("--json", type=Path, help="write the results here as well")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ota-bytes-") as tmp:
        res = run(args, Path(tmp))
    res.update(load_before=[round(x, 2) for x in load_before], load_after=[round(x, 2) for x in os.getloadavg()],
               cpu=os.cpu_count())  # fmt: skip
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
