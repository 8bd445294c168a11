"""The rough edges of issue 17, each as the user met it: a busy port, a missing path, a model that is not
there, YAML errors, repeated messages, sizes."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from .conftest import nanofleet


def test_device_serve_on_a_busy_port_says_so_first(tmp_path: Path, default_bundle: tuple[Path, Path]) -> None:
    bundle, _pub = default_bundle
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = nanofleet("device", "serve", "--bundle", str(bundle), "--port", str(port), timeout=120)
    assert r.returncode == 1 and len(r.lines) == 1, r.lines
    assert f"cannot listen on 127.0.0.1:{port}" in r.lines[0] and "serving" not in r.stderr, r.lines


def test_a_missing_bundle_path_says_it_does_not_exist(tmp_path: Path) -> None:
    for argv in (["device", "serve", "--bundle"], ["device", "chat", "--bundle"], ["bench"]):
        r = nanofleet(*argv, str(tmp_path / "nope"))
        assert r.returncode == 1 and len(r.lines) == 1, (argv, r.lines)
        assert f"{tmp_path / 'nope'} does not exist" in r.lines[0], (argv, r.lines)


def test_export_of_a_missing_model_creates_no_key_and_keeps_the_hubs_words(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf")}
    r = nanofleet("export", "--model", "someone/not-a-cached-model", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 1 and len(r.lines) == 1, r.lines
    assert "not in the local Hugging Face cache" in r.lines[0]
    # Hugging Face's own sentence is there whole, not cut mid-word.
    assert r.lines[0].rstrip().endswith("pass a local folder or a .gguf file"), r.lines
    assert not (tmp_path / "config").exists(), "a signing key was created for an export that never ran"
    assert not (tmp_path / "out").exists()


def test_yaml_errors_name_the_file_on_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("device_id: x\nmqtt: [a\n")
    r = nanofleet("device", "status", "--config", str(bad))
    assert r.returncode == 1 and len(r.lines) == 1, r.lines
    assert f'in "{bad}", line 2' in r.lines[0] and "<unicode string>" not in r.lines[0]
    # The user's text is shown as written (brackets are not taken for terminal markup).
    assert "mqtt: [a" in r.lines[0], r.lines


def test_fleet_config_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("port: 8600\nbroker: {embedded: true\n")
    r = nanofleet("fleet", "serve", "--config", str(bad))
    assert r.returncode == 1 and len(r.lines) == 1, r.lines
    assert f'in "{bad}", line' in r.lines[0] and "<unicode string>" not in r.lines[0], r.lines


def test_fleet_commands_take_their_connection_after_the_sub_command(running_fleet, tmp_path: Path) -> None:  # noqa: ANN001
    import yaml

    from nanofleet.resign import resign_bundle

    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(running_fleet.server.svc.config.data_dir)}))
    r = nanofleet("fleet", "status", "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    # Without a token: a 401 that says what to do, not a bare "HTTP 401".
    r = nanofleet("fleet", "status", "--url", running_fleet.url)
    assert r.returncode == 1 and len(r.lines) == 1, r.lines
    assert "401" in r.lines[0] and "no admin token given: pass --token" in r.lines[0], r.lines
    r = nanofleet("fleet", "devices", "--url", running_fleet.url, "--token", "nfa_wrong")
    assert r.returncode == 1 and "refused the admin token" in r.lines[0], r.lines
    # Sizes in MiB, as everywhere.
    bundle = tmp_path / "b"
    resign_bundle(_default_bundle(), bundle, running_fleet.bundle_key, version=1)
    assert nanofleet("fleet", "models", "push", str(bundle), "--config", str(config)).returncode == 0
    r = nanofleet("fleet", "models", "--config", str(config))
    assert r.returncode == 0 and " MiB" in r.stdout and " MB" not in r.stdout, r.stdout


def _default_bundle() -> Path:
    from tests.export.bundle_cache import cached_bundle

    return cached_bundle("int8", [])[0]


def test_export_hides_library_warnings_unless_verbose() -> None:
    import warnings

    from export.export_cli import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn_explicit("deprecated thing", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="export.pipeline")
    assert [str(w.message) for w in seen] == ["ours"]


def test_no_message_prints_a_size_in_decimal_units() -> None:
    """Issue 17: a model's size was printed five ways (114.2 MB, 118 MB, 117.8 MB, 112.3 MiB, 109). Every size
    nanofleet prints is binary (MiB, GiB): no f-string puts a decimal unit after a value."""
    from .conftest import REPO

    decimal = re.compile(r"\}\s?[kMGT]B\b|/\s*1e[369]\b")
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for part in ("nanofleet", "fleet", "device", "export", "manifests")
        for path in sorted((REPO / part).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if decimal.search(line) and not line.lstrip().startswith("#")
    ]
    assert found == [], "\n".join(found)
