"""Fixtures over the fp32 optimum export of the default model (.cache/onnx-fp32-smollm2, built on first use
by tests/device_engine/artifacts.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device.engine import Engine, EngineOptions, arch_from_hf_config, optimum_kv_graph

from . import artifacts

REPO = artifacts.REPO
FP32_DIR = artifacts.FP32_DIR
HF_DIR = artifacts.HF_DIR


def require(path: Path) -> Path:
    """``path`` inside one of the cached artefacts, building that artefact first if needed."""
    if not path.exists():
        if path.is_relative_to(FP32_DIR):
            artifacts.fp32_dir()
        elif path.is_relative_to(HF_DIR):
            artifacts.hf_dir()
    if not path.exists():
        pytest.fail(f"{path} is missing after building the test artefacts")
    return path


@pytest.fixture(scope="session")
def fp32_dir() -> Path:
    return require(FP32_DIR / "model.onnx").parent


_ENGINES: dict[str, Engine] = {}


def shared_fp32_engine() -> Engine:
    """One fp32 engine per test session, shared by tests/device_engine and tests/device_api (540 MB)."""
    if "fp32" not in _ENGINES or _ENGINES["fp32"].closed:
        root = require(FP32_DIR / "model.onnx").parent
        arch = arch_from_hf_config(root / "config.json")
        _ENGINES["fp32"] = Engine.from_parts(
            root, arch, optimum_kv_graph(arch.num_layers), EngineOptions(threads=2, spin_wait=False)
        )
    return _ENGINES["fp32"]


@pytest.fixture(scope="session")
def fp32_engine() -> Iterator[Engine]:
    yield shared_fp32_engine()


@pytest.fixture(scope="session")
def torch_model():  # noqa: ANN201 - torch in tests only
    require(HF_DIR / "model.safetensors")
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(HF_DIR), torch_dtype=torch.float32)
    model.eval()
    return model
