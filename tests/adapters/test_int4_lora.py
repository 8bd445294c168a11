"""LoRA slots over a 4-bit base (issue 21), on tiny random models: the packed adapter on the fused q|k|v and gate|up
MatMulNBits weights computes exactly what torch + peft computes over the same 4-bit weights (so what an int4 base
loses against the fp32 fine-tune is the base's rounding, not the slots), and the traced path's quantization
leaves the slots fed instead of baking their rank-0 defaults into constants."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device.engine import Engine, EngineOptions, arch_from_hf_config
from export import fuse_gqa
from export.adapters import pack, read_peft, write_adapter_file
from export.checkpoint import SafetensorsReader
from export.direct import _block_quant, build_direct
from export.quantize import RECIPES, quantize
from manifests import LORA_SITES

from .test_units import ALL, IDS, _adapter, _engine_logp, _model, _peft, _torch_logp

BLOCK = 32


def _dequantized(w: np.ndarray, bits: int) -> np.ndarray:
    """``w`` [out, in] through the recipe's own block quantizer (symmetric, block 32, along ``in``) and back."""
    k = w.shape[1]
    packed, scales = _block_quant(np.ascontiguousarray(w.T), bits, BLOCK, True)  # [out, k/32, 32·bits/8], [out, k/32]
    if bits == 4:  # element 2j in the low nibble of byte j
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(w.shape[0], -1, BLOCK).astype(np.float32) - 8
    else:
        q = packed.reshape(w.shape[0], -1, BLOCK).astype(np.float32) - 128
    return (q * scales[:, :, None]).reshape(w.shape[0], -1)[:, :k]


def _quantize_like_the_recipe(model: Any) -> None:
    """Put the int4 recipe's numbers into a torch model: 4-bit projections, 8-bit embedding table and LM head."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                lin.weight.copy_(torch.from_numpy(_dequantized(lin.weight.numpy(), 4)))
        for table in (model.lm_head.weight, model.model.embed_tokens.weight):
            table.copy_(torch.from_numpy(_dequantized(table.numpy(), 8)))


def _slotted(cfg: Any, graph_dir: Path) -> Engine:
    arch = arch_from_hf_config(cfg.to_dict())
    spec = fuse_gqa.gqa_graph_spec(cfg.num_hidden_layers, lora=fuse_gqa.lora_slots(cfg.to_dict(), LORA_SITES))
    return Engine.from_parts(graph_dir, arch, spec, EngineOptions(threads=1), tokenizer_path=None)


def _packed_adapter(cfg: Any, model: Any, root: Path) -> tuple[Any, Path]:
    pm, peft_dir = _peft(model, root, ALL, r=4, lora_alpha=8, rank_pattern={"k_proj": 2})
    arch = arch_from_hf_config(cfg.to_dict())
    packed = pack(read_peft(peft_dir), arch, fuse_gqa.lora_slots(cfg.to_dict(), LORA_SITES))
    write_adapter_file(packed, root / "a.onnx_adapter", 1, 1)
    return pm, root / "a.onnx_adapter"


def test_an_int4_base_with_a_lora_computes_torch_peft_over_the_same_4bit_weights(tmp_path: Path) -> None:
    cfg, _m, folder = _model("llama", tmp_path)
    ck = SafetensorsReader(folder)
    # accuracy_level 0: MatMulNBits dequantizes to fp32, so only the weights' rounding is left to compare
    recipe = replace(RECIPES["int4"], accuracy_level=None)
    build_direct(cfg.to_dict(), ck.get, ck.has, tmp_path / "int4", recipe, 64, lora_sites=LORA_SITES)
    _cfg, fp32, _f = _model("llama", tmp_path / "fp32")
    fp32_peft, _ = _peft(fp32, tmp_path / "fp32", ALL, r=4, lora_alpha=8, rank_pattern={"k_proj": 2})
    _cfg, sim, _f = _model("llama", tmp_path / "sim")
    _quantize_like_the_recipe(sim)
    pm, adapter_file = _packed_adapter(cfg, sim, tmp_path / "sim")
    with _slotted(cfg, tmp_path / "int4") as engine:
        adapter = _adapter(engine, adapter_file)
        got, got_base = _engine_logp(engine, IDS, adapter), _engine_logp(engine, IDS)
    want = _torch_logp(pm, IDS)
    with pm.disable_adapter():
        want_base = _torch_logp(pm, IDS)
    np.testing.assert_allclose(got_base, want_base, atol=5e-4)
    np.testing.assert_allclose(got, want, atol=5e-4)
    assert np.abs(got - got_base).max() > 0.05  # the adapter changes the model
    # and the 4-bit rounding is visible at this tolerance: the comparison can tell int4 from fp32 weights
    assert np.abs(got - _torch_logp(fp32_peft, IDS)).max() > 10 * 5e-4


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_the_traced_quantization_keeps_the_lora_slots_fed(recipe: str, tmp_path: Path) -> None:
    """quantize() on the fused fp32 graph: the slots' rank-0 defaults are constants to onnxruntime's quantizer
    (and an all-zero [K, 0] weight lies on every grid); a quantized slot would ignore the adapter fed to it."""
    import onnx

    cfg, model, folder = _model("llama", tmp_path)
    fuse_gqa.save_model(fuse_gqa.build_gqa_model(cfg.to_dict(), fuse_gqa.weights_from_torch(model), 64, LORA_SITES),
                        tmp_path / "fp32")  # fmt: skip
    traced = quantize(tmp_path / "fp32" / "model.onnx", tmp_path / "traced", RECIPES[recipe])
    ck = SafetensorsReader(folder)
    build_direct(cfg.to_dict(), ck.get, ck.has, tmp_path / "direct", RECIPES[recipe], 64, lora_sites=LORA_SITES)
    g = onnx.load(str(traced.model_path), load_external_data=False).graph
    lora = [n for n in g.node if "/lora/" in n.name]
    assert {n.op_type for n in lora} == {"MatMul", "Add"} and len(lora) == 3 * len(LORA_SITES) * cfg.num_hidden_layers
    _pm, adapter_file = _packed_adapter(cfg, model, tmp_path)
    with _slotted(cfg, traced.model_path.parent) as t, _slotted(cfg, tmp_path / "direct") as d:
        got, base = _engine_logp(t, IDS, _adapter(t, adapter_file)), _engine_logp(t, IDS)
        np.testing.assert_allclose(got, _engine_logp(d, IDS, _adapter(d, adapter_file)), atol=1e-5)
        np.testing.assert_allclose(base, _engine_logp(d, IDS), atol=1e-5)
    assert np.abs(got - base).max() > 0.05
