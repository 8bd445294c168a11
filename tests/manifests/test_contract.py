import datetime as dt
import stat
from pathlib import Path

import pytest

from manifests import (
    ArchConfig,
    BadSignatureError,
    BundleManifest,
    DeploymentManifest,
    ExpiredError,
    GraphSpec,
    KeyExistsError,
    KeyFormatError,
    MissingFileError,
    Provenance,
    Recipe,
    Runtime,
    SchemaError,
    SignedDocument,
    SigningKey,
    TamperedFileError,
    TrustStore,
    UnknownKeyError,
    UnsafePathError,
    UnsupportedFormatError,
    describe_file,
    mqtt,
    verify_bundle,
    write_keypair,
    write_signed_manifest,
)


def make_bundle(root: Path, key: SigningKey, *, expires_in: dt.timedelta | None = dt.timedelta(days=30)) -> Path:
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"\x08\x01" * 500)
    (root / "tokenizer.json").write_text("{}")
    now = dt.datetime.now(dt.timezone.utc)
    m = BundleManifest(
        name="tiny",
        version=3,
        created_at=now,
        expires_at=(now + expires_in) if expires_in else None,
        arch=ArchConfig(
            architecture="llama", num_layers=2, hidden_size=8, num_attention_heads=2, num_kv_heads=1,
            head_dim=4, vocab_size=10, context_length=32, eos_token_ids=[2],
        ),
        graph=GraphSpec(kind="optimum-kv", input_names=["input_ids"], output_names=["logits"]),
        runtime=Runtime(target="arm64", min_onnxruntime="1.20", operators=["ai.onnx:MatMul"]),
        recipe=Recipe(precision="fp32", method="none"),
        files=[describe_file(root, "model.onnx", "model"), describe_file(root, "tokenizer.json", "tokenizer")],
        provenance=Provenance(source="test", source_kind="folder"),
    )
    write_signed_manifest(root, m, key)
    return root


def test_round_trip_verifies(tmp_path: Path) -> None:
    key = SigningKey.generate()
    b = make_bundle(tmp_path / "b", key)
    m = verify_bundle(b, TrustStore([key.public_key]))
    assert m.ref == "tiny@3"
    assert m.total_size == 1002


def test_flipped_byte_is_tampered(tmp_path: Path) -> None:
    key = SigningKey.generate()
    b = make_bundle(tmp_path / "b", key)
    data = bytearray((b / "model.onnx").read_bytes())
    data[10] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(TamperedFileError):
        verify_bundle(b, TrustStore([key.public_key]))


def test_edited_manifest_breaks_signature(tmp_path: Path) -> None:
    key = SigningKey.generate()
    b = make_bundle(tmp_path / "b", key)
    text = (b / "manifest.yaml").read_text().replace("version: 3", "version: 4")
    (b / "manifest.yaml").write_text(text)
    with pytest.raises(BadSignatureError):
        verify_bundle(b, TrustStore([key.public_key]))


def test_unknown_key_expired_missing_and_format(tmp_path: Path) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    b = make_bundle(tmp_path / "b", key)
    with pytest.raises(UnknownKeyError):
        verify_bundle(b, TrustStore([other.public_key]))
    # Key rotation: a store with both keys accepts it.
    verify_bundle(b, TrustStore([other.public_key, key.public_key]))
    e = make_bundle(tmp_path / "e", key, expires_in=dt.timedelta(seconds=-1))
    with pytest.raises(ExpiredError):
        verify_bundle(e, TrustStore([key.public_key]))
    (b / "tokenizer.json").unlink()
    with pytest.raises(MissingFileError):
        verify_bundle(b, TrustStore([key.public_key]))
    f = make_bundle(tmp_path / "f", key)
    body = (f / "manifest.yaml").read_text().replace("format_version: 1", "format_version: 99")
    (f / "manifest.yaml").write_text(body)
    (f / "manifest.sig").write_text(key.sign(body.encode()).to_json())
    with pytest.raises(UnsupportedFormatError):
        verify_bundle(f, TrustStore([key.public_key]))


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\\b", ""])
def test_unsafe_paths_refused(bad: str) -> None:
    from manifests import BundleFile

    with pytest.raises((UnsafePathError, ValueError)):
        BundleFile(path=bad, size=1, sha256="0" * 64)


def test_symlink_refused(tmp_path: Path) -> None:
    key = SigningKey.generate()
    b = make_bundle(tmp_path / "b", key)
    outside = tmp_path / "outside"
    outside.write_text("{}")
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        verify_bundle(b, TrustStore([key.public_key]))


def test_keygen_mode_and_no_overwrite(tmp_path: Path) -> None:
    priv, pub = write_keypair(tmp_path)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    with pytest.raises(KeyExistsError):
        write_keypair(tmp_path)
    SigningKey.load(priv)
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(KeyFormatError):
        SigningKey.load(tmp_path / "bad.key")


def test_signed_document(tmp_path: Path) -> None:
    key = SigningKey.generate()
    doc = SignedDocument.sign({"kind": "rollback", "version": 1}, key)
    assert doc.verify(TrustStore([key.public_key]))["version"] == 1
    forged = doc.model_copy(update={"payload": {"kind": "rollback", "version": 0}})
    with pytest.raises(BadSignatureError):
        forged.verify(TrustStore([key.public_key]))


EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
# Each example by name, with what it shows: a missing or emptied folder fails instead of passing on nothing.
DEPLOYMENT_EXAMPLES = {
    "deployment-canary.yaml": ("smollm2-canary", "canary"),
    "deployment-waves.yaml": ("smollm2-v2-waves", "waves"),
}


def test_deployment_examples_parse() -> None:
    found = sorted(p.name for p in EXAMPLES.glob("deployment-*.yaml"))
    assert found == sorted(DEPLOYMENT_EXAMPLES), f"deployment examples in {EXAMPLES}: {found}"
    for name, (metadata_name, strategy) in DEPLOYMENT_EXAMPLES.items():
        doc = DeploymentManifest.from_yaml((EXAMPLES / name).read_text())
        assert doc.metadata.name == metadata_name
        assert doc.spec.strategy.type == strategy
        assert doc.spec.bundle.name == "smollm2-135m-instruct-int8"  # what export names it


def test_every_example_document_is_known() -> None:
    """agent.yaml and fleet.yaml are validated by the agent's and the fleet's own tests, release.yaml by
    test_variants.py."""
    names = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix == ".yaml")
    assert names == sorted([*DEPLOYMENT_EXAMPLES, "agent.yaml", "fleet.yaml", "release.yaml"])


def test_deployment_error_names_field_path() -> None:
    doc = """
apiVersion: nanofleet/v1
kind: Deployment
metadata: {name: x}
spec:
  bundle: {name: m, version: 0}
  strategy: {type: canary}
"""
    with pytest.raises(SchemaError) as ei:
        DeploymentManifest.from_yaml(doc)
    assert "spec.bundle.version" in str(ei.value)
    assert "spec.strategy" in str(ei.value)


def test_mqtt_topics_and_payloads() -> None:
    assert mqtt.desired_topic("pi-1") == "nanofleet/v1/devices/pi-1/desired"
    assert mqtt.parse_device_topic("nanofleet/v1/devices/pi-1/telemetry") == ("pi-1", "telemetry")
    with pytest.raises(ValueError):
        mqtt.telemetry_topic("a/b")
    t = mqtt.Telemetry(device_id="pi-1", seq=1, ts=dt.datetime.now(dt.timezone.utc), decode_tok_s=10.0)
    back = mqtt.Telemetry.from_bytes(t.to_bytes())
    assert back.decode_tok_s == 10.0 and back.schema_ == "nanofleet.telemetry/1"
    with pytest.raises(SchemaError):
        mqtt.Telemetry.from_bytes(b'{"schema": "nanofleet.telemetry/2", "device_id": "x", "seq": 1, "ts": 0}')
