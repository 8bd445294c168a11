"""export/fuse_gqa.py + the engine's "gqa" driver against torch, on tiny random-weight models (fast), and
on the default model when its checkpoint is there (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device.engine import Engine, EngineOptions, SamplingParams, arch_from_hf_config
from export.fuse_gqa import FuseGqaError, build_gqa_folder, build_gqa_model, gqa_graph_spec

from .conftest import FP32_DIR, HF_DIR, require

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def tiny_checkpoint(tmp: Path, model_type: str, tied: bool):  # noqa: ANN201
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **TINY, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp / "hf")
    return model


def torch_logits(model, ids: list[int]) -> np.ndarray:  # noqa: ANN001
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize(
    "model_type, tied", [("llama", True), ("llama", False), ("qwen2", False), ("mistral", True)]
)
def test_tiny_gqa_graph_matches_torch(tmp_path: Path, model_type: str, tied: bool) -> None:
    model = tiny_checkpoint(tmp_path, model_type, tied)
    spec = build_gqa_folder(tmp_path / "hf", tmp_path / "onnx")
    arch = arch_from_hf_config(tmp_path / "hf" / "config.json")
    ids = np.random.default_rng(1).integers(3, 256, size=40).tolist()
    ref = torch_logits(model, ids)  # [40, vocab]
    for chunk in (40, 7, 1):  # one pass, chunked prefill, token by token: all through the shared buffer
        with Engine.from_parts(
            tmp_path / "onnx", arch, spec, EngineOptions(threads=1, prefill_chunk=chunk)
        ) as e:
            state = e.new_state(40)
            got = np.concatenate([e.forward(state, ids[i : i + chunk]) for i in range(0, 40, chunk)])
            np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
            assert state.n_past == 40
            # last_only: the LM head runs for the last row only, with the same result
            state = e.new_state(40)
            last = e.forward(state, ids, last_only=True)
            assert last.shape == (1, 256)
            np.testing.assert_allclose(last[0], ref[-1], atol=2e-4, rtol=1e-3)


def test_tiny_gqa_greedy_and_buffer_growth(tmp_path: Path) -> None:
    import torch

    model = tiny_checkpoint(tmp_path, "llama", True)
    spec = build_gqa_folder(tmp_path / "hf", tmp_path / "onnx")
    arch = arch_from_hf_config(tmp_path / "hf" / "config.json")
    with Engine.from_parts(tmp_path / "onnx", arch, spec, EngineOptions(threads=1)) as e:
        prompt = [1, 17, 42, 99]
        with torch.no_grad():
            expected = model.generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0
            )[0, 4:].tolist()
        assert e.greedy(prompt, 20) == expected
        tokens, gaps = e.greedy_with_margins(prompt, 20)
        assert tokens == expected and len(gaps) == 20 and min(gaps) >= 0.0
        first = np.sort(torch_logits(model, prompt)[-1])  # [vocab]: the gap of the first greedy choice
        assert gaps[0] == pytest.approx(float(first[-1] - first[-2]), abs=1e-3)
        # a state reserved too small grows (copying once) and stays exact
        state = e.new_state(4)
        assert state.capacity == 64
        logits = e.forward(state, list(range(3, 3 + 70)))
        np.testing.assert_allclose(logits, torch_logits(model, list(range(3, 73))), atol=2e-4, rtol=1e-3)
        assert state.capacity == 128
        # sampling with a seed is reproducible through the same driver
        p = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
        assert list(e.generate(prompt, p)) == list(e.generate(prompt, p))


def test_unsupported_architectures_are_named() -> None:
    with pytest.raises(FuseGqaError, match="gpt2"):
        build_gqa_model({"model_type": "gpt2"}, {})
    with pytest.raises(FuseGqaError, match="gelu"):
        build_gqa_model({"model_type": "llama", "hidden_act": "gelu"}, {})
    spec = gqa_graph_spec(2)
    assert spec.kind == "gqa" and spec.shared_kv_buffer and "seqlens_k" in spec.input_names


@pytest.fixture(scope="session")
def default_gqa_dir() -> Path:
    """The default model's GQA graph, built once and cached beside the other test artefacts."""
    import hashlib

    import export.fuse_gqa as fuse

    digest = hashlib.sha256(Path(fuse.__file__).read_bytes()).hexdigest()[:10]
    out = FP32_DIR.parent / f"test-gqa-fp32-smollm2-{digest}"
    if not (out / "model.onnx").is_file():
        build_gqa_folder(require(HF_DIR / "model.safetensors").parent, out)
    return out


@pytest.mark.slow
def test_default_model_gqa_equals_optimum_graph(default_gqa_dir: Path, fp32_engine: Engine) -> None:
    arch = fp32_engine.arch
    with Engine.from_parts(
        default_gqa_dir, arch, gqa_graph_spec(arch.num_layers), EngineOptions(threads=2)
    ) as g:
        prompt = fp32_engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        assert g.greedy(prompt, 24) == fp32_engine.greedy(prompt, 24)
        ids = fp32_engine.encode("The quick brown fox jumps over the lazy dog near the river bank. " * 4)
        assert g.perplexity(ids) == pytest.approx(fp32_engine.perplexity(ids), rel=1e-4)


def test_weights_past_the_protobuf_limit_go_to_external_data(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A TinyLlama-size graph (4.4 GB of fp32) cannot be one protobuf: protobuf refuses to even measure it, so
    the size check sums the weights and saves them as external data. Shown with the limit lowered."""
    import export.fuse_gqa as fuse_gqa

    model = tiny_checkpoint(tmp_path, "llama", True)
    monkeypatch.setattr(fuse_gqa, "PROTOBUF_LIMIT", 64 * 1024**2 + 1000)  # threshold: 1000 bytes of weights
    spec = build_gqa_folder(tmp_path / "hf", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.onnx_data").stat().st_size > 100_000
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size < 100_000
    arch = arch_from_hf_config(tmp_path / "hf" / "config.json")
    ids = list(range(3, 23))
    with Engine.from_parts(tmp_path / "onnx", arch, spec, EngineOptions(threads=1)) as e:
        state = e.new_state(len(ids))
        got = e.forward(state, np.asarray(ids))  # [20, vocab]
    np.testing.assert_allclose(got, torch_logits(model, ids), atol=1e-3, rtol=1e-3)
