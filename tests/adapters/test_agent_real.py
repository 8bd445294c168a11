"""The agent's adapter rollbacks on the real thing: the real Updater installs the cached int8 base from a real
HTTP server and serves it through EngineRuntime (the real engine behind the local API); adapter deployments
and signed rollbacks then go through it. A rollback to a version the board kept goes back to it; a rollback
with no earlier version (version 0) unloads the adapter, and the API offers the base alone again."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from device.agent.adapters import UNLOADED, AdapterStore
from device.agent.config import AgentConfig
from device.agent.runtime import EngineRuntime
from manifests import SignedDocument, SigningKey, TrustStore, manifest_sha256, read_manifest_unverified
from manifests.adapter import AdapterRef, read_adapter_manifest_unverified, write_signed_adapter_manifest
from manifests.mqtt import DesiredState, RollbackAuthorization
from tests.conftest import free_port
from tests.device_agent.harness import DEVICE, Harness
from tests.device_agent.helpers import ArtifactServer, ref_for

pytestmark = pytest.mark.slow
PROMPT = "The misting pumps run for forty seconds"


def _link_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, copy_function=os.link)
    return dest


class Board:
    """A Harness whose runtime is the real EngineRuntime, serving the int8 base installed by the Updater."""

    def __init__(self, root: Path, key: tuple[Path, Path], trust: TrustStore, base: Path) -> None:
        self.key = SigningKey.load(key[0])
        (root / "artifacts").mkdir(parents=True)
        self.artifacts = ArtifactServer(root / "artifacts")
        self.h = Harness(root, self.key, trust, self.artifacts)
        config = AgentConfig.model_validate({
            "device_id": DEVICE, "mqtt": {"url": "mqtt://127.0.0.1:1"}, "artifacts": {"base_url": self.artifacts.url},
            "trusted_keys": [str(key[1])], "data_dir": str(self.h.data),
            "api": {"port": free_port(), "bind": "127.0.0.1"}, "limits": {"threads": 2, "weights_cache": False},
        })  # fmt: skip
        self.runtime = EngineRuntime(config)
        self.runtime.start()
        self.api = f"http://127.0.0.1:{config.api.port}"
        self.h.runtime = self.runtime  # type: ignore[assignment]
        self.h.updater = self.h._make(None)
        ref = ref_for(_link_copy(base, self.artifacts.root / "base"), "base/")
        assert self.h.deploy(ref) == "committed", self.h.updater.record.error
        self.base_name = read_manifest_unverified(base).name
        self.base_sha = manifest_sha256(base)

    def publish(self, src: Path, name: str, version: int) -> AdapterRef:
        """``src`` (an adapter bundle) as ``name@version``, signed again, on the artifact server."""
        folder = f"{name}-{version}"
        dest = shutil.copytree(src, self.artifacts.root / folder)
        m = read_adapter_manifest_unverified(dest)
        write_signed_adapter_manifest(dest, m.model_copy(update={"name": name, "version": version}), self.key)
        return AdapterRef(name=name, version=version, manifest_sha256=manifest_sha256(dest),
                          base_manifest_sha256=self.base_sha, base_name=self.base_name, base_version=m.base.version,
                          base_url=folder + "/")  # fmt: skip

    def deploy(self, ref: AdapterRef, dep: str, rollback: bool = False) -> str:
        auth = None
        if rollback:
            until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
            doc = RollbackAuthorization(deployment_id=dep, name=ref.name, version=ref.version, device_ids=[DEVICE],
                                        expires_at=until)  # fmt: skip
            auth = SignedDocument.sign(doc, self.key)
        desired = DesiredState(device_id=DEVICE, deployment_id=dep, adapter=ref, rollback=auth,
                               issued_at=dt.datetime.now(dt.timezone.utc))  # fmt: skip
        return self.h.updater.handle_desired(desired)

    def models(self) -> dict[str, Any]:
        return {m["id"]: m for m in httpx.get(f"{self.api}/v1/models", timeout=30).json()["data"]}

    def complete(self, model: str) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        return httpx.post(f"{self.api}/v1/completions", json=body, timeout=120)

    def close(self) -> None:
        self.runtime.stop()
        holder = self.runtime._holder
        if holder is not None:
            holder.close()
        self.artifacts.stop()


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory, qv_int8: tuple[Path, dict], base_int8: Path,
          adapter_keys: tuple[Path, Path], trust: TrustStore) -> Iterator[Board]:  # fmt: skip
    """(qv_int8 first: the LoRAs train before the shared base is asked for, see fixtures.adapter_bundle.)"""
    b = Board(tmp_path_factory.mktemp("board"), adapter_keys, trust, base_int8)
    yield b
    b.close()


# (case, adapter name, versions deployed in order, the version the signed rollback names, the version resident
# after it: None when unloaded)
ROLLBACKS = [
    ("an earlier version kept: back to it", "qv", [1, 2], 1, 1),
    ("no earlier version: unloaded", "nv", [1], UNLOADED, None),
]


@pytest.mark.parametrize(("case", "name", "deployed", "to", "after"), ROLLBACKS, ids=[c[0] for c in ROLLBACKS])
def test_a_rollback_goes_back_to_the_kept_version_or_unloads_the_adapter(
    board: Board, qv_int8: tuple[Path, dict], case: str, name: str, deployed: list[int], to: int, after: int | None
) -> None:
    refs = {v: board.publish(qv_int8[0], name, v) for v in deployed}
    for v in deployed:
        assert board.deploy(refs[v], f"{name}-{v}") == "committed", board.h.updater.record.error
    model = f"{board.base_name}:{name}"
    models = board.models()
    assert models[model]["version"] == deployed[-1]
    tuned = board.complete(model).json()["choices"][0]["text"]
    plain = board.complete(board.base_name).json()["choices"][0]["text"]
    assert tuned != plain  # the adapter answers differently from the base

    ref = refs.get(to) or refs[deployed[-1]].model_copy(update={"version": to})
    served_before = len(board.artifacts.log)
    assert board.deploy(ref, f"{name}-rollback", rollback=True) == "committed", board.h.updater.record.error
    assert len(board.artifacts.log) == served_before  # nothing downloaded either way
    models = board.models()
    reported = {a.name: a for a in AdapterStore(board.h.data).report(board.base_sha)}
    if after is None:
        assert model not in models and board.base_name in models, list(models)
        r = board.complete(model)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert name not in reported  # reported as the base alone
        assert not (AdapterStore(board.h.data).root / name).exists()
    else:
        assert models[model]["version"] == after and reported[name].version == after
        assert board.complete(model).json()["choices"][0]["text"] == tuned  # the same weights, kept version
    assert board.complete(board.base_name).json()["choices"][0]["text"] == plain  # the base untouched
    assert board.h.updater.record.last_result == "committed" and board.h.serving() == (board.base_name, 1)
