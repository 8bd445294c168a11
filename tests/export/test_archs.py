"""One declarative config per architecture: numbers for the manifest, and tiny random models of each family
exporting to a graph that reproduces torch."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from export.archs import ARCHITECTURES, spec_for, supported_architectures
from export.errors import UnsupportedArchitectureError
from export.onnx_export import export_onnx, validate_against_torch
from manifests import BundleManifest, TrustStore, verify_bundle
from tests.export.conftest import run_cli
from tests.export.models import tinyllama_config

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
EXTRA = {"gemma2": {"head_dim": 16}, "phi3": {"pad_token_id": 0}}


def test_full_tinyllama_config_gives_its_real_shapes() -> None:
    cfg = tinyllama_config()
    arch = spec_for(cfg).arch_config(cfg)
    assert (arch.num_layers, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (22, 32, 4, 64)
    assert (arch.hidden_size, arch.vocab_size, arch.context_length) == (2048, 32000, 2048)
    assert arch.bos_token_id == 1 and arch.eos_token_ids == [2] and not arch.tie_word_embeddings


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError) as err:
        spec_for(GPT2Config())
    for name in supported_architectures():
        assert name in err.value.message
    assert "'gpt2'" in err.value.message


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_tiny_random_model_of_each_family_exports_and_matches_torch(model_type: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **TINY, **EXTRA.get(model_type, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    spec = spec_for(cfg)
    arch = spec.arch_config(cfg)
    path = export_onnx(model, tmp_path / model_type)
    res = validate_against_torch(model, path, arch, list(range(3, 40)))  # checks present.* shapes too
    assert res.argmax_agreement >= 0.9
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert ("position_ids" in names) is spec.takes_position_ids


@pytest.mark.slow
def test_reduced_tinyllama_exports_with_the_right_shapes(
    tiny_llama_dir: Path, tmp_path: Path, session_key
) -> None:
    priv, pub = session_key
    out = tmp_path / "tl"
    # Random weights: the quality metrics say nothing here, so the gate is opened wide.
    proc = run_cli(
        [
            "export",
            "--model",
            str(tiny_llama_dir),
            "--key",
            str(priv),
            "--out",
            str(out),
            "--json",
            "--max-ppl-increase",
            "100",
            "--max-kl",
            "100",
            "--min-top-match",
            "0",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m: BundleManifest = verify_bundle(out, TrustStore.from_paths([pub]))
    a = m.arch
    assert (a.num_layers, a.num_attention_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (
        2,
        8,
        1,
        64,
        32000,
    )
    assert m.provenance.source_kind == "folder" and m.provenance.source_sha256
    assert not a.tie_word_embeddings
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kv = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert kv["past_key_values.1.key"][1] == 1 and kv["past_key_values.1.key"][3] == 64
    # the default graph for llama is the fused one: packed qkv, o, packed gate|up, down per layer + lm_head
    assert m.graph.kind == "gqa" and sum(1 for n in g.node if n.op_type == "GroupQueryAttention") == 2
    assert sum(1 for n in g.node if n.op_type == "MatMulNBits") == 2 * 4 + 1
    assert any(n.op_type == "GatherBlockQuantized" for n in g.node)  # untied table quantized on its own
    assert json.loads(proc.stdout)["recipe"] == "int8"
