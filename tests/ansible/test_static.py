"""ansible/ is lint-clean, parses, holds no default secret, and its requirement list matches pyproject."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from ._harness import ANSIBLE_DIR, REPO, VENV_BIN, ansible_env


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "profile 'production' was required, and it passed" in (proc.stdout + proc.stderr).lower()


def test_playbook_syntax_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "--syntax-check",
            "-i",
            str(ANSIBLE_DIR / "inventory/example/hosts.yml"),
            str(ANSIBLE_DIR / "site.yml"),
        ],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_inventory_has_the_documented_groups(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible-inventory"),
            "-i",
            str(ANSIBLE_DIR / "inventory/example/hosts.yml"),
            "--list",
        ],  # noqa: E501
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    inv = json.loads(proc.stdout)
    for group in ("pi4", "pi5", "jetson", "fleet", "broker", "devices"):
        assert inv.get(group, {}).get("hosts") or inv.get(group, {}).get("children"), group
    assert set(inv["devices"]["children"]) == {"pi4", "pi5", "jetson"}


def _role_defaults() -> dict[str, dict[str, object]]:
    return {
        p.parent.parent.name: yaml.safe_load(p.read_text())
        for p in sorted((ANSIBLE_DIR / "roles").glob("*/defaults/main.yml"))
    }


def test_no_default_secret_anywhere() -> None:
    defaults = _role_defaults()
    assert set(defaults) == {"mosquitto", "nanofleet_device", "nanofleet_fleet"}
    secret = re.compile(r"(password|token|secret)$")
    found = 0
    for role, doc in defaults.items():
        for key, value in doc.items():
            if secret.search(key):
                found += 1
                assert value in ("", None), f"{role}: {key} has a default value"
    assert found >= 4
    assert defaults["mosquitto"]["mosquitto_users"] == []
    # group_vars only ever derive secrets from the controller's generated credential store.
    for path in (ANSIBLE_DIR / "group_vars").glob("*.yml"):
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if secret.search(key) and isinstance(value, str):
                assert "{{" in value, f"{path.name}: {key} is a literal"


def test_device_requirements_mirror_the_device_extra() -> None:
    """When a board's onnxruntime build replaces PyPI's, the role installs the rest of the extra itself."""
    import tomllib  # Python 3.11+, as the venv is

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["device"]
    want = sorted(r for r in extra if not r.startswith("onnxruntime"))
    got = sorted(_role_defaults()["nanofleet_device"]["nanofleet_device_runtime_requirements"])
    assert got == want


def test_passwd_module_verifies_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    """The idempotency of the broker's password file rests on verifying mosquitto_passwd's own hashes."""
    sys.path.insert(0, str(ANSIBLE_DIR / "roles/mosquitto/library"))
    try:
        import mosquitto_passwd_file as mod
    finally:
        sys.path.pop(0)
    f = tmp_path / "pw"
    f.write_text("board-a:s3cret-A\nboard-b:s3cret-B\n")
    subprocess.run(["mosquitto_passwd", "-U", str(f)], check=True)
    entries = mod._read(str(f))
    assert entries is not None and set(entries) == {"board-a", "board-b"}
    assert entries["board-a"].startswith("$7$")
    assert mod._in_step(entries, {"board-a": "s3cret-A", "board-b": "s3cret-B"})
    assert not mod._in_step(entries, {"board-a": "s3cret-A", "board-b": "changed"})
    assert not mod._in_step(entries, {"board-a": "s3cret-A"})
    assert not mod._in_step(None, {"board-a": "s3cret-A"})
