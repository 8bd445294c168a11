"""Dashboard fixtures: one running fleet service (real HTTP, embedded MQTT broker) with signed bundles
that carry quality reports, simulated devices publishing full telemetry over real MQTT, and headless
Chromium from Debian driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.client import FleetClient
from fleet.config import FleetConfig
from fleet.server import ServerThread
from manifests import (
    ArchConfig,
    BundleManifest,
    GoldenCheck,
    GraphSpec,
    Provenance,
    QualityReport,
    Recipe,
    Runtime,
    SigningKey,
    TargetVerification,
    TrustStore,
    describe_file,
    write_keypair,
    write_signed_manifest,
)
from manifests import mqtt as c
from tests.fleet.simdevice import Behaviour, SimDevice

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM = os.environ.get("NANOFLEET_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BUNDLE = "smollm2-135m-int8"
# Decode speed each simulated device reports per model version (v2 is faster, v3 slower).
TOK_S = {1: 100.0, 2: 130.0, 3: 60.0}
ERRORS = {1: 1, 2: 0, 3: 3}  # errors per 10 requests


def make_quality_bundle(root: Path, key: SigningKey, version: int) -> Path:
    """A small signed bundle whose manifest carries a full quality report (the fleet never runs it)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(bytes((i * 13 + version) % 256 for i in range(8192)))
    (root / "tokenizer.json").write_text(f'{{"version": "1.0", "v": {version}}}')
    ppl_q = 23.68 * (1 + 0.01 * version)
    manifest = BundleManifest(
        name=BUNDLE,
        version=version,
        created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        arch=ArchConfig(
            architecture="llama",
            num_layers=30,
            hidden_size=576,
            num_attention_heads=9,
            num_kv_heads=3,
            head_dim=64,
            vocab_size=49152,
            context_length=2048,
            tie_word_embeddings=True,
        ),
        graph=GraphSpec(kind="optimum-kv", input_names=["input_ids"], output_names=["logits"]),
        runtime=Runtime(
            target="arm64",
            min_onnxruntime="1.20",
            operators=["ai.onnx:MatMul"],
            verified_onnxruntime=["1.22"],
        ),
        recipe=Recipe(
            precision="int8", method="matmulnbits", bits=8, block_size=32, symmetric=True, accuracy_level=4
        ),
        files=[
            describe_file(root, "model.onnx", "model"),
            describe_file(root, "tokenizer.json", "tokenizer"),
        ],
        quality=QualityReport(
            eval_text_sha256="9" * 64,
            eval_tokens=334,
            ppl_reference=23.68,
            ppl_quantized=ppl_q,
            ppl_increase_pct=100 * (ppl_q - 23.68) / 23.68,
            greedy_agreement=0.97 - 0.01 * version,
            greedy_prompts=8,
            greedy_tokens_per_prompt=32,
            max_ppl_increase_pct=5.0,
            min_greedy_agreement=0.9,
            passed=True,
            onnxruntime="1.32.0",
            target_verifications=[
                TargetVerification(
                    cpu="cortex-a76",
                    onnxruntime="1.22.0",
                    perplexity=ppl_q * 1.01,
                    greedy_agreement=0.95,
                    passed=True,
                    eval_tokens=334,
                    message="qemu-aarch64",
                )
            ],
        ),
        golden=GoldenCheck(prompt_token_ids=[1, 2], expected_token_ids=[3, 4], latency_budget_ms=1000),
        provenance=Provenance(
            source=f"SmolLM2-135M-Instruct.Q4_1.gguf#v{version}",
            source_kind="gguf",
            tools={"optimum-onnx": "0.1.0", "onnxruntime": "1.32.0"},
            built_on="x86_64 test host",
        ),
    )
    write_signed_manifest(root, manifest, key)
    return root


class TelemetryDevice(SimDevice):
    """The fleet tests' simulated device, publishing the whole telemetry payload (RSS, temperature, free
    disk, request/error counters cumulative like the real agent's), so every chart on the device page
    has real samples that came over MQTT."""

    def _telemetry_loop(self) -> None:
        n = 0
        requests = errors = 0  # cumulative since the agent started, as the real agent sends them
        while not self._stop.wait(self.telemetry_s):
            if not self.connected.is_set() or self.current is None:
                continue
            with self._lock:
                self.seq += 1
                seq = self.seq
            n += 1
            version = self.current[1]
            requests += 10
            errors += ERRORS.get(version, 0)
            t = c.Telemetry(
                device_id=self.id,
                seq=seq,
                ts=dt.datetime.now(dt.timezone.utc),
                decode_tok_s=TOK_S.get(version, 100.0) + (n % 5),
                ttft_p95_ms=80.0 + 10 * version + (n % 3),
                ttft_p50_ms=60.0,
                requests=requests,
                errors=errors,
                rss_bytes=(300 + 20 * version) * 2**20 + n * 4096,
                cpu_temp_c=48.0 + (n % 7),
                disk_free_bytes=(8 * 2**30) - version * 150 * 2**20,
                model=c.ModelRef(name=self.current[0], version=version, slot="a"),
                agent_version="sim",
            )
            self.client.publish(c.telemetry_topic(self.id), t.to_bytes(), qos=1)


@dataclass
class DashFleet:
    server: ServerThread
    bundle_dirs: dict[int, Path]
    bundle_pub: Path
    devices: list[SimDevice] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.server.svc.admin_token

    def admin(self) -> FleetClient:
        return FleetClient(self.url, self.token)

    def enroll(self, ids: list[str], *, tags: dict[str, str], groups: list[str]) -> list[SimDevice]:
        """Enrol devices over HTTP exactly as an agent does, then connect them to the broker on v1."""
        with self.admin() as admin:
            token = admin.enrollment_token(uses=len(ids), tags=tags, groups=groups)["token"]
        fleet_trust = TrustStore()
        fleet_trust.add(self.server.svc.signing_key.public_key)
        out = []
        with FleetClient(self.url) as anon:
            for device_id in ids:
                creds = anon.enroll(token, device_id=device_id, hardware_class="pi5", cpu_arch="aarch64")
                dev = TelemetryDevice(
                    creds["device_id"],
                    creds["mqtt"]["url"],
                    username=creds["mqtt"]["username"],
                    password=creds["mqtt"]["password"],
                    bundle_trust=TrustStore.from_paths([self.bundle_pub]),
                    fleet_trust=fleet_trust,
                    behaviour=Behaviour(install_s=0.3, decode_tok_s=TOK_S),
                    current=(BUNDLE, 1),
                    telemetry_s=0.25,
                )
                out.append(dev.start())
        self.devices += out
        return out


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "it") -> Any:
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def dash_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashFleet]:
    with running_dash_fleet(tmp_path_factory.mktemp("dashboard")) as fleet:
        yield fleet


@contextlib.contextmanager
def running_dash_fleet(
    root: Path, *, database_url: str | None = None, schema: str | None = None
) -> Iterator[DashFleet]:
    """A fleet service with bundles v1..v3 registered and four devices online on v1, sending telemetry."""
    key = SigningKey.generate()
    _, pub = write_keypair(root / "keys", key)
    bundle_dirs = {v: make_quality_bundle(root / f"bundle-v{v}", key, v) for v in (1, 2, 3)}
    cfg = FleetConfig(
        data_dir=root / "fleet",
        database_url=database_url,
        database_schema=schema,
        port=0,
        trusted_keys=[pub],
        tick_s=0.1,
    )
    server = ServerThread(cfg).start()
    fleet = DashFleet(server, bundle_dirs, pub)
    try:
        with fleet.admin() as admin:
            for v in (1, 2, 3):
                admin.upload_bundle(bundle_dirs[v])
        fleet.enroll(["pi-lab-01", "pi-lab-02"], tags={"site": "lab"}, groups=["pilot"])
        fleet.enroll(["pi-field-01", "pi-field-02"], tags={"site": "field"}, groups=["field"])
        # Every device online, on v1, with a few telemetry samples stored.
        with fleet.admin() as admin:
            wait_for(
                lambda: (
                    all(d["online"] and d["model"] == f"{BUNDLE}@1" for d in admin.devices())
                    and len(admin.devices()) == 4
                ),
                what="4 devices online on v1",
            )
        wait_for(
            lambda: all(
                len(httpx.get(f"{fleet.url}/api/v1/devices/{d.id}/telemetry", headers=_bearer(fleet)).json())
                >= 3
                for d in fleet.devices
            ),
            what="telemetry from every device",
        )
        yield fleet
    finally:
        for d in fleet.devices:
            d.stop()
        server.stop()


def _bearer(fleet: DashFleet) -> dict[str, str]:
    return {"Authorization": f"Bearer {fleet.token}"}


def login_csrf(client: httpx.Client) -> str:
    page = client.get("/login")
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, page.text
    return m.group(1)


@contextlib.contextmanager
def signed_in_client(fleet: DashFleet) -> Iterator[httpx.Client]:
    """An HTTP client holding a dashboard session cookie (signed in the way the form does it)."""
    with httpx.Client(base_url=fleet.url, follow_redirects=False, timeout=30) as client:
        r = client.post("/login", data={"token": fleet.token, "csrf_token": login_csrf(client), "next": "/"})
        assert r.status_code == 303, r.text
        yield client


def page_csrf(html: str) -> str:
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert m, "no csrf meta tag on the page"
    return m.group(1)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `make test` (scripts/ensure_services.sh installs Debian's chromium) "
            "or apt-get install -y chromium. Never `playwright install`: browser downloads fail here."
        )
    return CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
