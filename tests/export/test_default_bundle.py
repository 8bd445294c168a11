"""End-to-end: the real default model (SmolLM2-135M GGUF) through `nanofleet export` (cached fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manifests import TrustStore, verify_bundle
from tests.export.conftest import run_cli

# Building the cached bundles takes minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_manifest_describes_the_default_model(default_bundle: tuple[Path, Path]) -> None:
    bundle, pub = default_bundle
    m = verify_bundle(bundle, TrustStore.from_paths([pub]))
    a = m.arch
    assert (a.architecture, a.num_layers, a.hidden_size) == ("llama", 30, 576)
    assert (a.num_attention_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (9, 3, 64, 49152)
    assert a.tie_word_embeddings and a.eos_token_ids and a.context_length >= 2048
    # the default graph is the fused one (export --graph auto picks gqa for llama)
    assert m.graph.kind == "gqa" and m.graph.shared_kv_buffer
    assert "past_key_values.29.value" in m.graph.input_names and "seqlens_k" in m.graph.input_names
    assert "com.microsoft:GroupQueryAttention" in m.runtime.operators
    assert m.runtime.target == "arm64"
    assert m.runtime.operators == sorted(m.runtime.operators)
    assert "com.microsoft:MatMulNBits" in m.runtime.operators
    assert "com.microsoft:GatherBlockQuantized" in m.runtime.operators
    r = m.recipe
    assert (r.precision, r.method, r.bits, r.block_size, r.symmetric, r.accuracy_level) == (
        "int8",
        "matmulnbits",
        8,
        32,
        True,
        4,
    )
    assert r.quantize_embeddings and "embedding-8bit-shared-with-lm-head" in r.graph_optimizations
    # The GGUF is Q4_1: all 30 x (qkv, o, gate|up, down) weights keep that grid exactly (export/source_grid.py).
    assert r.source_grid_matmuls == 120 and "source-4bit-grid-kept:120-matmuls" in r.graph_optimizations
    roles = {f.role: f.path for f in m.files}
    assert {"model", "tokenizer", "chat_template", "generation_config", "report"} <= set(roles)
    for name in ("manifest.yaml", "manifest.sig", *roles.values()):
        assert (bundle / name).is_file(), name
    assert m.provenance.source_kind == "gguf" and m.provenance.source_sha256
    assert {"torch", "onnxruntime", "optimum"} <= set(m.provenance.tools)
    assert m.expires_at is not None and m.expires_at > m.created_at
    assert m.generation.get("eos_token_id") is not None or a.eos_token_ids


def test_quality_within_two_percent_and_size_under_030x(default_bundle, default_export_summary) -> None:
    bundle, pub = default_bundle
    m = verify_bundle(bundle, TrustStore.from_paths([pub]))
    q = m.quality
    assert q is not None and q.passed
    assert q.ppl_increase_pct <= 2.0, q
    assert q.greedy_agreement >= q.min_greedy_agreement
    assert q.eval_tokens >= 300
    # teacher-forced against fp32 over the whole eval text (export/teacher_forced.py), stable field names
    tf = q.teacher_forced
    assert tf is not None and tf.passed and tf.reference == "fp32" and tf.tokens == q.eval_tokens - 1
    assert 0 < tf.kl_mean <= tf.limits.kl_mean_limit and tf.top_token_match >= tf.limits.top_token_match_limit
    assert tf.ppl_ratio == pytest.approx(1 + q.ppl_increase_pct / 100, abs=1e-4)
    assert tf.limits.note is None  # 500+ tokens: the band is narrow
    assert q.greedy_agreement == pytest.approx(tf.top_token_match, abs=1e-4)
    report = json.loads((bundle / "quality_report.json").read_text())
    assert report["report"]["ppl_quantized"] == q.ppl_quantized
    sizes = default_export_summary["sizes"]
    assert sizes["model_size_ratio"] <= 0.30, sizes


def test_golden_check_replays_on_the_device_engine(default_bundle: tuple[Path, Path]) -> None:
    from device.engine import Engine

    bundle, pub = default_bundle
    with Engine.from_bundle(bundle, TrustStore.from_paths([pub])) as engine:
        golden = engine.manifest.golden
        assert golden is not None and golden.expected_token_ids
        got = engine.greedy(golden.prompt_token_ids, len(golden.expected_token_ids))
    assert got == golden.expected_token_ids


def test_verify_and_inspect_cli_accept_the_bundle(default_bundle: tuple[Path, Path]) -> None:
    bundle, pub = default_bundle
    ok = run_cli(["bundle", "verify", str(bundle), "--pubkey", str(pub), "--json"])
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    ins = run_cli(["bundle", "inspect", str(bundle), "--json"])
    assert ins.returncode == 0, ins.stderr
    assert json.loads(ins.stdout)["recipe"]["method"] == "matmulnbits"


def test_eval_compares_fp32_and_int8(default_bundle, fp32_bundle) -> None:
    proc = run_cli(["eval", str(fp32_bundle[0]), str(default_bundle[0]), "--json"])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    assert [r["recipe"] for r in rows] == ["fp32", "int8/matmulnbits"]
    assert rows[0]["tokens"] >= 300
    assert 0 < rows[1]["vs_first_pct"] <= 2.0, rows
    assert rows[1]["model_bytes"] <= 0.30 * rows[0]["model_bytes"]
