"""Unit tests of constrained decoding and logprobs without the model: token tables from in-memory
tokenizers, the grammar mask driving the real Sampler, the tool-call parser, the request schemas."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from device.api import tools as toolcalls
from device.api.schemas import ChatCompletionRequest, CompletionRequest
from device.api.structured import grammar_for
from device.engine import EngineError, SamplingParams
from device.engine.constraints import (
    ConstraintUnavailableError,
    Grammar,
    GrammarConstraint,
    TokenTable,
    UnsupportedSchemaError,
    apply_mask,
    token_table,
)
from device.engine.sampling import Sampler, token_logprob
from manifests import ArchConfig


def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is a token (plus a few merges), EOS id 0."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    merges = [("Ġ", '"'), ('"', ":")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return tok


def sentencepiece_tokenizer() -> Tokenizer:
    """A Llama-2-style BPE: '▁' for spaces and <0xAB> byte-fallback tokens."""
    vocab = {"<eos>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    for piece in ("▁", "a", "b", "n", "e", "▁a", "{", "}", '"'):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(["<eos>"])
    return tok


class FakeEngine:
    """What GrammarConstraint reads of an engine: its tokenizer and vocabulary/EOS ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.arch = ArchConfig.model_construct(
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), eos_token_ids=[0], bos_token_id=None
        )


@pytest.mark.parametrize("make", [byte_level_tokenizer, sentencepiece_tokenizer])
def test_token_table_gives_the_exact_bytes(make) -> None:  # noqa: ANN001
    tok = make()
    table = token_table(tok, tok.get_vocab_size(with_added_tokens=True))
    text = "an {a} é ü"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert b"".join(table.tokens[i] for i in ids).decode() == tok.decode(ids)
    assert 0 in table.special and table.tokens[0] == b"<eos>"


def test_a_tokenizer_whose_bytes_cannot_be_derived_is_refused() -> None:
    tok = byte_level_tokenizer()
    tok.decoder = decoders.Replace("a", "b")  # decodes to something the vocabulary does not spell
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConstraintUnavailableError):
        token_table(tok, tok.get_vocab_size(with_added_tokens=True))


def test_unsupported_schema_features_are_named() -> None:
    for schema, words in (
        ({"type": "array", "uniqueItems": True}, ["uniqueItems"]),
        ({"type": "object", "if": {}, "then": {}}, ["if", "then"]),
        ({"type": "string", "pattern": "(?=a)b"}, ["look-around"]),
        ({"type": "string", "format": "no-such-format"}, ["no-such-format"]),
    ):
        with pytest.raises(UnsupportedSchemaError) as info:
            Grammar.json_schema(schema)
        assert all(w in str(info.value) for w in words), str(info.value)
        assert "\n" not in str(info.value)


def drive(engine: FakeEngine, grammar: Grammar, seed: int, temperature: float = 1.0, top_p: float = 1.0) -> str:
    """The engine's token loop without a model: random logits, the grammar mask, the real Sampler."""
    rng = np.random.default_rng(seed)
    vocab = engine.arch.vocab_size
    c = GrammarConstraint(engine, grammar)  # type: ignore[arg-type]
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
    out: list[int] = []
    for _ in range(400):
        logits = rng.normal(size=vocab).astype(np.float32) * 3
        logits[0] -= 4.0  # EOS less likely than average: outputs are not all minimal
        tok = sampler(c.mask(logits))
        more = c.advance(tok)
        if tok == 0:
            break
        out.append(tok)
        if not more:
            break
    return engine.tokenizer.decode(out)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "n"],
}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("make", [byte_level_tokenizer, sentencepiece_tokenizer])
def test_masked_sampling_always_validates(make, seed: int) -> None:  # noqa: ANN001
    engine = FakeEngine(make())
    text = drive(engine, Grammar.json_schema(SCHEMA), seed, temperature=1.0, top_p=0.9)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_the_same_seed_gives_the_same_constrained_output() -> None:
    engine = FakeEngine(byte_level_tokenizer())
    g = Grammar.json_schema(SCHEMA)
    assert drive(engine, g, 3) == drive(engine, g, 3)
    assert len({drive(engine, g, s) for s in range(5)}) > 1


def test_sampler_draws_only_allowed_tokens_with_the_renormalized_distribution() -> None:
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    masked = np.where(np.array([False, True, False, True]), logits, np.float32(-np.inf))
    s = Sampler(SamplingParams(temperature=1.0, seed=5))
    draws = np.bincount([s(masked) for _ in range(6000)], minlength=4)
    assert draws[0] == draws[2] == 0
    assert abs(draws[3] / draws.sum() - 0.4 / 0.6) < 0.03  # 0.667 expected
    greedy = Sampler(SamplingParams(temperature=0))
    assert greedy(np.where([True, True, True, False], logits, np.float32(-np.inf))) == 2
    # top-p works on the allowed tokens: 0.2 and 0.4 renormalized are 1/3 and 2/3; top_p 0.5 keeps one
    top = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert {top(masked) for _ in range(200)} == {3}


def test_token_logprob_is_the_log_softmax_of_the_raw_logits() -> None:
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    lp = token_logprob(logits, 2, top=2)
    ref = logits - math.log(float(np.exp(logits.astype(np.float64)).sum()))
    assert lp.logprob == pytest.approx(ref[2])
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(ref[1])
    assert token_logprob(logits, 0, top=0).top == ()


# ------------------------------------------------------------------------------------------ tool calls


def call_text(*calls: tuple[str, str]) -> str:
    return toolcalls.SEPARATOR.join(toolcalls.format_call(n, a) for n, a in calls)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_tool_call_parser_follows_the_format_in_any_chunking(chunk: int) -> None:
    args1 = '{"q": "a } tricky \\" {string", "n": [1, {"d": 2}]}'
    text = call_text(("search", args1), ("get_time", "{}"))
    p = toolcalls.ToolCallParser()
    deltas = [d for i in range(0, len(text), chunk) for d in p.feed(text[i : i + chunk])]
    deltas += p.finish()
    assert [(c.name, c.arguments) for c in p.calls] == [("search", args1), ("get_time", "{}")]
    assert p.is_calls and p.content == ""
    streamed = ["".join(d.arguments for d in deltas if d.index == i) for i in (0, 1)]
    assert streamed == [args1, "{}"]
    assert [d.name for d in deltas if d.name] == ["search", "get_time"]


def test_tool_call_parser_content_and_truncation() -> None:
    p = toolcalls.ToolCallParser()
    for piece in ("<to", "ol? no, just text"):
        p.feed(piece)
    p.finish()
    assert not p.is_calls and p.content == "<tool? no, just text"
    short = toolcalls.ToolCallParser()
    short.feed("<tool")
    short.finish()
    assert short.content == "<tool"
    cut = toolcalls.ToolCallParser()
    full = call_text(("f", '{"a": 1}'))
    cut.feed(full[: full.index("1}")])
    assert cut.is_calls and cut.calls[0].name == "f" and cut.calls[0].arguments.startswith('{"a"')


def tool(name: str, params: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": params}}


def test_tool_grammar_accepts_the_format_and_validates_arguments() -> None:
    engine = FakeEngine(byte_level_tokenizer())
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [tool("f", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
                      tool("g")],
            "tool_choice": "required",
        }
    )
    tp = toolcalls.ToolPlan.of(req.tools, req.tool_choice, req.parallel_tool_calls)
    g = grammar_for(None, tp)
    assert g is not None
    for seed in range(4):
        p = toolcalls.ToolCallParser()
        p.feed(drive(engine, g, seed))
        p.finish()
        assert p.is_calls
        for c in p.calls:
            assert c.name in ("f", "g")
            args = json.loads(c.arguments)
            if c.name == "f":
                jsonschema.validate(args, req.tools[0].function.parameters)
            else:
                assert args == {}


def test_plain_template_gets_the_documented_tool_prompt() -> None:
    class NoTemplate:
        chat_template = None

    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "function": {"name": "w", "arguments": '{"c": "P"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [tool("w")],
        }
    )
    tp = toolcalls.ToolPlan.of(req.tools, req.tool_choice, True)
    messages, template_tools = toolcalls.render(NoTemplate(), req.messages, tp)  # type: ignore[arg-type]
    assert template_tools is None and tp.mode == "auto"
    assert messages[0]["role"] == "system" and '"name": "w"' in messages[0]["content"]
    assert messages[2]["content"] == toolcalls.format_call("w", '{"c": "P"}')
    assert messages[3] == {"role": "user", "content": "Result of w (call c1):\nsunny"}
    none = toolcalls.ToolPlan.of(req.tools, "none", True)
    assert toolcalls.render(NoTemplate(), req.messages, none)[0][0]["role"] == "user"  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ request bodies


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "seed": 2**64},
        {"prompt": [1, 2**70]},
        {"prompt": [-3]},
        {"prompt": "x", "max_tokens": 2**70},
        {"prompt": "x", "top_k": 2**40},
        {"prompt": "x", "logprobs": 6},
        {"prompt": "x", "response_format": {"type": "json_schema"}},
        {"prompt": "x", "response_format": {"type": "yaml"}},
    ],
)
def test_out_of_range_completion_fields_fail_validation(body: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


@pytest.mark.parametrize(
    "extra",
    [
        {"top_logprobs": 2},
        {"logprobs": True, "top_logprobs": 21},
        {"tool_choice": "required"},
        {"tools": [tool("f")], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [tool("f"), tool("f")]},
        {"tools": [tool("bad name!")]},
        {"seed": -1},
    ],
)
def test_inconsistent_chat_fields_fail_validation(extra: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **extra})


def test_json_object_and_text_formats() -> None:
    assert grammar_for(None) is None
    req = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "text"}})
    assert grammar_for(req.response_format) is None
    req = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}})
    g = grammar_for(req.response_format)
    assert g is not None and g.kind == "json_schema"


def test_table_text_replaces_partial_utf8() -> None:
    table = TokenTable((b"\xe2\x82", b"a"), frozenset())
    assert table.text(0) == "\ufffd" and table.text(1) == "a"


@pytest.mark.parametrize("frac", [0.001, 0.5, 1.0])
def test_apply_mask_blanks_exactly_the_forbidden_tokens(frac: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=5000).astype(np.float32)
    allowed = rng.random(5000) < frac
    allowed[7] = True
    out = apply_mask(logits, allowed)
    assert out.dtype == np.float32 and np.array_equal(out, np.where(allowed, logits, np.float32(-np.inf)))
    assert out is not logits
    with pytest.raises(EngineError):
        apply_mask(logits, np.zeros(5000, dtype=bool))


def accepts(engine: FakeEngine, grammar: Grammar, text: str) -> bool:
    """Whether the constraint lets every token of ``text`` through and then allows EOS."""
    c = GrammarConstraint(engine, grammar)  # type: ignore[arg-type]
    zeros = np.zeros(engine.arch.vocab_size, dtype=np.float32)
    for tok in engine.tokenizer.encode(text, add_special_tokens=False).ids:
        if c.mask(zeros)[tok] == -np.inf:
            return False
        if not c.advance(tok):
            return True  # complete: only EOS could follow
    return bool(c.mask(zeros)[0] != -np.inf)


def test_auto_tools_with_a_response_format_allow_calls_or_schema_json_only() -> None:
    engine = FakeEngine(byte_level_tokenizer())
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [tool("f", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})],
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {
                "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}},
        }
    )
    g = grammar_for(req.response_format, toolcalls.ToolPlan.of(req.tools, req.tool_choice, True))
    assert g is not None
    assert accepts(engine, g, '{"answer": "yes"}')
    assert accepts(engine, g, toolcalls.format_call("f", '{"a": 3}'))
    assert not accepts(engine, g, toolcalls.format_call("f", '{"a": "x"}'))
    assert not accepts(engine, g, toolcalls.format_call("g", "{}"))
    assert not accepts(engine, g, "free text")
    plain = grammar_for(None, toolcalls.ToolPlan.of(req.tools, "auto", True))
    assert plain is not None and accepts(engine, plain, "free text")
    assert not accepts(engine, plain, "<tool_call>\nnot a call")
