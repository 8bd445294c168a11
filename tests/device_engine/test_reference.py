"""The engine against the torch reference (torch in tests only): greedy golden tokens and perplexity."""

from __future__ import annotations

import math

import pytest

from device.engine import Engine, EngineOptions, SamplingParams, arch_from_hf_config, optimum_kv_graph

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
TEXT = (
    "The Raspberry Pi is a series of small single-board computers developed in the United Kingdom by the "
    "Raspberry Pi Foundation in association with Broadcom. It is widely used in education, in hobbyist "
    "projects and in industry, where it runs home automation, robots and small servers."
)


def torch_greedy(model, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    import torch

    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True)
        past = res.past_key_values
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
    return out


def torch_perplexity(model, ids: list[int]) -> float:  # noqa: ANN001
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="mean")
    return math.exp(float(nll))


@pytest.mark.slow
@pytest.mark.parametrize("messages", PROMPTS)
def test_greedy_matches_torch(fp32_engine: Engine, torch_model, messages) -> None:  # noqa: ANN001
    prompt = fp32_engine.encode_chat(messages)
    expected = torch_greedy(torch_model, prompt, 24)
    got = fp32_engine.greedy(prompt, 24)
    assert got == expected, (fp32_engine.decode(got), fp32_engine.decode(expected))
    assert len(got) == 24  # greedy never stops at EOS


@pytest.mark.slow
def test_perplexity_matches_torch(fp32_engine: Engine, torch_model) -> None:  # noqa: ANN001
    ids = fp32_engine.encode(TEXT)
    ours = fp32_engine.perplexity(ids)
    ref = torch_perplexity(torch_model, ids)
    assert ours == pytest.approx(ref, rel=2e-3)
    assert 1.0 < ours < 200.0


@pytest.mark.slow
def test_chunked_prefill_is_exact(fp32_dir, fp32_engine: Engine) -> None:  # noqa: ANN001
    """Feeding the prompt 7 tokens at a time through the KV cache gives the same tokens and perplexity."""
    arch = arch_from_hf_config(fp32_dir / "config.json")
    graph = optimum_kv_graph(arch.num_layers)
    small = Engine.from_parts(fp32_dir, arch, graph, EngineOptions(prefill_chunk=7))
    try:
        ids = fp32_engine.encode(TEXT)
        assert small.perplexity(ids) == pytest.approx(fp32_engine.perplexity(ids), rel=1e-4)
        prompt = fp32_engine.encode_chat(PROMPTS[0])
        assert small.greedy(prompt, 8) == fp32_engine.greedy(prompt, 8)
    finally:
        small.close()


@pytest.mark.slow
def test_perplexity_windows_by_context(fp32_dir, fp32_engine: Engine) -> None:  # noqa: ANN001
    """With a 32-token window the text is scored in independent windows: equal to scoring each alone."""
    arch = arch_from_hf_config(fp32_dir / "config.json")
    win = Engine.from_parts(fp32_dir, arch, optimum_kv_graph(arch.num_layers), EngineOptions(max_context=32))
    try:
        ids = fp32_engine.encode(TEXT + " " + TEXT)[:70]
        a, b, c = ids[:32], ids[32:64], ids[64:]
        nll = sum(math.log(fp32_engine.perplexity(w)) * (len(w) - 1) for w in (a, b, c))
        assert win.perplexity(ids) == pytest.approx(math.exp(nll / 67), rel=1e-4)
    finally:
        win.close()


@pytest.mark.slow
def test_generate_temperature_zero_is_greedy_until_eos(fp32_engine: Engine) -> None:
    prompt = fp32_engine.encode_chat(PROMPTS[0])
    greedy = fp32_engine.greedy(prompt, 30)
    stream = fp32_engine.generate(prompt, SamplingParams(max_new_tokens=30, temperature=0.0))
    got = list(stream)
    eos = set(fp32_engine.arch.eos_token_ids)
    cut = next((i for i, t in enumerate(greedy) if t in eos), len(greedy))
    assert got == greedy[:cut]
    assert stream.finish_reason == ("stop" if cut < 30 else "length")
    assert "Paris" in fp32_engine.decode(got)
