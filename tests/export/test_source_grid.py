"""Keeping a Q4 source's 4-bit grid (export/source_grid.py): exact detection, exact rewrite, recipe wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantize import RECIPES, quantize
from export.source_grid import find_grid, keep_source_grid

BLOCK = 32


def q4_1_weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A [K, N] weight as llama.cpp's Q4_1 stores it and gguf-py dequantizes it: per block of 32 along K,
    fp16 step d and minimum m, q in 0..15 with both ends present (Q4_1 maps a block's min to 0, max to 15)."""
    rng = np.random.default_rng(seed)
    nb = k // BLOCK
    d = (rng.random((n, nb)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-rng.random((n, nb)) * 0.15).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, size=(n, nb, BLOCK)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    w = d[..., None] * q + m[..., None]  # [N, nb, 32], fp32 arithmetic as gguf-py's dequantize
    return np.ascontiguousarray(w.reshape(n, k).T)


def q4_0_weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A [K, N] weight as llama.cpp's Q4_0 stores it: per block, d = (signed value of largest magnitude) / -8,
    q = clip(round(x/d + 8), 0, 15), w = d·(q - 8). Only one end level is sure to be used."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k // BLOCK, BLOCK)).astype(np.float32) * 0.05
    extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    d = (extreme / -8).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(x / d[..., None] + 8), 0, 15)
    return np.ascontiguousarray((d[..., None] * (q - 8)).reshape(n, k).T)


def test_find_grid_recovers_a_q4_0_weight_exactly() -> None:
    w = q4_0_weight(128, 64, seed=5)
    grid = find_grid(w, BLOCK)
    assert grid is not None and grid.q.max() <= 15
    np.testing.assert_allclose(grid.dequantized(), w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_find_grid_recovers_a_q4_1_weight_exactly() -> None:
    w = q4_1_weight(96, 40)
    grid = find_grid(w, BLOCK)
    assert grid is not None
    assert grid.q.shape == (40, 3, BLOCK) and grid.q.max() == 15 and grid.q.min() == 0
    np.testing.assert_allclose(grid.dequantized(), w, rtol=0, atol=1e-6 * np.abs(w).max())
    # MatMulNBits' layout: element 2j in the low nibble of byte j, 2j+1 in the high nibble.
    packed = grid.packed()
    assert packed.shape == (40, 3, BLOCK // 2)
    assert (packed[..., 0] & 0x0F == grid.q[..., 0]).all() and (packed[..., 0] >> 4 == grid.q[..., 1]).all()
    # The offset term adds m + 8·d per block (MatMulNBits subtracts its implicit zero point 8 from q).
    np.testing.assert_allclose(grid.offsets, (grid.mins + 8 * grid.scales).T, rtol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["fp16_weights", "one_value_off_grid", "k_not_multiple_of_block", "float64", "three_dims"],
)
def test_find_grid_refuses_weights_off_the_grid(case: str) -> None:
    w = q4_1_weight(64, 16)
    if case == "fp16_weights":  # an ordinary fp16/bf16 checkpoint: nowhere near a 16-level grid
        w = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float16).astype(np.float32)
    elif case == "one_value_off_grid":  # a hundredth of a step, in one value of one block
        step = (w[:32, 5].max() - w[:32, 5].min()) / 15
        w[7, 5] += 0.01 * step
    elif case == "k_not_multiple_of_block":
        w = w[:48]
    elif case == "float64":
        w = w.astype(np.float64)
    elif case == "three_dims":
        w = w.reshape(2, 32, 16)
    assert find_grid(w, BLOCK) is None


def _graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """y_i = x @ W_i for each weight, all on one input x [batch, seq, K]."""
    k = next(iter(weights.values())).shape[0]
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}") for name in weights]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
        [
            helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, [1, "seq", w.shape[1]])
            for n, w in weights.items()
        ],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def test_rewrite_reproduces_the_fp32_matmul_and_leaves_other_weights_alone() -> None:
    weights = {
        "q": q4_1_weight(128, 48, seed=1),
        "gate": q4_1_weight(128, 96, seed=2),
        "plain": np.random.default_rng(3).standard_normal((128, 24)).astype(np.float32),
    }
    model = _graph(weights)
    x = np.random.default_rng(4).standard_normal((1, 5, 128)).astype(np.float32)
    ref = _run(model, x)
    # accuracy_level None: fp32 activations, so the only difference left is float summation order.
    rewrite = keep_source_grid(model, BLOCK, None)
    assert rewrite.kept == ["mm_q", "mm_gate"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2
    # One block-sum product for the shared input x, one offset product per kept weight, the plain MatMul.
    assert [n.name for n in model.graph.node if n.op_type == "MatMul"] == [
        "mm_q/BlockSums",
        "mm_q/Offset",
        "mm_gate/Offset",
        "mm_plain",
    ]
    assert sorted(rewrite.fp32_matmuls) == ["mm_gate/Offset", "mm_q/BlockSums", "mm_q/Offset"]
    assert {t.name for t in model.graph.initializer}.isdisjoint({"q", "gate"})
    onnx.checker.check_model(model)
    got = _run(model, x)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * np.abs(r).max())
    # With accuracy_level 4 (int8 activations per block, the recipe's setting) it stays close, not exact.
    model4 = _graph(weights)
    keep_source_grid(model4, BLOCK, 4)
    for r, g in zip(ref, _run(model4, x), strict=True):
        assert np.sqrt(np.mean((g - r) ** 2) / np.mean(r**2)) < 0.02


def test_rewrite_skips_excluded_nodes_and_shared_weights() -> None:
    w = q4_1_weight(64, 32)
    model = _graph({"a": w})
    model.graph.node.append(helper.make_node("Identity", ["a"], ["a_copy"], name="uses_a_too"))
    assert keep_source_grid(model, BLOCK, 4).kept == []
    model = _graph({"a": w})
    assert keep_source_grid(model, BLOCK, 4, exclude={"mm_a"}).kept == []
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


@pytest.fixture(scope="module")
def q4_llama_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tied-embedding llama whose linear weights lie on a Q4_1 grid, as a Q4_1 GGUF's do."""
    import torch

    from export.onnx_export import export_onnx
    from tests.export.test_quantize import tiny_tied_llama

    model = tiny_tied_llama()
    with torch.no_grad():
        for i, lin in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features != 300):
            n, k = lin.weight.shape
            lin.weight.copy_(torch.from_numpy(q4_1_weight(k, n, seed=10 + i).T.copy()))
        model.model.embed_tokens.weight.mul_(8.0)
    return export_onnx(model, tmp_path_factory.mktemp("q4llama") / "fp32")


def test_int8_recipe_keeps_the_grid_and_requantized_does_not(q4_llama_fp32: Path, tmp_path: Path) -> None:
    from tests.export.test_quantize import _logits

    kept = quantize(q4_llama_fp32, tmp_path / "kept", RECIPES["int8"])
    requantized = quantize(q4_llama_fp32, tmp_path / "req", RECIPES["int8-requantized"])
    # 2 layers x (q, k, v, o, gate, up, down) on the grid; the LM head (tied, fp32 values) is not.
    assert kept.source_grid_matmuls == 14 and "source-4bit-grid-kept:14-matmuls" in kept.notes
    assert requantized.source_grid_matmuls == 0
    assert kept.manifest_recipe(RECIPES["int8"], True).source_grid_matmuls == 14
    g = onnx.load(str(kept.model_path)).graph
    bits = sorted(a.i for n in g.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits")
    assert bits == [4] * 14 + [8]  # the head stays 8-bit, and shares its table with the embedding
    assert any(n.op_type == "GatherBlockQuantized" for n in g.node)
    # The offset term stays fp32: a later 8-bit pass must not have touched it.
    offsets = [n for n in g.node if n.name.endswith("/Offset")]
    assert len(offsets) == 14 and all(n.op_type == "MatMul" for n in offsets)
    assert kept.model_path.stat().st_size < requantized.model_path.stat().st_size

    ids = np.array([[5, 17, 42, 99, 123, 250, 7, 8]], dtype=np.int64)
    ref = _logits(q4_llama_fp32, ids)

    def rel_rms(path: Path) -> float:
        got = _logits(path, ids)
        return float(np.sqrt(np.mean((ref - got) ** 2) / np.mean(ref**2)))

    # Both are close to fp32 (what is left is the 8-bit head and table, and accuracy_level 4's int8
    # activations); keeping the grid must not be worse than re-quantizing the same weights to 8 bits.
    assert rel_rms(kept.model_path) < 0.02
    assert rel_rms(kept.model_path) <= rel_rms(requantized.model_path) * 1.1
