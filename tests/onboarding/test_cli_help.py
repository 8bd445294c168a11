"""`--help` explains itself: every option of every command has a help text, and flags show no `<bool>`."""

from __future__ import annotations

from typing import Any

from typer.main import get_command
from typer.testing import CliRunner

from nanofleet.cli import app


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = [(path, cmd)]
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        out += _commands(sub, (*path, name))
    return out


def test_every_option_has_help() -> None:
    missing = []
    for path, cmd in _commands(get_command(app)):
        for p in cmd.params:
            if p.param_type_name == "option" and not (p.help or "").strip():
                missing.append(f"nanofleet {' '.join(path)} {p.opts[0]}")
    assert missing == [], "options without help: " + ", ".join(missing)


def test_help_shows_no_bool_metavar() -> None:
    runner = CliRunner()
    for path in (("device", "enroll"), ("fleet", "status"), ("demo",), ("bundle", "resign"), ("export",)):
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "160"})
        assert r.exit_code == 0, r.output
        assert "<bool>" not in r.output and "list[" not in r.output, (path, r.output)


def test_no_help_text_describes_the_old_telemetry_authentication() -> None:
    """Offline telemetry format 2 is signed by each board's own ed25519 key; format 1's HMAC (keyed by what
    the fleet's database stores) is refused at import, so no --help may still say a file is HMAC-checked."""
    stale = [" ".join(path) for path, cmd in _commands(get_command(app)) if "HMAC" in (cmd.help or "")]
    assert stale == [], f"help texts that still say HMAC: {stale}"
    cmd = get_command(app).commands["fleet"].commands["import-telemetry"]  # type: ignore[attr-defined]
    assert "ed25519" in (cmd.help or ""), cmd.help
