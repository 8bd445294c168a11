"""Fixtures for the build side's tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.export.bundle_cache import cached_bundle
from tests.export.models import REDUCED_TINYLLAMA, save_random_model, tinyllama_config

REPO = Path(__file__).resolve().parents[2]


def run_cli(args: Sequence[str], *, timeout: float = 600, env: dict | None = None, cwd: Path | None = None):
    """`nanofleet ARGS` in a real subprocess; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nanofleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or REPO,
    )


@pytest.fixture(scope="session")
def fp32_bundle() -> tuple[Path, Path]:
    """The default model's fp32 reference bundle (cached like default_bundle)."""
    bundle, pub, _ = cached_bundle("fp32", ["--precision", "fp32"])
    return bundle, pub


@pytest.fixture(scope="session")
def default_export_summary(default_bundle: tuple[Path, Path]) -> dict:
    _, _, summary = cached_bundle("int8", [])
    return summary


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reduced random-weight TinyLlama (2 layers, head_dim 64, GQA 8:1, vocab 32000) as an HF folder."""
    return save_random_model(
        tmp_path_factory.mktemp("tinyllama") / "tinyllama-reduced", tinyllama_config(**REDUCED_TINYLLAMA)
    )


@pytest.fixture(scope="session")
def micro_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small random llama (fast): for bad-input and interruption tests."""
    cfg = tinyllama_config(
        num_hidden_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=1024,
    )
    return save_random_model(tmp_path_factory.mktemp("micro") / "micro-llama", cfg)


@pytest.fixture(scope="session")
def session_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from manifests import write_keypair

    priv, pub = write_keypair(tmp_path_factory.mktemp("exportkeys"))
    return priv, pub
