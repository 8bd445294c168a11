"""Constrained decoding: a grammar (a JSON schema, "any JSON object", or a Lark grammar) becomes a mask over
the vocabulary before each token is sampled, so the output always parses.

    grammar = Grammar.json_schema({"type": "object", ...})   # UnsupportedSchemaError names what is missing
    for ev in engine.stream_text(ids, params, constraint=GrammarConstraint(engine, grammar)): ...

The grammar engine is llguidance (chosen by measurement: docs/engine.md, "Constrained decoding"). It reads
the token table built here from the bundle's ``tokenizers`` tokenizer (no transformers, no torch). The
per-engine llguidance tokenizer is built on first use (~0.6 s for a 49k vocabulary here) and kept."""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from ._heap import release_free_heap
from .errors import EngineError, InvalidParamsError

if TYPE_CHECKING:
    from .engine import Engine

# JSON is written compactly, with at most one space after "," and ":" (`{"a": 1, "b": [2, 3]}`), never
# newlines or indentation: a small model left free to indent loops on whitespace until max_tokens (seen with
# llguidance 1.6's flexible whitespace, which repeats even a bounded whitespace pattern), and then nothing
# parses. Any JSON value is still expressible.
JSON_FORMAT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}


class ConstraintUnavailableError(EngineError):
    """Constrained decoding cannot run here (llguidance missing, or the tokenizer's bytes are unknown)."""

    reason = "constraint_unavailable"


class UnsupportedSchemaError(InvalidParamsError):
    """The JSON schema uses a feature the grammar compiler does not implement (the message names it)."""

    reason = "unsupported_schema"


class InvalidGrammarError(InvalidParamsError):
    """The grammar does not compile (the message says why)."""

    reason = "invalid_grammar"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # the device extra installs it; a bare engine may not have it
        raise ConstraintUnavailableError(
            "constrained decoding needs the llguidance package (pip install 'nanofleet[device]')"
        ) from exc
    return llguidance


# ------------------------------------------------------------------------------------------ grammars


@dataclass(frozen=True)
class Grammar:
    """A compiled-once, reusable grammar description (llguidance's JSON grammar format)."""

    source: str
    kind: str  # "json_schema" | "json_object" | "lark"

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool, *, closed_objects: bool = True) -> Grammar:
        """Output must validate against ``schema`` (JSON Schema 2020-12 subset: docs/engine.md).

        With ``closed_objects`` an object schema that lists ``properties`` and says nothing about others
        generates only those (still valid: extra properties are allowed, never required); a small model
        otherwise tends to invent keys until max_tokens."""
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, Mapping):
            raise UnsupportedSchemaError("a JSON schema must be an object")
        body = dict(_closed(schema) if closed_objects else schema)
        body.setdefault("x-guidance", JSON_FORMAT)
        llg = _llguidance()
        try:
            source = llg.LLMatcher.grammar_from_json_schema(body)
        except ValueError as exc:
            raise UnsupportedSchemaError(f"not a JSON schema: {exc}") from exc
        _validate(source, UnsupportedSchemaError)
        return cls(source, "json_schema")

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"}, closed_objects=False)

    @classmethod
    def lark(cls, source: str) -> Grammar:
        """A Lark-like grammar in llguidance's dialect (may embed ``%json {...}`` schemas)."""
        grammar = _llguidance().LLMatcher.grammar_from_lark(source)
        _validate(grammar, InvalidGrammarError)
        return cls(grammar, "lark")


def json_schema_lark(schema: Mapping[str, Any], *, closed_objects: bool = True) -> str:
    """``%json {...}``: ``schema`` as a Lark fragment (for grammars that embed JSON, such as tool calls),
    with the same object closing and whitespace bound as ``Grammar.json_schema``; checked on its own."""
    body = dict(_closed(schema) if closed_objects else schema)
    body.setdefault("x-guidance", JSON_FORMAT)
    fragment = "%json " + json.dumps(body, ensure_ascii=False)
    _validate(_llguidance().LLMatcher.grammar_from_lark(f"start: {fragment}\n"), UnsupportedSchemaError)
    return fragment


def _validate(grammar: str, error: type[InvalidParamsError]) -> None:
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise error(_first_line(messages[0] if messages else "the grammar does not compile"))


def _first_line(message: str) -> str:
    """One line of an llguidance error: it appends its parser state and the whole grammar to some."""
    for marker in ("<state>", "<grammar>"):
        message = message.split(marker, 1)[0]
    line = " ".join(message.split())
    return line if len(line) <= 300 else line[:297] + "..."


def _closed(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """``schema`` with ``additionalProperties: false`` on object schemas that list ``properties`` and leave
    the rest open. Subschemas of ``allOf`` (and nodes beside ``$ref`` or ``allOf``) are left alone: closing
    one side of an intersection would forbid the other side's properties."""

    def walk(node: Any, inside_all_of: bool) -> Any:
        if isinstance(node, list):
            return [walk(x, inside_all_of) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in ("const", "enum", "default", "examples"):
                out[key] = value  # data, not subschemas
            elif key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
                out[key] = {k: walk(v, inside_all_of) for k, v in value.items()} if isinstance(value, dict) else value
            else:
                out[key] = walk(value, inside_all_of or key == "allOf")
        opens = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")
        if "properties" in out and not inside_all_of and not any(k in out for k in opens):
            out["additionalProperties"] = False
        return out

    return walk(dict(schema), False)


# ------------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class TokenTable:
    """The exact bytes each token id stands for (what a grammar matches against), and the special ids."""

    tokens: tuple[bytes, ...]
    special: frozenset[int]

    def text(self, token_id: int) -> str:
        return self.tokens[token_id].decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _gpt2_byte_translation() -> dict[int, int]:
    """GPT-2's byte-level alphabet as a str.translate table: each printable stand-in (e.g. 'Ġ' for a space)
    to the code point of the byte it stands for, so ``piece.translate(t).encode("latin-1")`` is its bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {c: b for b, c in zip(keep, chars, strict=True)}


def _uses_byte_level(tokenizer: Tokenizer) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    parts = (tokenizer.pre_tokenizer, tokenizer.decoder)
    return any(p is not None and has(json.loads(p.__getstate__())) for p in parts)


def token_table(tokenizer: Tokenizer, vocab_size: int) -> TokenTable:
    """Token bytes of a ``tokenizers`` tokenizer: byte-level BPE (GPT-2 alphabet) or SentencePiece-style
    (``▁`` for space, ``<0xAB>`` byte-fallback tokens). Checked against the tokenizer's own decoder."""
    byte_level = _uses_byte_level(tokenizer)
    trans = _gpt2_byte_translation()
    added = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}
    tokens = [b""] * vocab_size
    special: set[int] = set()
    for piece, tid in tokenizer.get_vocab(with_added_tokens=True).items():
        if tid >= vocab_size:
            continue
        if piece in added:
            tokens[tid] = piece.encode()
            if added[piece].special:
                special.add(tid)
            continue
        if byte_level:
            try:
                tokens[tid] = piece.translate(trans).encode("latin-1")
                continue
            except UnicodeEncodeError:
                pass  # not in the byte alphabet: a plain piece
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            tokens[tid] = bytes([int(piece[3:5], 16)])
        else:
            tokens[tid] = piece.replace("\u2581", " ").encode()
    table = TokenTable(tuple(tokens), frozenset(special))
    _check_table(tokenizer, table)
    return table


def _check_table(tokenizer: Tokenizer, table: TokenTable) -> None:
    """Decode a spread of multi-token texts both ways; a tokenizer we misread fails loudly, not silently."""
    sample = "Hello, world! {\"key\": [1, 2.5, true, null]}\n\tcafé ü 東京 $x_1 = -3;"
    ids = tokenizer.encode(sample, add_special_tokens=False).ids
    ours = b"".join(table.tokens[i] for i in ids).decode("utf-8", errors="replace")
    theirs = tokenizer.decode(ids, skip_special_tokens=False)
    if ours.strip() != theirs.strip():
        raise ConstraintUnavailableError(
            f"cannot derive token bytes from this tokenizer (decoded {ours[:40]!r}, expected {theirs[:40]!r})"
        )


class _Wrapped:
    """The duck-typed tokenizer llguidance's ``TokenizerWrapper`` reads."""

    def __init__(self, tokenizer: Tokenizer, table: TokenTable, eos: int, bos: int | None) -> None:
        self.tokenizer = tokenizer
        self.tokens = list(table.tokens)
        self.special_token_ids = sorted(table.special)
        self.eos_token_id = eos
        self.bos_token_id = bos

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special_tokens=False).ids


# Per engine, built on first use and dropped with the engine: the token table (logprobs' bytes, ~50 ms) and
# llguidance's tokenizer over it (grammars; ~0.6 s for a 49k vocabulary on this host).
_TABLES: weakref.WeakKeyDictionary[Engine, TokenTable] = weakref.WeakKeyDictionary()
_LLTOKENIZERS: weakref.WeakKeyDictionary[Engine, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def engine_token_table(engine: Engine) -> TokenTable:
    """The token table of ``engine``'s tokenizer, built once."""
    with _LOCK:
        table = _TABLES.get(engine)
        if table is None:
            if engine.tokenizer is None:
                raise ConstraintUnavailableError("this needs the bundle's tokenizer, and the engine has none")
            table = _TABLES[engine] = token_table(engine.tokenizer, engine.arch.vocab_size)
            release_free_heap()  # the vocabulary dict's temporaries: ~7 MiB resident otherwise
        return table


def engine_lltokenizer(engine: Engine) -> Any:
    """llguidance's ``LLTokenizer`` for ``engine``, built once."""
    with _LOCK:
        lltok = _LLTOKENIZERS.get(engine)
        if lltok is None:
            llg = _llguidance()
            table = engine_token_table(engine)
            assert engine.tokenizer is not None
            eos = engine.arch.eos_token_ids[0] if engine.arch.eos_token_ids else 0
            wrapped = _Wrapped(engine.tokenizer, table, eos, engine.arch.bos_token_id)
            lltok = llg.LLTokenizer(llg.TokenizerWrapper(wrapped), n_vocab=engine.arch.vocab_size)
            _LLTOKENIZERS[engine] = lltok
            release_free_heap()
        return lltok


# ------------------------------------------------------------------------------------------ the hook


def apply_mask(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of ``logits`` [vocab] with -inf where ``allowed`` [vocab] (bool) is False. Inside JSON
    structure a handful of tokens is allowed (gather them: ~15 us here), inside a string nearly all (copy
    and blank the rest); np.where costs ~80 us either way."""
    n = int(np.count_nonzero(allowed))
    if n == 0:
        raise EngineError("the grammar allows no token here")
    if n < logits.shape[0] // 8:
        idx = np.flatnonzero(allowed)
        out = np.full(logits.shape, -np.inf, dtype=logits.dtype)
        out[idx] = logits[idx]
        return out
    out = logits.copy()
    out[~allowed] = -np.inf
    return out


class GrammarConstraint:
    """One request's grammar state: ``mask`` before each sampling step, ``advance`` with the chosen token.

    The matcher is built lazily on the first ``mask`` (in the generating thread, not the request's)."""

    def __init__(self, engine: Engine, grammar: Grammar) -> None:
        self.engine = engine
        self.grammar = grammar
        self._matcher: Any = None
        self._bitmask: np.ndarray | None = None  # [1, ceil(vocab / 32)] int32
        self.tokens_masked = 0

    def start(self) -> GrammarConstraint:
        """Build the matcher now (else the first ``mask`` does); returns self."""
        if self._matcher is None:
            llg = _llguidance()
            lltok = engine_lltokenizer(self.engine)
            matcher = llg.LLMatcher(lltok, self.grammar.source, log_level=0)
            if matcher.is_error():
                raise InvalidGrammarError(_first_line(matcher.get_error()))
            self._bitmask = np.full((1, (lltok.vocab_size + 31) // 32), -1, dtype=np.int32)
            self._matcher = matcher
        return self

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` [vocab] with every token the grammar forbids here set to -inf (a new array)."""
        self.start()
        m, bits = self._matcher, self._bitmask
        assert bits is not None
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        if m.is_error():
            raise EngineError(f"grammar matcher failed: {_first_line(m.get_error())}")
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: logits.shape[0]].view(np.bool_)
        self.tokens_masked += 1
        return apply_mask(logits, allowed)

    def advance(self, token_id: int) -> bool:
        """Feed the sampled token; False once the grammar is complete (nothing but EOS may follow)."""
        m = self._matcher
        if m is None:  # a token chosen without a mask: never by the engine
            raise EngineError("advance() before mask()")
        if not m.consume_token(token_id):
            raise EngineError(f"grammar matcher refused token {token_id}: {_first_line(m.get_error())}")
        return not m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is complete under the grammar."""
        return self._matcher is not None and self._matcher.is_accepting()
