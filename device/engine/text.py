"""Text edges of the engine: the chat template (sandboxed jinja2), incremental detokenization and
text stop sequences. No transformers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import InvalidParamsError


class ChatTemplate:
    """A Hugging Face-style chat template rendered in jinja2's immutable sandbox (templates come from
    bundles: they are data, not code)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise InvalidParamsError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
            # a template that reads `tools` renders a request's tool list itself (device/api/tools.py)
            self.knows_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
        except TemplateError as exc:
            raise InvalidParamsError(f"chat template does not parse: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidParamsError("each message needs a string 'role' and string 'content'")
        extra = {"tools": [dict(t) for t in tools]} if tools else {}
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except InvalidParamsError:
            raise
        except Exception as exc:  # SecurityError, UndefinedError, TypeError from template code
            raise InvalidParamsError(f"chat template failed to render: {exc}") from exc


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.

    Decodes a small window (from ``prefix`` to the end) each step, so the cost per token is constant."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids[prefix:read] text was already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        full_text = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix = self.read
            self.read = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        full_text = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Holds back text that may be the start of a stop sequence; reports when one is complete.

    ``feed`` returns (text safe to emit now, stopped). On a stop, the stop sequence and anything after it
    are dropped, as OpenAI does."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i = min(i for i, _ in hits)
            out, self.pending = self.pending[:i], ""
            return out, True
        # keep the longest suffix of pending that is a proper prefix of some stop sequence
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
