"""Constrained decoding on the default bundle (not CI; results feed docs/benchmarks.md and docs/engine.md).

Part 1 (always): decode tok/s and TTFT with and without a JSON schema, greedy and sampled, rounds
interleaved; grammar compile time per schema (llguidance, the library the engine ships).
Part 2 (--libraries): the candidates side by side on the same engine, token loop and prompts: per-token mask
overhead (mask + advance), compile time, and schema coverage (the schema compiles AND the model's greedy
output validates). outlines-core and xgrammar are not dependencies: install them beside, e.g.

    .venv/bin/pip install --target .cache/cd-libs --no-deps outlines-core==0.2.14 xgrammar==0.2.9 apache-tvm-ffi
    PYTHONPATH=.cache/cd-libs /work/heavy.sh --exclusive .venv/bin/python benchmarks/constrained_decoding.py \\
        --libraries --json benchmarks/results/constrained_decoding.json

(xgrammar imports torch at import time; the build venv has it, a board would not.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device.engine import Engine, EngineOptions, SamplingParams  # noqa: E402
from device.engine.constraints import (  # noqa: E402
    JSON_FORMAT,
    Grammar,
    GrammarConstraint,
    apply_mask,
    engine_lltokenizer,
    engine_token_table,
)

PROMPT = [
    {
        "role": "user",
        "content": "List the items in a small grocery order as JSON: for each item its name, quantity, "
        "unit price in dollars and whether it is in stock.",
    }
]

# Long enough output (~130 tokens) for a decode rate; fixed length so runs compare.
ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 6,
            "maxItems": 6,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                    "in_stock": {"type": "boolean"},
                },
                "required": ["name", "quantity", "price", "in_stock"],
            },
        }
    },
    "required": ["items"],
}

# Schema features, one small schema each: coverage is "compiles AND the model's greedy output validates".
FEATURES: dict[str, dict[str, Any]] = {
    "primitives": {
        "type": "object",
        "properties": {"s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
                       "b": {"type": "boolean"}, "z": {"type": "null"}},
        "required": ["s", "i", "n", "b", "z"],
    },
    "enum+const": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "v": {"const": 2}},
        "required": ["color", "v"],
    },
    "nested objects": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"name": {"type": "string"},
                       "address": {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]}}, "required": ["name", "address"]}},
        "required": ["user"],
    },
    "array min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "optional properties": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
        "required": ["a"],
    },
    "additionalProperties:false": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
        "additionalProperties": False,
    },
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"},
                                    "maxProperties": 3},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"x": {"type": "string"}},
                                                "required": ["x"]}]},
    "oneOf (disjoint)": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
    "$ref/$defs": {
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/point"}, "q": {"$ref": "#/$defs/point"}},
        "required": ["p", "q"],
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"]}},
    },
    "recursive $ref": {
        "$ref": "#/$defs/node",
        "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                           "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                           "required": ["v", "kids"]}},
    },
    "string pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                       "required": ["code"]},
    "string min/maxLength": {"type": "string", "minLength": 3, "maxLength": 8},
    "format date-time": {"type": "string", "format": "date-time"},
    "format email": {"type": "string", "format": "email"},
    "format uuid": {"type": "string", "format": "uuid"},
    "integer bounds": {"type": "integer", "minimum": 10, "maximum": 20},
    "exclusive bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "multipleOf": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    "type list": {"type": ["string", "null"]},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}},
                          "additionalProperties": False, "maxProperties": 2},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3},
    "if/then/else": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                     "if": {"properties": {"a": {"const": 1}}, "required": ["a"]}, "then": {"required": ["b"]}},
    "not": {"not": {"type": "string"}},
    "dependentRequired": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                          "dependentRequired": {"a": ["b"]}},
    "pydantic model": {
        "$defs": {"Unit": {"enum": ["kg", "g"], "title": "Unit", "type": "string"}},
        "properties": {"name": {"title": "Name", "type": "string"},
                       "weight": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None},
                       "unit": {"$ref": "#/$defs/Unit"}},
        "required": ["name", "unit"], "title": "Item", "type": "object",
    },
}


# An instance each feature's schema forbids: a library that lets it through ignores the feature silently.
INVALID: dict[str, str] = {
    "enum+const": '{"color": "pink", "v": 2}',
    "array min/maxItems": "[1, 2, 3, 4, 5]",
    "additionalProperties:false": '{"a": 1, "b": 2}',
    "allOf": '{"a": 1}',
    "string pattern": '{"code": "abc"}',
    "string min/maxLength": '"ab"',
    "format date-time": '"yesterday"',
    "format email": '"not an email"',
    "format uuid": '"1234"',
    "integer bounds": "5",
    "exclusive bounds": "1",
    "multipleOf": "7",
    "prefixItems": '[1, "a"]',
    "patternProperties": '{"y": 1}',
    "uniqueItems": "[1, 1]",
    "if/then/else": '{"a": 1}',
    "not": '"x"',
    "dependentRequired": '{"a": 1}',
}

def load_engine(bundle: Path | None) -> Engine:
    if bundle is None:
        from tests.export.bundle_cache import cached_bundle

        bundle = cached_bundle("int8", [])[0]
    return Engine.from_bundle(bundle, None, EngineOptions(threads=2, spin_wait=False))


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------ constraints of each library


class Timed:
    """Wraps a Constraint and sums the time spent in it (mask + advance) per token."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.steps = 0

    def mask(self, logits: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self.inner.mask(logits)
        self.seconds += time.perf_counter() - t
        self.steps += 1
        return out

    def advance(self, token_id: int) -> bool:
        t = time.perf_counter()
        more = self.inner.advance(token_id)
        self.seconds += time.perf_counter() - t
        return more


def _apply_bits(bits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    # the same bitmask -> logits step as GrammarConstraint.mask, so libraries differ only in their own work
    allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: logits.shape[0]].view(np.bool_)
    return apply_mask(logits, allowed)


class OutlinesConstraint:
    def __init__(self, index: Any, vocab_size: int) -> None:
        import outlines_core

        self.guide = outlines_core.Guide(index)
        self.bits = np.full((1, (vocab_size + 31) // 32), 0, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self.bits[:] = 0
        self.guide.write_mask_into(self.bits.ctypes.data, self.bits.size, 4)
        return _apply_bits(self.bits, logits)

    def advance(self, token_id: int) -> bool:
        self.guide.advance(token_id, return_tokens=False)
        return not self.guide.is_finished()


class XGrammarConstraint:
    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.bits_t = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.bits = self.bits_t.numpy()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self.matcher.fill_next_token_bitmask(self.bits_t)
        return _apply_bits(self.bits, logits)

    def advance(self, token_id: int) -> bool:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"xgrammar refused token {token_id}")
        return not self.matcher.is_terminated()


class Library:
    name = ""

    def compile(self, schema: dict[str, Any]) -> Any: ...

    def constraint(self, compiled: Any) -> Any: ...


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        engine_lltokenizer(engine)

    def compile(self, schema: dict[str, Any]) -> Any:
        return Grammar.json_schema(schema)

    def constraint(self, compiled: Any) -> Any:
        return GrammarConstraint(self.engine, compiled).start()


class Outlines(Library):
    name = "outlines-core"

    def __init__(self, engine: Engine) -> None:
        import outlines_core

        table = engine_token_table(engine)
        eos = engine.arch.eos_token_ids[0]
        vocab: dict[bytes, list[int]] = {}
        for tid, b in enumerate(table.tokens):
            if tid != eos and tid not in table.special and b:
                vocab.setdefault(b, []).append(tid)
        self.vocab = outlines_core.Vocabulary(eos, vocab)
        self.size = engine.arch.vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), r"[ ]?")  # as JSON_FORMAT: one optional space
        return outlines_core.Index(regex, self.vocab)

    def constraint(self, compiled: Any) -> Any:
        return OutlinesConstraint(compiled, self.size)


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, engine: Engine) -> None:
        import xgrammar

        table = engine_token_table(engine)
        info = xgrammar.TokenizerInfo(
            list(table.tokens), xgrammar.VocabType.RAW, vocab_size=engine.arch.vocab_size,
            stop_token_ids=list(engine.arch.eos_token_ids),
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # time real compiles
        self.size = engine.arch.vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def constraint(self, compiled: Any) -> Any:
        return XGrammarConstraint(compiled, self.size)


# ------------------------------------------------------------------------------ measurements


def generate(engine: Engine, ids: list[int], params: SamplingParams, constraint: Any = None) -> dict[str, Any]:
    """One generation through stream_text: TTFT (prefill + first token), decode tok/s, the text."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    parts: list[str] = []
    reason = None
    for ev in engine.stream_text(ids, params, constraint=constraint):
        parts.append(ev.text)
        reason = ev.finish_reason or reason
        if ev.token_id is not None:
            n += 1
            last = time.perf_counter()
            first = first or last
    assert first is not None and last is not None
    return {
        "ttft_ms": (first - t0) * 1e3,
        "decode_tok_s": (n - 1) / (last - first) if n > 1 else None,
        "tokens": n,
        "text": "".join(parts),
        "finish": reason,
    }


def speed(engine: Engine, rounds: int) -> dict[str, Any]:
    """Rounds interleaved: unconstrained (EOS ignored, as many tokens as the constrained run made) and
    constrained by ORDER_SCHEMA, greedy and sampled (temperature 0.7, top-p 0.9, seeded)."""
    import jsonschema

    ids = engine.encode_chat(PROMPT)
    grammar = Grammar.json_schema(ORDER_SCHEMA)
    generate(engine, ids, SamplingParams(max_new_tokens=8, temperature=0))  # warm-up
    GrammarConstraint(engine, grammar).mask(np.zeros(engine.arch.vocab_size, np.float32))
    out: dict[str, Any] = {}
    for mode, kw in (("greedy", {"temperature": 0.0}), ("sampled", {"temperature": 0.7, "top_p": 0.9})):
        rows: dict[str, list[dict[str, Any]]] = {"unconstrained": [], "constrained": []}
        for r in range(rounds):
            seed = {"seed": 100 + r} if mode == "sampled" else {}
            c = generate(engine, ids, SamplingParams(max_new_tokens=400, **kw, **seed),
                         GrammarConstraint(engine, grammar))
            jsonschema.validate(json.loads(c["text"]), ORDER_SCHEMA)
            u = generate(engine, ids, SamplingParams(max_new_tokens=c["tokens"], ignore_eos=True, **kw, **seed))
            rows["constrained"].append(c)
            rows["unconstrained"].append(u)
        summary = {
            k: {
                "decode_tok_s": statistics.median(x["decode_tok_s"] for x in v),
                "ttft_ms": statistics.median(x["ttft_ms"] for x in v),
                "tokens": statistics.median(x["tokens"] for x in v),
            }
            for k, v in rows.items()
        }
        summary["decode_ratio"] = summary["constrained"]["decode_tok_s"] / summary["unconstrained"]["decode_tok_s"]
        summary["ttft_ratio"] = summary["constrained"]["ttft_ms"] / summary["unconstrained"]["ttft_ms"]
        summary["sample_output"] = rows["constrained"][0]["text"][:160]
        out[mode] = summary
    return out


def first_use(bundle: Path | None) -> dict[str, float]:
    """What the first constrained request on a freshly loaded engine pays once: the token table and
    llguidance's tokenizer (built per engine, kept)."""
    engine = load_engine(bundle)
    t = time.perf_counter()
    engine_token_table(engine)
    t_table = time.perf_counter() - t
    t = time.perf_counter()
    engine_lltokenizer(engine)
    t_lltok = time.perf_counter() - t
    engine.close()
    return {"token_table_ms": t_table * 1e3, "lltokenizer_ms": t_lltok * 1e3}


def compile_times(lib: Library, engine: Engine, reps: int = 3) -> dict[str, Any]:
    """Per schema: compile (schema -> grammar / index) and first mask, median of ``reps``; or the error."""
    out: dict[str, Any] = {}
    zeros = np.zeros(engine.arch.vocab_size, np.float32)
    for name, schema in {"order": ORDER_SCHEMA, **FEATURES}.items():
        times, first = [], []
        try:
            for _ in range(reps):
                t = time.perf_counter()
                compiled = lib.compile(schema)
                c = lib.constraint(compiled)
                t1 = time.perf_counter()
                c.mask(zeros)
                times.append((t1 - t) * 1e3)
                first.append((time.perf_counter() - t1) * 1e3)
            out[name] = {"compile_ms": statistics.median(times), "first_mask_ms": statistics.median(first)}
        except Exception as exc:  # an unsupported feature: part of the coverage result
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    return out


def lets_through(lib: Library, engine: Engine, schema: dict[str, Any], text: str) -> bool:
    """Whether the library's mask allows every token of ``text`` and then EOS (an invalid instance)."""
    c = lib.constraint(lib.compile(schema))
    zeros = np.zeros(engine.arch.vocab_size, np.float32)
    for tok in engine.encode(text, add_special_tokens=False):
        if c.mask(zeros)[tok] == -np.inf:
            return False
        if not c.advance(tok):
            break
    return bool(c.mask(zeros)[engine.arch.eos_token_ids[0]] != -np.inf)


def faithfulness(lib: Library, engine: Engine, compiled_ok: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, text in INVALID.items():
        if "error" in compiled_ok.get(name, {"error": 1}):
            out[name] = "refused (compile error)"
            continue
        try:
            out[name] = "IGNORED (lets the invalid instance through)" if lets_through(
                lib, engine, FEATURES[name], text) else "enforced"
        except Exception as exc:
            out[name] = f"error: {str(exc).splitlines()[0][:80]}"
    return out

def coverage(lib: Library, engine: Engine, compiled_ok: dict[str, Any]) -> dict[str, Any]:
    """Greedy output of each feature schema that compiled, checked with jsonschema; per-token overhead."""
    import jsonschema

    out: dict[str, Any] = {}
    secs = steps = 0.0
    for name, schema in FEATURES.items():
        if "error" in compiled_ok.get(name, {"error": 1}):
            out[name] = "compile error"
            continue
        msgs = [{"role": "user", "content": f"Answer with JSON that matches this schema: {json.dumps(schema)}"}]
        ids = engine.encode_chat(msgs)
        timed = Timed(lib.constraint(lib.compile(schema)))
        try:
            r = generate(engine, ids, SamplingParams(max_new_tokens=160, temperature=0), timed)
        except Exception as exc:
            out[name] = f"generation error: {str(exc).splitlines()[0][:100]}"
            continue
        secs += timed.seconds
        steps += timed.steps
        try:
            jsonschema.validate(json.loads(r["text"]), schema)
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"invalid ({r['finish']}): {type(exc).__name__}: {r['text'][:60]!r}"
    return {"features": out, "ok": sum(v == "ok" for v in out.values()), "of": len(out),
            "mean_constraint_us_per_token": 1e6 * secs / max(steps, 1)}


def overhead(lib: Library, engine: Engine, rounds: int) -> dict[str, Any]:
    """Per-token time in the library (mask + advance) and decode tok/s on ORDER_SCHEMA, greedy."""
    ids = engine.encode_chat(PROMPT)
    compiled = lib.compile(ORDER_SCHEMA)
    per_tok, rates = [], []
    for _ in range(rounds):
        timed = Timed(lib.constraint(compiled))
        r = generate(engine, ids, SamplingParams(max_new_tokens=400, temperature=0), timed)
        per_tok.append(1e6 * timed.seconds / timed.steps)
        rates.append(r["decode_tok_s"])
    return {"constraint_us_per_token": statistics.median(per_tok), "decode_tok_s": statistics.median(rates),
            "tokens": r["tokens"]}


def libraries(engine: Engine, rounds: int) -> dict[str, Any]:
    makers: list[tuple[str, Callable[[Engine], Library]]] = [
        ("llguidance", LLGuidance), ("outlines-core", Outlines), ("xgrammar", XGrammar)
    ]
    out: dict[str, Any] = {}
    for name, make in makers:
        try:
            t = time.perf_counter()
            lib = make(engine)
            setup_ms = (time.perf_counter() - t) * 1e3
        except ImportError as exc:
            out[name] = {"error": f"not installed: {exc}"}
            continue
        print(f"  {name} ...", file=sys.stderr, flush=True)
        comp = compile_times(lib, engine)
        out[name] = {
            "tokenizer_setup_ms": setup_ms,
            "overhead": overhead(lib, engine, rounds),
            "compile": comp,
            "coverage": coverage(lib, engine, comp),
            "faithfulness": faithfulness(lib, engine, comp),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the tests' default bundle)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per mode (medians reported)")
    ap.add_argument("--libraries", action="store_true", help="also compare llguidance, outlines-core, xgrammar")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    import onnxruntime

    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_before": loadavg(),
        "cpu": platform.processor() or platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        "json_format": JSON_FORMAT,
        "first_use": first_use(args.bundle),
    }
    engine = load_engine(args.bundle)
    print("speed ...", file=sys.stderr, flush=True)
    result["speed"] = speed(engine, args.rounds)
    result["compile_llguidance"] = compile_times(LLGuidance(engine), engine)
    if args.libraries:
        print("libraries ...", file=sys.stderr, flush=True)
        result["libraries"] = libraries(engine, max(2, args.rounds // 2))
    result["load_after"] = loadavg()
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
