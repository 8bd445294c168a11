"""The INT8 recipe's graph surgery on a tiny tied-embedding llama: one shared 8-bit table, correct numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import export_onnx
from export.quantize import RECIPES, min_onnxruntime, operators, quantize


def tiny_tied_llama():  # noqa: ANN201 - a transformers LlamaForCausalLM (torch is imported lazily)
    """2 layers, hidden 64, GQA 4/2 heads, vocabulary 300, tied embeddings; seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tied_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    model = tiny_tied_llama()
    with torch.no_grad():  # larger weights than the init's std 0.02, so logits are far from uniform
        for p in model.parameters():
            p.mul_(8.0) if p.dim() == 2 else None
    return export_onnx(model, tmp_path_factory.mktemp("tied") / "fp32")


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1])[None],
    }
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, 2, 0, 16), np.float32)  # [batch, kv_heads, 0, head_dim]
    return s.run(["logits"], feeds)[0][0]  # [seq, vocab]


def test_int8_shares_one_quantized_table_between_embedding_and_lm_head(tied_fp32: Path, tmp_path: Path) -> None:
    out = quantize(tied_fp32, tmp_path / "q", RECIPES["int8"])
    assert "embedding-8bit-shared-with-lm-head" in out.notes
    g = onnx.load(str(out.model_path)).graph
    gbq = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1
    producer = {o: n for n in g.node for o in n.output}
    reshape = producer[gbq[0].input[0]]
    assert reshape.op_type == "Reshape"
    shared = reshape.input[0]
    users = [n.op_type for n in g.node if shared in n.input]
    assert sorted(users) == ["MatMulNBits", "Reshape"]
    # No float copy of the table is left: every 2-D+ float initializer is far smaller than vocab x hidden.
    floats = [t for t in g.initializer if t.data_type == 1 and np.prod(t.dims) >= 300 * 64]
    assert floats == []
    assert "com.microsoft:GatherBlockQuantized" in operators(out.model_path)
    assert min_onnxruntime(operators(out.model_path), RECIPES["int8"]) == "1.26"

    ids = np.array([[5, 17, 42, 99, 123, 250, 7, 8]], dtype=np.int64)
    ref, got = _logits(tied_fp32, ids), _logits(out.model_path, ids)
    # A wrong layout of the shared table would give errors of the order of the logits themselves (~100%);
    # 8-bit weights (and accuracy_level 4's int8 activations) give a few percent.
    rel_rms = np.sqrt(np.mean((ref - got) ** 2) / np.mean(ref**2))
    assert rel_rms < 0.05, rel_rms
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.75


def test_fp32_embeddings_recipe_keeps_the_table_float(tied_fp32: Path, tmp_path: Path) -> None:
    out = quantize(tied_fp32, tmp_path / "q", RECIPES["int8-fp32-embeddings"])
    g = onnx.load(str(out.model_path)).graph
    assert not any(n.op_type == "GatherBlockQuantized" for n in g.node)
    assert any(n.op_type == "MatMulNBits" for n in g.node)


def test_int4_keeps_head_8bit(tied_fp32: Path, tmp_path: Path) -> None:
    out = quantize(tied_fp32, tmp_path / "q", RECIPES["int4"])
    g = onnx.load(str(out.model_path)).graph
    bits = sorted({a.i for n in g.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"})
    assert bits == [4, 8]
    assert any(n.op_type == "GatherBlockQuantized" for n in g.node)


def test_asymmetric_head_is_not_shared_with_the_embedding(tied_fp32: Path, tmp_path: Path) -> None:
    """Zero points would be lost through GatherBlockQuantized's implicit 128: the table gets its own copy."""
    from dataclasses import replace

    out = quantize(tied_fp32, tmp_path / "q", replace(RECIPES["int8"], name="int8-asym", symmetric=False))
    assert "embedding-8bit" in out.notes and "embedding-8bit-shared-with-lm-head" not in out.notes
    ids = np.array([[5, 17, 42, 99, 123, 250, 7, 8]], dtype=np.int64)
    ref, got = _logits(tied_fp32, ids), _logits(out.model_path, ids)
    assert np.sqrt(np.mean((ref - got) ** 2) / np.mean(ref**2)) < 0.05
