"""The CLI's output convention, shared by every part's commands: rich for people, `--json` for scripts
(errors as `{"ok": false, "error", "reason"}`), one exit-code convention. Here because `device/` may import
only `manifests/` of ours, and the boards' commands must print exactly as the rest do."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
out = Console()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, *, code: int = 1, as_json: bool = False, reason: str | None = None, **extra: Any) -> NoReturn:
    """Print a clear error (or a JSON error object) and exit non-zero."""
    if as_json:
        emit_json({"ok": False, "error": message, "reason": reason, **extra})
    else:
        # soft_wrap: one error is one line (the terminal wraps it, not rich), so scripts can grep it.
        # escape: a message quoting the user's input ("mqtt: [a") is text, not rich markup.
        console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)
