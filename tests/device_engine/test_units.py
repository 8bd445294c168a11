"""Unit tests of the engine's pieces: options, sampling, text streaming, chat template, load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from device.engine import (
    BundleLoadError,
    ContextWindowError,
    Engine,
    EngineClosedError,
    EngineOptions,
    InvalidParamsError,
    SamplingParams,
    UnsupportedGraphError,
    arch_from_hf_config,
    optimum_kv_graph,
)
from device.engine.sampling import Sampler
from device.engine.text import ChatTemplate, IncrementalDecoder, StopMatcher

from .conftest import FP32_DIR, require


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": -1},
        {"temperature": -0.5},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"stop": ("",)},
    ],
)
def test_sampling_params_reject_out_of_range(kwargs) -> None:  # noqa: ANN001
    with pytest.raises(InvalidParamsError):
        SamplingParams(**kwargs)


def test_engine_options_validate() -> None:
    with pytest.raises(InvalidParamsError):
        EngineOptions(threads=0)
    with pytest.raises(InvalidParamsError):
        EngineOptions(graph_optimization="max")  # type: ignore[arg-type]
    with pytest.raises(InvalidParamsError):
        EngineOptions(prefill_chunk=0)


def test_session_options_turn_kleidiai_off_unless_asked() -> None:
    """KleidiAI (aarch64) computes symmetric 4-bit MatMulNBits with coarser numerics than the build's gate
    measured; the engine turns it off by default (docs/engine.md)."""
    from device.engine.session import session_options

    assert session_options(EngineOptions()).get_session_config_entry("mlas.disable_kleidiai") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        session_options(EngineOptions(kleidiai=True)).get_session_config_entry("mlas.disable_kleidiai")


def test_sampler_greedy_topk_topp_seed_and_penalty() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert Sampler(SamplingParams(temperature=0))(logits) == 0
    # top_k=1 is greedy whatever the temperature
    assert {Sampler(SamplingParams(temperature=1.5, top_k=1, seed=s))(logits) for s in range(20)} == {0}
    # top_p=0.7 keeps {0, 1} (0.5 + 0.3 >= 0.7); never 2 or 3
    draws = {Sampler(SamplingParams(top_p=0.7, seed=s))(logits) for s in range(200)}
    assert draws == {0, 1}
    # the same seed gives the same sequence of draws
    a, b = Sampler(SamplingParams(seed=42)), Sampler(SamplingParams(seed=42))
    assert [a(logits) for _ in range(30)] == [b(logits) for _ in range(30)]
    # a strong repetition penalty moves greedy off a token already seen
    pen = Sampler(SamplingParams(temperature=0, repetition_penalty=5.0))
    assert pen(np.array([2.0, 1.0, 0.1], dtype=np.float32), np.array([0])) == 1
    # a negative logit is pushed further down, not up
    neg = np.array([-1.0, -1.5], dtype=np.float32)
    assert pen(neg, np.array([0])) == 1
    # sampling follows the distribution: about 50% zeros
    s = Sampler(SamplingParams(seed=0))
    zeros = sum(s(logits) == 0 for _ in range(2000))
    assert 900 < zeros < 1100


@pytest.mark.parametrize(
    "pieces, stops, emitted, stopped",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["a", "b", "c"], ["x"], "abc", False),
        (["ab", "cSTO", "P tail"], ["STOP"], "abc", True),
        (["ST", "ATE"], ["STOP"], "STATE", False),
        (["1, 2", ", 3"], [", 3", "2"], "1, ", True),
    ],
)
def test_stop_matcher(pieces, stops, emitted, stopped) -> None:  # noqa: ANN001
    m = StopMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = m.feed(p)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (emitted, stopped)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(require(FP32_DIR / "tokenizer.json")))


def test_incremental_decoder_reassembles_multibyte_text(tokenizer: Tokenizer) -> None:
    text = "Grüße aus Köln! 東京タワー 🚀 naïve café — done."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_chat_template_renders_and_is_sandboxed() -> None:
    source = require(FP32_DIR / "chat_template.jinja").read_text()
    out = ChatTemplate(source).render([{"role": "user", "content": "Hi"}])
    assert out.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system" in out
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidParamsError):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidParamsError):
        ChatTemplate("{{ raise_exception('no system role') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidParamsError):
        ChatTemplate("{% for %}")
    with pytest.raises(InvalidParamsError):
        ChatTemplate(source).render([{"role": "user"}])


def test_arch_from_hf_config_reads_the_default_model() -> None:
    arch = arch_from_hf_config(require(FP32_DIR / "config.json"))
    assert (arch.num_layers, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert arch.vocab_size == 49152 and arch.eos_token_ids == [2] and arch.tie_word_embeddings
    with pytest.raises(BundleLoadError):
        arch_from_hf_config({"hidden_size": 8})


def test_loading_errors_are_named(tmp_path) -> None:  # noqa: ANN001
    arch = arch_from_hf_config(require(FP32_DIR / "config.json"))
    with pytest.raises(BundleLoadError, match="not found"):
        Engine.from_parts(tmp_path, arch, optimum_kv_graph(30))
    (tmp_path / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(BundleLoadError, match="cannot load"):
        Engine.from_parts(tmp_path, arch, optimum_kv_graph(30))
    with pytest.raises(BundleLoadError, match="manifest"):
        Engine.from_bundle(tmp_path, None)
    bad_kind = optimum_kv_graph(30).model_copy(update={"kind": "mystery"})
    with pytest.raises(UnsupportedGraphError, match="mystery"):
        Engine.from_parts(FP32_DIR, arch, bad_kind)
    wrong_layers = arch.model_copy(update={"num_layers": 31})
    with pytest.raises(UnsupportedGraphError, match="missing inputs"):
        Engine.from_parts(FP32_DIR, wrong_layers, optimum_kv_graph(31))


@pytest.mark.slow
def test_context_window_and_closed_engine_errors(fp32_engine: Engine) -> None:
    ctx = fp32_engine.context_length
    with pytest.raises(ContextWindowError, match=str(ctx)):
        fp32_engine.generate([1] * (ctx + 1), SamplingParams(max_new_tokens=1))
    with pytest.raises(ContextWindowError):
        fp32_engine.greedy([1] * (ctx - 2), 5)
    with pytest.raises(InvalidParamsError):
        fp32_engine.generate([], SamplingParams())
    with pytest.raises(InvalidParamsError):
        fp32_engine.greedy([fp32_engine.arch.vocab_size], 1)
    with pytest.raises(InvalidParamsError):
        fp32_engine.perplexity([5])


@pytest.mark.slow
def test_generation_stops_at_the_context_window(fp32_dir) -> None:  # noqa: ANN001
    arch = arch_from_hf_config(fp32_dir / "config.json")
    small = Engine.from_parts(fp32_dir, arch, optimum_kv_graph(30), EngineOptions(max_context=24))
    try:
        prompt = small.encode("Once upon a time there was")
        stream = small.generate(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True, temperature=0))
        out = list(stream)
        assert len(prompt) + len(out) == 24 and stream.finish_reason == "length"
        # cancelling a stream marks it
        s2 = small.generate(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
        next(s2)
        s2.close()
        assert s2.finish_reason == "cancelled"
        # stop sequences on text
        ev = list(
            small.stream_text(
                small.encode("1, 2, 3, 4,"), SamplingParams(max_new_tokens=10, temperature=0, stop=(" 7",))
            )
        )
        assert ev[-1].finish_reason == "stop" and " 7" not in "".join(e.text for e in ev)
    finally:
        small.close()
    with pytest.raises(EngineClosedError):
        small.greedy([1], 1)


def test_release_free_heap_returns_freed_pages_to_the_os() -> None:
    """After the tokenizer's temporaries are freed, glibc keeps them resident until malloc_trim (_heap.py)."""
    import ctypes
    import ctypes.util
    import re

    from device.engine._heap import release_free_heap

    def rss_anon_mib() -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"RssAnon:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = []
    for _ in range(40_000):  # 40k x 1 KiB: heap memory, below the mmap threshold (as JSON parsing allocates)
        p = libc.malloc(1024)
        ctypes.memset(p, 1, 1024)
        blocks.append(p)
    keep = libc.malloc(16)  # a live block at the top of the heap: free() alone cannot shrink it
    for p in blocks:
        libc.free(p)
    before = rss_anon_mib()
    assert release_free_heap() is True
    after = rss_anon_mib()
    libc.free(keep)
    assert before - after > 20, (before, after)
