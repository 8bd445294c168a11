"""Releases, board capabilities and the one resolver: which variant each kind of board gets, and why not."""

from __future__ import annotations

import datetime as dt

import pytest

from manifests import BoardCapabilities, DeploymentManifest, Release, SchemaError, VariantChoice, VariantRefusal
from manifests import mqtt as contract
from manifests.variants import parse_size, resolve_variant

GiB = 2**30

RELEASE = """
apiVersion: nanofleet/v1
kind: Release
metadata: {name: smollm2, version: 1}
spec:
  variants:
    - name: fp16-cuda
      bundle: {name: smollm2-fp16, version: 1}
      rules: {hardware_class: [jetson-orin], execution_providers: [CUDAExecutionProvider, TensorrtExecutionProvider]}
    - name: int8
      bundle: {name: smollm2-int8, version: 1}
      rules: {arch: [aarch64], min_ram: 4GiB, cpu_features: [asimddp, i8mm]}
    - name: int4
      bundle: {name: smollm2-int4, version: 1}
      rules: {arch: [aarch64], min_ram: 768MiB}
"""

ARM_V8 = ["fp", "asimd", "evtstrm", "crc32", "cpuid"]  # Cortex-A72 (Pi 4): no dot product
ARM_V82 = [*ARM_V8, "asimddp", "asimdhp", "atomics", "fphp", "lrcpc", "dcpop"]  # Cortex-A76 (Pi 5)


def board(**kw: object) -> BoardCapabilities:
    base: dict[str, object] = {
        "arch": "aarch64",
        "onnxruntime_version": "1.22.0",
        "execution_providers": ["CPUExecutionProvider"],
    }
    return BoardCapabilities.model_validate(base | kw)


@pytest.fixture
def release() -> Release:
    return Release.from_yaml(RELEASE)


def test_precision_rules_pick_the_variant_each_board_can_run(release: Release) -> None:
    pi5_8g_i8mm = board(hardware_class="pi5", ram_bytes=8 * GiB, cpu_features=[*ARM_V82, "i8mm"])
    pi5_no_i8mm = board(hardware_class="pi5", ram_bytes=8 * GiB, cpu_features=ARM_V82)
    pi4_1g = board(hardware_class="pi4", ram_bytes=1 * GiB, cpu_features=ARM_V8)
    jetson = board(
        hardware_class="jetson-orin",
        ram_bytes=8 * GiB,
        cpu_features=ARM_V82,
        execution_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    got = {name: resolve_variant(caps, release) for name, caps in [
        ("pi5", pi5_8g_i8mm), ("pi5-no-i8mm", pi5_no_i8mm), ("pi4", pi4_1g), ("jetson", jetson),
    ]}
    assert {k: v.variant for k, v in got.items() if isinstance(v, VariantChoice)} == {
        "pi5": "int8",
        "pi5-no-i8mm": "int4",  # no i8mm: the int8 variant's declared rule does not hold
        "pi4": "int4",
        "jetson": "fp16-cuda",
    }
    assert got["pi5"] == VariantChoice("smollm2@1", "int8", "smollm2-int8", 1)


def test_a_board_no_variant_fits_is_refused_with_one_line_per_variant(release: Release) -> None:
    zero = board(hardware_class="pi-zero-2w", ram_bytes=512 * 2**20, cpu_features=ARM_V8)
    r = resolve_variant(zero, release)
    assert isinstance(r, VariantRefusal)
    assert "\n" not in r.reason
    assert r.reason.startswith("no variant of smollm2@1 fits: ")
    assert "fp16-cuda needs hardware class jetson-orin, board is pi-zero-2w" in r.reason
    assert "int8 needs 4.0 GiB RAM, board has 0.5 GiB" in r.reason
    assert "int4 needs 0.8 GiB RAM, board has 0.5 GiB" in r.reason
    # An x86 host gets nothing from an arm-only release; a Jetson without the GPU wheel is named as such.
    x86 = resolve_variant(board(arch="x86_64", ram_bytes=64 * GiB, cpu_features=["avx2"]), release)
    assert isinstance(x86, VariantRefusal) and "needs arch aarch64, board is x86_64" in x86.reason
    cpu_jetson = board(hardware_class="jetson-orin", ram_bytes=512 * 2**20, cpu_features=ARM_V82)
    r = resolve_variant(cpu_jetson, release)
    assert isinstance(r, VariantRefusal)
    assert "needs CUDAExecutionProvider or TensorrtExecutionProvider, board has CPUExecutionProvider" in r.reason


def test_unreported_capabilities_never_fit_a_rule_but_fit_a_catch_all(release: Release) -> None:
    r = resolve_variant(None, release)
    assert isinstance(r, VariantRefusal) and "did not report" not in r.reason.split(";")[0]
    partial = BoardCapabilities(arch="aarch64", ram_bytes=8 * GiB)  # an agent that reported no features
    r = resolve_variant(partial, release)
    assert isinstance(r, VariantChoice) and r.variant == "int4"
    doc = release.to_obj()
    doc["spec"]["variants"][1]["rules"] = {"cpu_features": ["asimddp"]}
    doc["spec"]["variants"][2]["rules"] = {}
    catch_all = Release.from_obj(doc)
    r = resolve_variant(BoardCapabilities(), catch_all)
    assert isinstance(r, VariantChoice) and r.variant == "int4"
    doc["spec"]["variants"].pop()
    r = resolve_variant(BoardCapabilities(), Release.from_obj(doc))
    assert isinstance(r, VariantRefusal) and "board did not report its CPU features" in r.reason


def test_min_onnxruntime_rule() -> None:
    doc = Release.from_yaml(RELEASE).to_obj()
    doc["spec"]["variants"] = [doc["spec"]["variants"][2]]
    doc["spec"]["variants"][0]["rules"]["min_onnxruntime"] = "1.24"
    rel = Release.from_obj(doc)
    old = resolve_variant(board(ram_bytes=GiB), rel)
    assert isinstance(old, VariantRefusal) and "needs onnxruntime >= 1.24, board has 1.22.0" in old.reason
    assert isinstance(resolve_variant(board(ram_bytes=GiB, onnxruntime_version="1.26.0"), rel), VariantChoice)


def test_release_schema_refuses_bad_documents(release: Release) -> None:
    doc = release.to_obj()
    assert Release.from_obj(doc) == release  # round trip, sizes as bytes
    assert doc["spec"]["variants"][1]["rules"]["min_ram"] == 4 * GiB
    cases = [
        ({**doc, "spec": {"variants": []}}, "variants"),
        ({**doc, "spec": {"variants": [doc["spec"]["variants"][0]] * 2}}, "unique"),
        ({**doc, "kind": "Deployment"}, "kind"),
        ({**doc, "spec": {"variants": [{**doc["spec"]["variants"][0], "rules": {"min_ram": "lots"}}]}}, "not a size"),
        ({**doc, "spec": {"variants": [{**doc["spec"]["variants"][0], "rules": {"gpu": True}}]}}, "gpu"),
    ]
    for bad, expect in cases:
        with pytest.raises(SchemaError) as ei:
            Release.from_obj(bad)
        assert expect in str(ei.value), (expect, str(ei.value))
    with pytest.raises(SchemaError):
        Release.from_yaml("- not a mapping")
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("4GB") == 4 * 10**9 and parse_size(10) == 10


def test_capabilities_travel_in_reported_state_and_telemetry() -> None:
    caps = board(hardware_class="pi5", ram_bytes=8 * GiB, cpu_features=ARM_V82)
    now = dt.datetime.now(dt.timezone.utc)
    rep = contract.ReportedState(device_id="d", state="idle", agent_version="1", capabilities=caps, ts=now)
    back = contract.ReportedState.from_bytes(rep.to_bytes())
    assert back.capabilities == caps
    assert b'"schema":"nanofleet.capabilities/1"' in rep.to_bytes()
    tel = contract.Telemetry.from_bytes(contract.Telemetry(device_id="d", seq=1, ts=now, capabilities=caps).to_bytes())
    assert tel.capabilities == caps
    # A newer board's extra fields are ignored; an unknown major is refused.
    assert BoardCapabilities.from_obj({**caps.to_json(), "npu": "hailo-8"}) == caps
    with pytest.raises(SchemaError):
        BoardCapabilities.from_obj({**caps.to_json(), "schema": "nanofleet.capabilities/2"})


def test_a_deployment_names_a_bundle_or_a_release() -> None:
    base = {"apiVersion": "nanofleet/v1", "kind": "Deployment", "metadata": {"name": "d"}}
    rel = DeploymentManifest.from_obj({**base, "spec": {"release": {"name": "smollm2", "version": 1}}})
    assert rel.spec.release is not None and rel.spec.bundle is None
    for spec in ({}, {"release": {"name": "r", "version": 1}, "bundle": {"name": "b", "version": 1}}):
        with pytest.raises(SchemaError) as ei:
            DeploymentManifest.from_obj({**base, "spec": spec})
        assert "exactly one of spec.bundle or spec.release" in str(ei.value)


def test_the_example_release_sends_each_board_its_variant() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "release.yaml"
    rel = Release.from_yaml(example.read_bytes())
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    boards = {
        "jetson": board(
            hardware_class="jetson-orin-nano", ram_bytes=8 * GiB, cpu_features=ARM_V82, execution_providers=cuda
        ),
        "pi5": board(hardware_class="pi5", ram_bytes=8 * GiB, cpu_features=ARM_V82),
        "pi4": board(hardware_class="pi4", ram_bytes=4 * GiB, cpu_features=ARM_V8),
        "zero": board(hardware_class="pi-zero-2w", ram_bytes=512 * 2**20, cpu_features=ARM_V8),
    }
    got = {k: resolve_variant(c, rel) for k, c in boards.items()}
    assert {k: getattr(v, "variant", None) for k, v in got.items()} == {
        "jetson": "fp16-cuda", "pi5": "int8", "pi4": "int4", "zero": "int4",
    }
    tiny = resolve_variant(board(ram_bytes=256 * 2**20, cpu_features=ARM_V8), rel)
    assert isinstance(tiny, VariantRefusal) and "int4 needs 0.5 GiB RAM, board has 0.2 GiB" in tiny.reason
