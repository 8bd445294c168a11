"""check_runtime_compat: refuses, naming every unmet need, a bundle the local onnxruntime cannot run."""

from __future__ import annotations

import datetime as dt

import pytest

from manifests import ArchConfig, BundleManifest, GraphSpec, Provenance, Recipe, Runtime
from manifests.runtime_compat import (
    RuntimeIncompatibleError,
    check_local_runtime,
    check_runtime_compat,
    local_onnxruntime,
    normalize_op,
    parse_version,
    table_ops,
    version_at_least,
)

BASE_OPS = [
    "ai.onnx:Add",
    "ai.onnx:MatMul",
    "com.microsoft:MatMulNBits",
    "com.microsoft:GatherBlockQuantized",
]


def make_manifest(
    operators: list[str], min_ort: str = "1.20", bits: int | None = 8, verified: list[str] | None = None
) -> BundleManifest:
    return BundleManifest(
        name="m",
        version=1,
        created_at=dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc),
        arch=ArchConfig(
            architecture="llama",
            num_layers=1,
            hidden_size=8,
            num_attention_heads=1,
            num_kv_heads=1,
            head_dim=8,
            vocab_size=16,
            context_length=32,
        ),  # fmt: skip
        graph=GraphSpec(kind="optimum-kv", input_names=["input_ids"], output_names=["logits"]),
        runtime=Runtime(
            target="arm64", min_onnxruntime=min_ort, operators=operators, verified_onnxruntime=verified or []
        ),  # fmt: skip
        recipe=Recipe(precision="int8", method="matmulnbits", bits=bits, block_size=32),
        files=[],
        provenance=Provenance(source="test", source_kind="folder"),
    )


def test_versions_parse_and_compare() -> None:
    assert parse_version("1.26.0") == (1, 26, 0)
    assert parse_version("1.22.0.dev20250101") == (1, 22, 0)
    assert parse_version("1.26rc1") == (1, 26)
    assert version_at_least("1.26.0", "1.26")
    assert version_at_least("1.32.0", "1.26")
    assert not version_at_least("1.22.1", "1.26")
    assert not version_at_least("1.9", "1.26")  # numeric, not string, comparison
    with pytest.raises(ValueError):
        parse_version("banana")


def test_default_domain_spellings_are_one() -> None:
    assert (
        normalize_op("MatMul") == normalize_op(":MatMul") == normalize_op("onnx:MatMul") == "ai.onnx:MatMul"
    )
    assert normalize_op("com.microsoft:MatMulNBits") == "com.microsoft:MatMulNBits"


def test_compatible_bundle_passes_with_a_warning_for_an_unverified_version() -> None:
    report = check_runtime_compat(make_manifest(BASE_OPS, verified=["1.26"]), "1.32.0", BASE_OPS)
    assert report.ops_source == "runtime"
    assert any("not among the versions" in w for w in report.warnings)
    assert check_runtime_compat(make_manifest(BASE_OPS, verified=["1.32"]), "1.32.0", BASE_OPS).warnings == []


def test_missing_operator_is_refused_by_name() -> None:
    needs = [*BASE_OPS, "com.microsoft:GatedDeltaNet"]
    with pytest.raises(RuntimeIncompatibleError) as err:
        check_runtime_compat(make_manifest(needs), "1.26.0", BASE_OPS)
    assert "com.microsoft:GatedDeltaNet" in str(err.value)
    assert "no CPU kernel" in str(err.value)
    assert err.value.reason == "runtime_incompatible"


def test_too_old_runtime_is_refused() -> None:
    with pytest.raises(RuntimeIncompatibleError, match=r"needs onnxruntime >= 1.26, this runtime is 1.24.1"):
        check_runtime_compat(make_manifest(BASE_OPS, min_ort="1.26"), "1.24.1", BASE_OPS)


def test_8bit_matmulnbits_needs_123_even_when_the_op_exists() -> None:
    # 1.22 registers MatMulNBits but implements only 4-bit: the op list alone would let it through.
    with pytest.raises(RuntimeIncompatibleError, match="8-bit MatMulNBits"):
        check_runtime_compat(make_manifest(BASE_OPS, bits=8), "1.22.0", BASE_OPS)
    assert check_runtime_compat(make_manifest(BASE_OPS, bits=4), "1.22.0", BASE_OPS)
    assert check_runtime_compat(make_manifest(BASE_OPS, bits=8), "1.23.2", BASE_OPS)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(RuntimeIncompatibleError) as err:
        check_runtime_compat(make_manifest([*BASE_OPS, "com.x:Nope"], min_ort="1.26"), "1.22.0", BASE_OPS)
    assert len(err.value.problems) == 3


def test_measured_table_is_the_fallback_when_the_runtime_cannot_list_kernels() -> None:
    # 1.26's measured aarch64 kernels lack GatedDeltaNet (added by 1.32).
    with pytest.raises(RuntimeIncompatibleError, match="GatedDeltaNet"):
        check_runtime_compat(make_manifest([*BASE_OPS, "com.microsoft:GatedDeltaNet"]), "1.27.0", None)
    report = check_runtime_compat(make_manifest(BASE_OPS), "1.27.0", None)
    assert report.ops_source == "table:1.26.0"
    assert table_ops("1.10.0") is None
    old = check_runtime_compat(make_manifest(BASE_OPS, min_ort="1.0", bits=4), "1.10.0", None)
    assert old.ops_source == "none" and "not checked" in old.warnings[0]


def test_local_onnxruntime_lists_real_kernels() -> None:
    version, ops = local_onnxruntime()
    assert ops is not None and "com.microsoft:MatMulNBits" in ops and "ai.onnx:MatMul" in ops
    check_local_runtime(make_manifest(BASE_OPS))  # the build machine runs what it builds
    # Constant nodes need no kernel (they become initializers): the exported graphs all have them.
    check_local_runtime(make_manifest([*BASE_OPS, "ai.onnx:Constant"]))
    with pytest.raises(RuntimeIncompatibleError, match=version):
        check_local_runtime(make_manifest([*BASE_OPS, "com.example:Frobnicate"]))
