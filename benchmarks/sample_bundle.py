"""A small but well-formed signed bundle, for the load generator and the tests: the fleet never runs the
model, it only stores, signs over and serves the files, so a few KiB of placeholder bytes stand in for one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

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
    write_signed_manifest,
)

BUNDLE = "tiny-model"


def make_bundle(root: Path, key: SigningKey, version: int, *, name: str = BUNDLE, size: int = 4096) -> Path:
    """A small but well-formed signed bundle (the fleet never runs the model, only stores and serves it)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(bytes((i * 7 + version) % 256 for i in range(size)))
    (root / "tokenizer.json").write_text(f'{{"version": "1.0", "v": {version}}}')
    manifest = BundleManifest(
        name=name,
        version=version,
        created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        arch=ArchConfig(
            architecture="llama",
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_kv_heads=2,
            head_dim=16,
            vocab_size=1000,
            context_length=256,
        ),
        graph=GraphSpec(kind="optimum-kv", input_names=["input_ids"], output_names=["logits"]),
        runtime=Runtime(target="arm64", min_onnxruntime="1.20", operators=["ai.onnx:MatMul"]),
        recipe=Recipe(precision="int8", method="matmulnbits", bits=8, block_size=32),
        files=[
            describe_file(root, "model.onnx", "model"),
            describe_file(root, "tokenizer.json", "tokenizer"),
        ],
        golden=GoldenCheck(prompt_token_ids=[1, 2], expected_token_ids=[3, 4], latency_budget_ms=1000),
        provenance=Provenance(source="test", source_kind="folder"),
    )
    write_signed_manifest(root, manifest, key)
    return root
