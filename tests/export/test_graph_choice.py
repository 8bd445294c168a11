"""`--graph auto` (the default): the fused gqa graph where the builder supports the architecture, optimum's
graph otherwise, and (traced builder) a fallback with a note when the fused graph does not reproduce the
validated one."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.errors import ExportError
from export.fuse_gqa import FuseGqaError, unsupported_reason
from export.gate import GateThresholds
from export.pipeline import WORK_PREFIX, ExportRequest, run_export
from manifests import SigningKey, read_manifest_unverified

OPEN_GATE = GateThresholds(max_ppl_increase_pct=1000.0, max_kl_mean=100.0, min_top_token_match=0.0)


@pytest.mark.parametrize(
    "config, expect",
    [
        ({"model_type": "llama", "hidden_act": "silu"}, None),
        ({"model_type": "qwen2"}, None),
        ({"model_type": "mistral", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, None),
        ({"model_type": "phi3"}, "model_type 'phi3'"),
        ({"model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh"}, "model_type 'gemma2'"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling 'yarn'"),
    ],
)
def test_unsupported_reason_names_what_the_gqa_builder_lacks(config: dict, expect: str | None) -> None:
    reason = unsupported_reason(config)
    assert reason is None if expect is None else (reason is not None and expect in reason)


def _refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
    raise FuseGqaError("the fused graph does not reproduce the reference (injected)")


def test_auto_falls_back_to_the_optimum_graph_when_the_fused_one_is_refused(
    tmp_path: Path, micro_llama_dir: Path, monkeypatch
) -> None:
    import export.fuse_gqa as fuse_gqa

    monkeypatch.setattr(fuse_gqa, "fuse_for_export", _refuse)
    res = run_export(
        ExportRequest(model=str(micro_llama_dir), key=SigningKey.generate(), out=tmp_path / "b", thresholds=OPEN_GATE,
                      builder="traced")  # fmt: skip
    )
    assert res.passed and res.bundle_dir is not None
    assert read_manifest_unverified(res.bundle_dir).graph.kind == "optimum-kv"
    assert not any(p.name.startswith(WORK_PREFIX) for p in tmp_path.iterdir())


def test_forced_gqa_fails_when_the_fused_graph_is_refused(tmp_path: Path, micro_llama_dir: Path, monkeypatch) -> None:
    import export.fuse_gqa as fuse_gqa

    monkeypatch.setattr(fuse_gqa, "fuse_for_export", _refuse)
    with pytest.raises(ExportError) as err:
        run_export(
            ExportRequest(
                model=str(micro_llama_dir),
                key=SigningKey.generate(),
                out=tmp_path / "b",
                thresholds=OPEN_GATE,
                graph="gqa",
                builder="traced",
            )
        )
    assert "does not reproduce" in str(err.value)
    assert not (tmp_path / "b").exists()
