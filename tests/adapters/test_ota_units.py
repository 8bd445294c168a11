"""The agent's adapter deployments without a model (fast): the real Updater, real HTTP downloads from a file
server, signed adapter bundles with made-up matrices, a fake runtime that records what it was asked to make
resident. Base checked before any byte is fetched, anti-rollback and signed rollbacks from the kept version,
files reused by sha256, a refused activation leaving the previous version in service."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device.agent.adapters import UNLOADED, AdapterQualityError, AdapterStore
from manifests import Provenance, SignedDocument, SigningKey, TrustStore, describe_file, manifest_sha256
from manifests.adapter import (
    ADAPTER_FILE,
    ADAPTER_ROLE,
    AdapterBase,
    AdapterManifest,
    AdapterRef,
    LoraSpec,
    write_signed_adapter_manifest,
)
from manifests.mqtt import DesiredState, RollbackAuthorization
from tests.device_agent.fake_runtime import FakeRuntime
from tests.device_agent.harness import DEVICE, Harness
from tests.device_agent.helpers import ArtifactServer


class AdapterRuntime(FakeRuntime):
    """The fake runtime plus the two adapter calls the agent makes (device/agent/runtime.py EngineRuntime)."""

    def __init__(self) -> None:
        super().__init__()
        self.resident: dict[str, int] = {}
        self.refuse: set[str] = set()

    def activate_adapter(self, folder: Path, manifest: AdapterManifest, probe_ids: list[int]) -> dict[str, Any]:
        assert probe_ids, "the activation check needs the base's golden text"
        if manifest.ref in self.refuse:
            raise AdapterQualityError(f"adapter {manifest.ref} breaks the model: perplexity 1e9")
        self.resident[manifest.name] = manifest.version
        return {"perplexity": 12.0}

    def adapter_version(self, name: str) -> int | None:
        return self.resident.get(name)

    def deactivate_adapter(self, name: str) -> bool:
        return self.resident.pop(name, None) is not None


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[ArtifactServer]:
    (tmp_path / "artifacts").mkdir()
    server = ArtifactServer(tmp_path / "artifacts")
    yield server
    server.stop()


@pytest.fixture
def h(tmp_path: Path, key: SigningKey, artifacts: ArtifactServer) -> Harness:
    harness = Harness(tmp_path, key, TrustStore([key.public_key]), artifacts)
    harness.runtime = AdapterRuntime()
    harness.updater = harness._make(None)
    return harness


def publish_adapter(h: Harness, name: str, version: int, base: Path, payload: bytes) -> AdapterRef:
    folder = f"adapter-{name}-{version}-{os.urandom(3).hex()}"
    root = h.artifacts.root / folder
    root.mkdir()
    (root / ADAPTER_FILE).write_bytes(payload)
    m = AdapterManifest(
        name=name,
        version=version,
        created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        base=AdapterBase(name="tiny", version=1, manifest_sha256=manifest_sha256(base)),
        lora=LoraSpec(
            rank=2,
            alpha=4.0,
            scale=2.0,
            target_modules=["q_proj"],
            sites=["qkv"],
            layers=[0],
            parameters=len(payload) // 4,
        ),  # fmt: skip
        files=[describe_file(root, ADAPTER_FILE, ADAPTER_ROLE)],
        provenance=Provenance(source="test", source_kind="folder"),
    )
    write_signed_adapter_manifest(root, m, h.key)
    return AdapterRef(name=name, version=version, manifest_sha256=manifest_sha256(root),
                      base_manifest_sha256=m.base.manifest_sha256, base_name="tiny", base_version=1,
                      base_url=folder + "/")  # fmt: skip


def deploy(h: Harness, ref: AdapterRef, rollback: SignedDocument | None = None, dep: str | None = None) -> str:
    desired = DesiredState(device_id=DEVICE, deployment_id=dep or f"a-{os.urandom(3).hex()}", adapter=ref,
                           rollback=rollback, issued_at=dt.datetime.now(dt.timezone.utc))  # fmt: skip
    return h.updater.handle_desired(desired)


def fetched(h: Harness, ref: AdapterRef) -> list[str]:
    return ["/" + r.path.lstrip("/") for r in h.artifacts.log if r.path.lstrip("/").startswith(ref.base_url)]


def with_base(h: Harness) -> Path:
    ref = h.publish(1)
    assert h.deploy(ref) == "committed"
    return h.artifacts.root / ref.base_url.rstrip("/")


def test_no_base_or_another_base_is_refused_before_a_byte_is_fetched(h: Harness, tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    from tests.device_agent.helpers import make_bundle

    make_bundle(other, h.key, name="tiny", version=7)
    ref = publish_adapter(h, "qv", 1, other, b"\1" * 64)
    assert deploy(h, ref) == "refused"
    assert h.reasons()[-1] == "adapter_base_absent" and fetched(h, ref) == []
    with_base(h)
    dep = "mismatch-1"
    assert deploy(h, ref, dep=dep) == "refused"
    rec = h.updater.record
    assert (rec.deployment_id, rec.last_result, rec.error_reason) == (dep, "refused", "adapter_base_mismatch")
    assert "needs base tiny@1" in (rec.error or "") and fetched(h, ref) == []
    assert h.state.value == "committed" and h.serving() == ("tiny", 1)  # the model did not move
    assert deploy(h, ref, dep=dep) == "duplicate"  # a redelivered command is not run again


def test_versions_reuse_rollback_and_a_refused_activation(h: Harness) -> None:
    base = with_base(h)
    store = AdapterStore(h.data)
    v1 = publish_adapter(h, "qv", 1, base, b"\1" * 4096)
    assert deploy(h, v1) == "committed" and h.runtime.resident == {"qv": 1}
    assert fetched(h, v1) == [f"/{v1.base_url}manifest.yaml", f"/{v1.base_url}manifest.sig",
                              f"/{v1.base_url}{ADAPTER_FILE}"]  # fmt: skip
    (info,) = store.report(h.updater.record.committed.manifest_sha256)  # type: ignore[union-attr]
    assert (info.name, info.version, info.resident, info.previous_version) == ("qv", 1, True, None)

    v2 = publish_adapter(h, "qv", 2, base, b"\1" * 4096)  # the same weights, re-signed
    assert deploy(h, v2) == "committed"
    assert fetched(h, v2) == [f"/{v2.base_url}manifest.yaml", f"/{v2.base_url}manifest.sig"]  # file copied
    result = [f for k, _, f in h.events if k == "result"][-1]
    assert result["details"]["bytes"]["copied"] == 4096 and result["details"]["bytes"]["fetched"] == 0

    v3 = publish_adapter(h, "qv", 3, base, b"\2" * 4096)
    assert deploy(h, v3) == "committed" and h.runtime.resident == {"qv": 3}
    assert sorted(p.name for p in (store.root / "qv").iterdir()) == ["2", "3"]  # current + previous

    assert deploy(h, v2) == "refused" and h.reasons()[-1] == "anti_rollback" and h.runtime.resident == {"qv": 3}
    dep = "rollback-1"
    auth = RollbackAuthorization(deployment_id=dep, name="qv", version=2, device_ids=[DEVICE],
                                 expires_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))  # fmt: skip
    before = len(h.artifacts.log)
    assert deploy(h, v2, rollback=SignedDocument.sign(auth, h.key), dep=dep) == "committed"
    assert h.runtime.resident == {"qv": 2} and len(h.artifacts.log) == before  # from the kept folder
    wrong = RollbackAuthorization(deployment_id="other", name="qv", version=2, device_ids=[DEVICE],
                                  expires_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))  # fmt: skip
    v4 = publish_adapter(h, "qv", 4, base, b"\3" * 4096)
    h.runtime.refuse.add("qv@4")
    assert deploy(h, v4) == "failed" and h.reasons()[-1] == "adapter_quality"
    assert h.runtime.resident == {"qv": 2} and store.load().adapters["qv"].version == 2
    assert sorted(p.name for p in (store.root / "qv").iterdir()) == ["2", "3"]  # the refused one not kept
    assert deploy(h, v1, rollback=SignedDocument.sign(wrong, h.key)) == "refused"
    assert h.reasons()[-1] == "bad_rollback_authorization"


def rollback_auth(h: Harness, dep: str, name: str, version: int) -> SignedDocument:
    auth = RollbackAuthorization(deployment_id=dep, name=name, version=version, device_ids=[DEVICE],
                                 expires_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))  # fmt: skip
    return SignedDocument.sign(auth, h.key)


# (case, versions deployed in order, the version the signed rollback names, then: resident version (None: not
# resident), version folders kept on disk, the result event's message)
ROLLBACKS = [
    ("an earlier version is kept: back to it", [1, 2], 1, 1, ["1", "2"], "adapter qv@1 resident"),
    ("no earlier version: unloaded, the base alone", [1], UNLOADED, None, [],
     "adapter qv unloaded (a rollback to no version): the base serves alone"),
    ("unloaded even with an earlier version kept, when the rollback says so", [1, 2], UNLOADED, None, [],
     "adapter qv unloaded (a rollback to no version): the base serves alone"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "deployed", "to", "resident", "folders", "message"), ROLLBACKS,
                         ids=[c[0] for c in ROLLBACKS])  # fmt: skip
def test_a_rollback_returns_to_the_earlier_version_or_unloads(
    h: Harness, case: str, deployed: list[int], to: int, resident: int | None, folders: list[str], message: str
) -> None:
    base = with_base(h)
    store = AdapterStore(h.data)
    refs = {v: publish_adapter(h, "qv", v, base, bytes([v]) * 4096) for v in deployed}
    for v in deployed:
        assert deploy(h, refs[v]) == "committed"
    base_sha = h.updater.record.committed.manifest_sha256  # type: ignore[union-attr]
    ref = refs[to] if to in refs else refs[deployed[-1]].model_copy(update={"version": to})
    before = len(h.artifacts.log)
    dep = f"rollback-{to}"
    # unsigned, it is refused like any version below the highest committed one, and nothing changes
    assert deploy(h, ref) == "refused" and h.reasons()[-1] == "anti_rollback"
    assert h.runtime.resident == {"qv": deployed[-1]}

    assert deploy(h, ref, rollback=rollback_auth(h, dep, "qv", to), dep=dep) == "committed", h.updater.record.error
    rec = h.updater.record
    assert (rec.deployment_id, rec.last_result, rec.error) == (dep, "committed", None)
    assert h.runtime.resident == ({"qv": resident} if resident else {})
    assert len(h.artifacts.log) == before  # nothing fetched: the kept folder, or nothing at all
    report = store.report(base_sha)
    assert [(a.name, a.version, a.resident) for a in report] == ([("qv", resident, True)] if resident else [])
    kept = store.root / "qv"
    assert (sorted(p.name for p in kept.iterdir()) if kept.is_dir() else []) == folders
    result = [(m, f) for k, m, f in h.events if k == "result"][-1]
    assert result[0] == message and result[1]["details"]["unloaded"] is (resident is None)
    assert store.load().highest_committed == {"qv": deployed[-1]}  # anti-rollback remembers what was committed
    assert h.state.value == "committed" and h.serving() == ("tiny", 1)  # the model did not move

    # the same command again is a duplicate; the highest version deploys again from the fleet
    assert deploy(h, ref, rollback=rollback_auth(h, dep, "qv", to), dep=dep) == "duplicate"
    top = publish_adapter(h, "qv", deployed[-1] + 1, base, b"\7" * 4096)
    assert deploy(h, top) == "committed" and h.runtime.resident == {"qv": deployed[-1] + 1}
