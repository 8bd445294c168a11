"""YAML documents from operators (deployment manifests: ``nanofleet fleet apply``, the dashboard's editor),
loaded with bounded memory and time.

``yaml.safe_load`` constructs no objects, but it still expands aliases (a "billion laughs" document of a
few hundred bytes grows to gigabytes: ``MemoryError``, or the OOM killer without a ulimit) and recurses
once per nesting level (``RecursionError`` at a few thousand). Here a document is refused, with one
``yaml.YAMLError`` that says why, when it is over ``MAX_BYTES``, uses an alias, nests deeper than
``MAX_DEPTH``, or holds a string that is not valid Unicode (YAML's ``"\\ud800"`` escape makes an unpaired
surrogate, which no JSON encoder can write back) or a NUL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import Node, ScalarNode

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64


class UnsafeDocumentError(yaml.YAMLError):
    """A document refused before it was built (too large, an alias, too deep, invalid text)."""


class _BoundedLoader(yaml.SafeLoader):
    """The pure-Python safe loader, with the composer (where aliases are resolved and nesting recurses)
    refusing aliases and deep nesting before any recursion gets far."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            mark = event.start_mark
            raise UnsafeDocumentError(
                f"YAML aliases are not accepted (alias *{event.anchor} at line {mark.line + 1}, "
                f"column {mark.column + 1})"
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise UnsafeDocumentError(f"the document nests deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, ScalarNode):
            _check_text(node.value)
        return node


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise UnsafeDocumentError("the document holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeDocumentError("the document holds an unpaired UTF-16 surrogate (not valid Unicode)") from None


def load(text: str) -> Any:
    """One YAML (or JSON) document, or ``UnsafeDocumentError`` / another ``yaml.YAMLError``."""
    if len(text) > MAX_BYTES:
        raise UnsafeDocumentError(f"the document is over {MAX_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # a construct we did not foresee: still one clear error, never a traceback
        raise UnsafeDocumentError("the document nests too deeply") from None
    finally:
        loader.dispose()


def load_file(path: Path) -> Any:
    """``load`` of a file, refusing one over ``MAX_BYTES`` before reading it (``OSError`` if unreadable)."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UnsafeDocumentError(f"{path} is {size} bytes, over the {MAX_BYTES}-byte limit")
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            return load(fh.read())
        except UnicodeDecodeError as exc:
            raise UnsafeDocumentError(f"{path} is not UTF-8 text: {exc.reason}") from None
