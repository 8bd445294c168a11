"""Tool calls: the prompt that offers the tools, the grammar that makes a call parse, and the parser that
turns the model's text back into OpenAI ``tool_calls`` (incrementally, for streaming).

One call format everywhere, the Hermes/Qwen one, which a template trained for tools often uses already:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Where the bundle's chat template takes ``tools`` and writes ``<tool_call>`` itself, the tools and the
history are rendered by the template. Otherwise a system message (``TOOL_PROMPT``) lists the tools and this
format; earlier calls in the history are written in it and tool results become user messages
(``Result of <name> (call <id>):``). The grammar fixes the wrapper and validates each call's arguments
against that tool's ``parameters`` schema."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from device.engine import Engine
from device.engine.constraints import Grammar

from .errors import BadRequestError
from .schemas import ChatMessage, NamedToolChoice, Tool

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
SEPARATOR = "\n"
HEAD = '{"name": "'
ARGS_KEY = '", "arguments": '
MAX_PARALLEL_CALLS = 8  # a small model left free repeats its call until max_tokens

TOOL_PROMPT = (
    "You can call these tools (JSON schemas of their arguments):\n{tools}\n\n"
    "To call a tool, answer with nothing but one block per call:\n"
    '<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>\n'
    "Otherwise answer normally."
)


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for generation: the tools that may be called, and whether the answer is
    free text ("none"), text or calls ("auto") or calls only ("required"; also a named ``tool_choice``)."""

    tools: tuple[Tool, ...] = ()
    mode: str = "none"
    parallel: bool = True

    @classmethod
    def of(cls, tools: Sequence[Tool] | None, choice: str | NamedToolChoice | None, parallel: bool) -> ToolPlan:
        tools = tuple(tools or ())
        if isinstance(choice, NamedToolChoice):
            return cls(tuple(t for t in tools if t.function.name == choice.function.name), "required", parallel)
        return cls(tools, choice or ("auto" if tools else "none"), parallel)  # OpenAI's default with tools

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)


def native_tools(engine: Engine) -> bool:
    """The bundle's template renders tools itself and writes calls in our format."""
    template = engine.chat_template
    return template is not None and template.knows_tools and CALL_OPEN.strip() in template.source


def render(
    engine: Engine, messages: Sequence[ChatMessage], tp: ToolPlan
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the chat template, ``tools`` for it or None). With tool_choice "none" the tools are
    not offered at all."""
    offered = tp.tools if tp.active else ()
    if native_tools(engine):
        template_tools = [t.model_dump(exclude_none=True) for t in offered] or None
        return [_native_message(m) for m in messages], template_tools
    rendered = [_plain_message(m, messages) for m in messages]
    return (_with_tool_prompt(rendered, offered) if offered else rendered), None


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _native_message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def format_call(name: str, arguments: str) -> str:
    return f"{CALL_OPEN}{HEAD}{name}{ARGS_KEY}{arguments}}}{CALL_CLOSE}"


def _plain_message(m: ChatMessage, history: Sequence[ChatMessage]) -> dict[str, str]:
    if m.role == "tool":
        name = next(
            (c.function.name for h in history for c in (h.tool_calls or ()) if c.id and c.id == m.tool_call_id),
            m.name or "a tool",
        )
        return {"role": "user", "content": f"Result of {name} (call {m.tool_call_id or '?'}):\n{m.text()}"}
    content = m.text()
    if m.tool_calls:
        calls = SEPARATOR.join(format_call(c.function.name, c.function.arguments) for c in m.tool_calls)
        content = f"{content}\n{calls}" if content else calls
    return {"role": m.role, "content": content}


def _with_tool_prompt(messages: list[dict[str, str]], tools: Sequence[Tool]) -> list[dict[str, str]]:
    listing = json.dumps([t.function.model_dump(exclude_none=True) for t in tools], ensure_ascii=False)
    prompt = TOOL_PROMPT.format(tools=listing)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _parameters(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    if params.get("type", "object") != "object":
        raise BadRequestError(
            f"tools: the parameters of {tool.function.name!r} must be an object schema",
            code="invalid_value", param="tools",
        )
    return params


def grammar(tp: ToolPlan, content_schema: Mapping[str, Any] | None) -> Grammar:
    """The Lark grammar of an answer: calls only ("required"), or calls or content ("auto"); content is
    free text not starting with the call marker, or JSON following ``content_schema`` when one is given."""
    from device.engine.constraints import UnsupportedSchemaError, json_schema_lark

    fns = []
    for i, tool in enumerate(tp.tools):
        try:
            args = json_schema_lark(_parameters(tool))
        except UnsupportedSchemaError as exc:
            raise BadRequestError(
                f"tools: parameters of {tool.function.name!r}: {exc}", code="unsupported_schema", param="tools"
            ) from exc
        head = json.dumps(f"{HEAD}{tool.function.name}{ARGS_KEY}", ensure_ascii=False)
        fns.append(f"fn_{i}: {head} {args} \"}}\"")
    more = f"({json.dumps(SEPARATOR)} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if tp.parallel else ""
    lines = [
        f"calls: call {more}",
        f"call: {json.dumps(CALL_OPEN)} ({' | '.join(f'fn_{i}' for i in range(len(fns)))}) {json.dumps(CALL_CLOSE)}",
        *fns,
    ]
    if tp.mode == "required":
        lines.insert(0, "start: calls")
    elif content_schema is not None:
        lines[:0] = ["start: content | calls", f"content: {json_schema_lark(content_schema)}"]
    else:
        # free text, but never text that starts like a call (then it must be one)
        lines[:0] = ["start: TEXT | calls", "TEXT: /(.|\\n)+/ & ~/<tool_call>(.|\\n)*/"]
    return Grammar.lark("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ parsing


@dataclass
class CallDelta:
    """Streaming pieces: ``content`` text, or a part of call ``index`` (its id and name once, then
    argument text)."""

    content: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Splits the constrained answer into content or tool calls as text arrives. The grammar guarantees
    the wrapper's exact spelling, so this only follows it: marker, head, the arguments' JSON (tracked by
    depth and string state to find its end), close, separator. Truncated output (max_tokens, a stop
    sequence) leaves the last call with partial arguments."""

    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    _mode: str = "undecided"  # undecided | content | expect | name | args | close
    _buf: str = ""
    _expect: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False

    @property
    def is_calls(self) -> bool:
        return bool(self.calls) or self._mode not in ("undecided", "content")

    def feed(self, text: str) -> list[CallDelta]:
        out: list[CallDelta] = []
        self._buf += text
        while self._buf:
            before = (self._mode, len(self._buf))
            self._step(out)
            if (self._mode, len(self._buf)) == before:
                break  # needs more text
        return out

    def _step(self, out: list[CallDelta]) -> None:
        buf = self._buf
        if self._mode == "undecided":
            if buf.startswith(CALL_OPEN):
                self._mode, self._expect = "expect", CALL_OPEN + HEAD
            elif not CALL_OPEN.startswith(buf):
                self._mode = "content"
        elif self._mode == "content":
            self.content += buf
            out.append(CallDelta(content=buf))
            self._buf = ""
        elif self._mode == "expect":
            n = min(len(buf), len(self._expect))
            if buf[:n] != self._expect[:n]:
                raise ValueError(f"tool call text {buf[:40]!r} does not follow the format")
            self._buf, self._expect = buf[n:], self._expect[n:]
            if not self._expect:
                self._mode = "name"
        elif self._mode == "name":
            end = buf.find(ARGS_KEY)
            if end >= 0:
                call = ParsedCall(tool_call_id(), buf[:end])
                self.calls.append(call)
                out.append(CallDelta(index=len(self.calls) - 1, id=call.id, name=call.name))
                self._buf, self._mode, self._depth = buf[end + len(ARGS_KEY):], "args", 0
        elif self._mode == "args":
            self._scan_arguments(out)
        elif self._mode == "close":
            tail = "}" + CALL_CLOSE
            n = min(len(buf), len(tail))
            if buf[:n] != tail[:n]:
                raise ValueError(f"tool call text {buf[:40]!r} does not follow the format")
            if n == len(tail):
                self._buf, self._mode, self._expect = buf[n:], "expect", SEPARATOR + CALL_OPEN + HEAD

    def _scan_arguments(self, out: list[CallDelta]) -> None:
        buf = self._buf
        end = None
        for i, ch in enumerate(buf):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        piece = buf if end is None else buf[:end]
        if piece:
            self.calls[-1].arguments += piece
            out.append(CallDelta(index=len(self.calls) - 1, arguments=piece))
        self._buf = "" if end is None else buf[end:]
        if end is not None:
            self._mode = "close"

    def finish(self) -> list[CallDelta]:
        """End of output: undecided text (a prefix of the marker, say) is content after all."""
        if self._mode == "undecided" and self._buf:
            self._mode = "content"
            return self.feed("")
        return []
