"""``response_format`` and ``logprobs``: a request's grammar (or none) and the OpenAI shapes of logprobs."""

from __future__ import annotations

from typing import Any

from device.engine import Engine, InvalidParamsError
from device.engine.constraints import (
    ConstraintUnavailableError,
    Grammar,
    GrammarConstraint,
    TokenTable,
    UnsupportedSchemaError,
    engine_token_table,
)
from device.engine.sampling import TokenLogprob

from . import tools as toolcalls
from .errors import BadRequestError
from .schemas import ResponseFormat


def content_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON schema the answer's content must follow (json_object: any object), or None for text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    assert fmt.json_schema is not None
    schema = fmt.json_schema.schema_
    if isinstance(schema, bool):
        return {} if schema else {"not": {}}
    return schema


def grammar_for(fmt: ResponseFormat | None, tp: toolcalls.ToolPlan | None = None) -> Grammar | None:
    """The request's grammar; a 400 naming the unsupported schema feature (or why it cannot run here)."""
    schema = content_schema(fmt)
    try:
        if tp is not None and tp.active:
            return toolcalls.grammar(tp, schema)
        if schema is None:
            return None
        if fmt is not None and fmt.type == "json_object":
            return Grammar.json_object()
        return Grammar.json_schema(schema)
    except UnsupportedSchemaError as exc:
        param = "response_format.json_schema.schema" if schema is not None and not (tp and tp.active) else None
        raise BadRequestError(f"unsupported JSON schema: {exc}", code="unsupported_schema", param=param) from exc
    except ConstraintUnavailableError as exc:
        raise BadRequestError(str(exc), code=exc.reason, param="response_format") from exc
    except InvalidParamsError as exc:
        raise BadRequestError(str(exc), code=exc.reason) from exc


def constraint_maker(grammar: Grammar | None):  # noqa: ANN201 - ConstraintMaker | None
    if grammar is None:
        return None
    return lambda engine: GrammarConstraint(engine, grammar)


# ------------------------------------------------------------------------------------------ logprobs


def _entry(table: TokenTable, token_id: int, logprob: float) -> dict[str, Any]:
    raw = table.tokens[token_id] if token_id < len(table.tokens) else b""
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprob(table: TokenTable, lp: TokenLogprob) -> dict[str, Any]:
    """One element of ``choices[].logprobs.content`` (chat completions)."""
    return {
        **_entry(table, lp.token_id, lp.logprob),
        "top_logprobs": [_entry(table, tid, val) for tid, val in lp.top],
    }


class CompletionLogprobs:
    """``choices[].logprobs`` of the legacy completions API: parallel lists, ``text_offset`` counted in
    characters of the returned text (after any echoed prompt)."""

    def __init__(self, table: TokenTable, offset: int) -> None:
        self.table = table
        self.offset = offset

    def of(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            text = self.table.text(lp.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self.table.text(t): v for t, v in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def token_table(engine: Engine) -> TokenTable:
    return engine_token_table(engine)
