"""The direct builder (export/direct.py) against optimum's traced export, which stays its reference: the fused
graph written from the checkpoint's tensors computes what optimum's graph computes (fp32), the quantized graphs
equal the traced path's bit for bit, the streamed fp32 reference equals transformers' whole model, the GGUF
reader equals transformers' GGUF loader, and the builder holds about one layer in memory, not the model."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import fuse_gqa
from export.archs import ARCHITECTURES, spec_for
from export.checkpoint import GGUFCheckpoint, MissingTensorError, SafetensorsReader
from export.direct import build_direct
from export.errors import CorruptSourceError, ExportError
from export.quantize import RECIPES, quantize
from export.reference import StreamedReference

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)  # fmt: skip
# llama untied and tied, mistral with a sliding window shorter than the test sequence, qwen2 with q/k/v biases
CASES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 8},
    "qwen2": {},
}
IDS = np.random.default_rng(0).integers(0, 256, 24)


def _model(case: str, root: Path, **extra: Any) -> tuple[Any, Any, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = case.split("-")[0]
    cfg = AutoConfig.for_model(model_type, **{**TINY, **CASES[case], **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    folder = root / case
    model.save_pretrained(folder)
    return cfg, model, folder


def _gqa_logits(model_path: Path, cfg: Any, ids: np.ndarray) -> np.ndarray:
    """All positions' logits of a gqa graph in one pass (empty KV cache)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    n, nkv = ids.shape[0], cfg.num_key_value_heads
    hd = cfg.hidden_size // cfg.num_attention_heads
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids[None].astype(np.int64),
        "seqlens_k": np.array([n - 1], np.int32),
        "total_sequence_length": np.array(n, np.int32),
        "logits_index": np.arange(n, dtype=np.int64),
    }
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, nkv, cfg.max_position_embeddings, hd), np.float32)
    return sess.run(["logits"], feeds)[0][0]  # [n, vocab]


def _optimum_logits(model_path: Path, ids: np.ndarray, cfg: Any) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    n, hd = ids.shape[0], cfg.hidden_size // cfg.num_attention_heads
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids[None].astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, n), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(n, dtype=np.int64)[None]
        else:
            feeds[inp.name] = np.zeros((1, cfg.num_key_value_heads, 0, hd), np.float32)
    return sess.run(["logits"], feeds)[0][0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_fp32_graph_computes_what_optimums_graph_computes(case: str, tmp_path: Path) -> None:
    from export.onnx_export import export_onnx

    cfg, model, folder = _model(case, tmp_path)
    ck = SafetensorsReader(folder)
    built = build_direct(cfg.to_dict(), ck.get, ck.has, tmp_path / "direct", None, cfg.max_position_embeddings)
    traced = export_onnx(model, tmp_path / "optimum")
    got, want = _gqa_logits(built.outcome.model_path, cfg, IDS), _optimum_logits(traced, IDS, cfg)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-4 * scale + 1e-5, np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("recipe", ["int8", "int8-fp32-embeddings", "int4", "int4-b64"])
def test_direct_quantized_graph_equals_the_traced_paths(case: str, recipe: str, tmp_path: Path) -> None:
    """Same quantizer, same layout: the direct build of a recipe computes exactly what the traced path's
    quantization of the fused graph computes, and records the same graph changes."""
    cfg, model, folder = _model(case, tmp_path)
    ck = SafetensorsReader(folder)
    inline = fuse_gqa.build_gqa_model(cfg.to_dict(), fuse_gqa.weights_from_torch(model), cfg.max_position_embeddings)
    fuse_gqa.save_model(inline, tmp_path / "fp32")
    traced = quantize(tmp_path / "fp32" / "model.onnx", tmp_path / "traced", RECIPES[recipe])
    out = tmp_path / "direct"
    built = build_direct(cfg.to_dict(), ck.get, ck.has, out, RECIPES[recipe], cfg.max_position_embeddings)
    np.testing.assert_array_equal(_gqa_logits(built.outcome.model_path, cfg, IDS),
                                  _gqa_logits(traced.model_path, cfg, IDS))  # fmt: skip
    assert built.outcome.notes == traced.notes
    # the weights went to external data as they were written; the proto holds references
    assert (out / "model.onnx_data").stat().st_size > 10 * (out / "model.onnx").stat().st_size


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_reference_equals_the_whole_transformers_model(case: str, tmp_path: Path) -> None:
    import torch

    cfg, model, folder = _model(case, tmp_path)
    ck = SafetensorsReader(folder)
    ref = StreamedReference(cfg, spec_for(cfg).direct, IDS.tolist(), tied=bool(cfg.tie_word_embeddings))  # type: ignore[arg-type]
    build_direct(cfg.to_dict(), ck.get, ck.has, tmp_path / "d", RECIPES["int8"], 64, observer=ref)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor(IDS)[None]).logits[0, :-1].double(), -1).numpy()
    assert ref.targets is not None and ref.log_probs is not None
    np.testing.assert_array_equal(ref.targets, IDS[1:])
    np.testing.assert_allclose(ref.log_probs, want, atol=2e-5)


def test_the_builder_holds_about_one_layer_not_the_model(tmp_path: Path) -> None:
    """12 layers streamed: numpy's peak stays near the embedding table plus a few layers' worth of arrays
    (the layer's fp32 tensors, their packed QKV / gate|up copies, the quantizer's output)."""
    cfg, _model_, folder = _model("llama", tmp_path, num_hidden_layers=12, hidden_size=256, intermediate_size=768,
                                  vocab_size=512)  # fmt: skip
    ck = SafetensorsReader(folder)
    layer = 4 * (4 * 256 * 256 + 3 * 256 * 768)  # q (and o) 256x256, k/v half: generously 4; gate/up/down
    table = 4 * 512 * 256
    total = 12 * layer + 2 * table
    tracemalloc.start()
    try:
        build_direct(cfg.to_dict(), ck.get, ck.has, tmp_path / "d", RECIPES["int8"], 64)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * layer + 2 * table, (peak, layer, total)
    assert peak < total / 3


def test_named_errors_for_bad_checkpoints(tmp_path: Path) -> None:
    cfg, _model_, folder = _model("llama", tmp_path)
    ck = SafetensorsReader(folder)

    def without_down(name: str) -> bool:
        return ck.has(name) and "layers.1.mlp.down_proj" not in name

    with pytest.raises(ExportError, match=r"checkpoint lacks model\.layers\.1\.mlp\.down_proj\.weight"):
        build_direct(cfg.to_dict(), ck.get, without_down, tmp_path / "d", None, 64)
    with pytest.raises(MissingTensorError, match="no tensor nope"):
        ck.get("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptSourceError, match="no \\*.safetensors"):
        SafetensorsReader(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CorruptSourceError, match="cannot read the safetensors"):
        SafetensorsReader(tmp_path / "bad")
    phi3 = ARCHITECTURES["phi3"]
    assert phi3.direct is None and "not supported by the GQA builder" in (phi3.direct_unsupported({}) or "")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gguf_reader_equals_transformers_gguf_loader() -> None:
    """The default model's Q4_1/Q8_0 GGUF, read tensor by tensor (with llama.cpp's Q/K permutation undone),
    gives exactly the weights transformers' GGUF loader gives the torch model."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from export.sources import default_gguf

    path = default_gguf()
    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    ck = GGUFCheckpoint(path, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers)
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    want = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    names = spec_for(cfg).direct.names  # type: ignore[union-attr]
    checked = [names.embed, names.final_norm, *names.layer(0).values(), *names.layer(29).values()]
    checked = [n for n in checked if n in want]
    assert len(checked) == 2 + 2 * 9
    for name in checked:
        np.testing.assert_array_equal(ck.get(name), want[name].float().numpy(), err_msg=name)
    assert not ck.has(names.lm_head)  # tied: the GGUF has no output.weight
