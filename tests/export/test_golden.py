"""Golden test: greedy tokens of the exported fp32 ONNX (run by the device engine) equal torch's."""

from __future__ import annotations

from pathlib import Path

import pytest

from manifests import TrustStore

# Building the cached bundles takes minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PROMPTS = [
    "The capital of France is",
    "Question: What is 2 + 3?\nAnswer:",
    "The three primary colours are",
    "def add(a, b):",
]
NEW_TOKENS = 12


def _torch_greedy(model, ids: list[int], n: int) -> list[int]:
    """Reference: argmax over transformers' forward with its KV cache; EOS not special (as Engine.greedy)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        res = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(input_ids=torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def test_fp32_onnx_greedy_matches_torch(fp32_bundle: tuple[Path, Path]) -> None:
    from device.engine import Engine
    from export.sources import load_model, resolve_source

    bundle, pub = fp32_bundle
    model = load_model(resolve_source(None))  # the same default GGUF the bundle came from
    with Engine.from_bundle(bundle, TrustStore.from_paths([pub])) as engine:
        assert engine.manifest.recipe.precision == "fp32"
        for prompt in PROMPTS:
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False).ids
            assert engine.greedy(ids, NEW_TOKENS) == _torch_greedy(model, ids, NEW_TOKENS), prompt
