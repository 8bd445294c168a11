"""`nanofleet device enroll`: a board joins a fleet in one command.

1. Local checks first (nothing is spent yet): the config folder holds no enrolment, the folders can be
   written, ``--set`` values and the rest of the config validate with the agent's own model.
2. ``GET /api/v1/enroll`` (public): the broker URL and protocol, the artifact base, the keys the fleet
   trusts and its rollback-signing key. An unreachable fleet or a URL that is not a fleet stops here.
3. ``POST /api/v1/enroll``: the one-time token for this board's own credentials (a used or expired token
   stops here, with nothing written).
4. Every file is written into a temporary folder inside the config folder, validated there
   (``load_config``), then renamed into place, ``agent.yaml`` last: the config folder holds either the old
   state or a whole enrolment, never half of one.

The board's files (``--config-dir``, default the data folder)::

    agent.yaml              the agent's config (validated; absolute paths)
    mqtt.password           the fleet-issued device token, the board's MQTT password (0600)
    api.token               the local OpenAI API's bearer token, generated here (0600)
    trusted-keys/*.pub      the bundle-signing keys the fleet trusts, its rollback key, any --trusted-key

Only ``manifests`` of ours is imported (device/ may import nothing else); the fleet is reached over HTTP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import httpx
import yaml

from manifests import KeyFormatError, atomic_write_text, fsync_dir, load_public_key
from manifests.signing import key_id_of, public_pem

from .capabilities import CapabilityProbe, SystemProbe, probe_safely
from .config import load_config
from .datadir import DataDir
from .errors import AgentError
from .identity import ensure_device_key

CONFIG_FILE = "agent.yaml"
PASSWORD_FILE = "mqtt.password"
API_TOKEN_FILE = "api.token"
KEYS_DIR = "trusted-keys"
FLEET_KEY_FILE = "fleet-signing.pub"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EnrollError(AgentError):
    """Enrolment refused or impossible; nothing was written (the message says what to do)."""

    reason = "enroll"


@dataclass
class EnrollRequest:
    """What `device enroll` was asked to do (the CLI's options)."""

    fleet_url: str
    token: str
    data_dir: Path
    config_dir: Path | None = None
    device_id: str | None = None
    hardware_class: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    api_bind: str = "127.0.0.1"
    api_port: int = 8080
    mqtt_url: str | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # dotted.key -> value, from --set
    timeout_s: float = 30.0
    probe: CapabilityProbe | None = None  # None: this board's /proc and onnxruntime (capabilities.py)

    @property
    def folder(self) -> Path:
        return (self.config_dir or self.data_dir).absolute()


@dataclass
class Enrollment:
    """What was written, for the CLI's summary and ``--json``."""

    device_id: str
    config: Path
    data_dir: Path
    fleet_url: str
    mqtt_url: str
    trusted_key_ids: list[str]
    api: str
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "device_id": self.device_id,
            "config": str(self.config),
            "data_dir": str(self.data_dir),
            "fleet_url": self.fleet_url,
            "mqtt_url": self.mqtt_url,
            "trusted_key_ids": self.trusted_key_ids,
            "api": self.api,
            "notes": self.notes,
        }


# --- the fleet over HTTP ------------------------------------------------------------------------------


class FleetEndpoint:
    """The two enrolment calls, with every failure turned into one EnrollError sentence."""

    def __init__(self, url: str, timeout_s: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def info(self) -> dict[str, Any]:
        r = self._call("GET", "/api/v1/enroll")
        if r.status_code == 404:
            raise EnrollError(f"{self.url} is not a nanofleet fleet (no /api/v1/enroll there): check --fleet")
        return self._json(r)

    def enroll(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self._call("POST", "/api/v1/enroll", json=body)
        if r.status_code == 401:
            raise EnrollError(
                "the fleet refused the enrolment token (unknown, used up or expired): "
                "make a new one with `nanofleet fleet enroll-token`"
            )
        if r.status_code == 409:
            raise EnrollError(
                f"the fleet already has a device {body.get('device_id')!r}: choose another --device-id, or "
                "rotate that device's credentials on the fleet"
            )
        return self._json(r)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise EnrollError(f"cannot reach the fleet at {self.url}: {_short(exc)}") from exc

    def _json(self, r: httpx.Response) -> dict[str, Any]:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            raise EnrollError(f"the fleet at {self.url} answered HTTP {r.status_code}: {detail}")
        try:
            doc = r.json()
        except ValueError as exc:
            raise EnrollError(f"{self.url} answered something that is not JSON: is it a nanofleet fleet?") from exc
        if not isinstance(doc, dict):
            raise EnrollError(f"{self.url} answered an unexpected document: is it a nanofleet fleet?")
        return doc


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


# --- what this board is -------------------------------------------------------------------------------


def default_device_id() -> str:
    """The hostname, made a valid device id (docs/deploy.md: name each board after its device id)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]).strip("-._")[:64]
    return name if _DEVICE_ID.match(name or "") else f"board-{secrets.token_hex(4)}"


def detect_hardware_class(model_file: Path = Path("/proc/device-tree/model")) -> str | None:
    """pi4, pi5 or jetson from the device tree; None elsewhere (the token's class then applies)."""
    try:
        model = model_file.read_bytes().decode(errors="replace").rstrip("\x00")
    except OSError:
        return None
    for needle, cls in (("Raspberry Pi 5", "pi5"), ("Raspberry Pi 4", "pi4"), ("Jetson", "jetson")):
        if needle in model:
            return cls
    return None


def _capabilities(req: EnrollRequest) -> dict[str, Any] | None:
    caps = probe_safely(req.probe or SystemProbe(req.hardware_class))
    return None if caps is None else caps.to_json()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def board_mqtt_url(announced: str, fleet_url: str) -> tuple[str, str | None]:
    """The broker URL as this board must dial it, and a note when it differs from what the fleet said.

    A fleet whose embedded broker listens on every interface announces ``mqtt://0.0.0.0:1883``; a board
    reaches it at the host it reached the fleet on."""
    u, f = urlparse(announced), urlparse(fleet_url)
    host = u.hostname or ""
    try:
        ip = ipaddress.ip_address(host)
        unroutable = ip.is_unspecified or (ip.is_loopback and not _is_loopback(f.hostname or ""))
    except ValueError:
        unroutable = host == "localhost" and not _is_loopback(f.hostname or "")
    if not unroutable or not f.hostname:
        return announced, None
    netloc = f"{f.hostname}:{u.port}" if u.port else f.hostname
    fixed = urlunparse(u._replace(netloc=netloc))
    return fixed, f"the fleet announced its broker as {announced}; this board uses {fixed} (--mqtt-url overrides)"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the config document ------------------------------------------------------------------------------


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set limits.threads=2`` items: dotted key -> YAML scalar (``2`` an int, ``true`` a bool)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key):
            raise EnrollError(f"--set wants key.path=value (e.g. limits.threads=2), got {item!r}")
        try:
            out[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def _apply_settings(doc: dict[str, Any], settings: Mapping[str, Any]) -> None:
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise EnrollError(f"--set {key}: {p} is not a section of the agent config")
            node = child
        node[leaf] = value


def config_document(
    req: EnrollRequest,
    folder: Path,
    *,
    device_id: str,
    mqtt_url: str,
    protocol: str | None,
    artifacts: str,
    keys: list[Path],
) -> dict[str, Any]:
    """The agent config, its files named inside ``folder`` (the staging copy for the check, then the real one)."""
    doc: dict[str, Any] = {
        "device_id": device_id,
        "hardware_class": req.hardware_class,
        "mqtt": {
            "url": mqtt_url,
            "protocol": protocol or "5",
            "username": device_id,
            "password_file": str(folder / PASSWORD_FILE),
        },
        "artifacts": {"base_url": artifacts},
        "trusted_keys": [str(folder / KEYS_DIR / k.name) for k in keys],
        "data_dir": str(req.data_dir.absolute()),
        "api": {"bind": req.api_bind, "port": req.api_port, "token_file": str(folder / API_TOKEN_FILE)},
    }
    if doc["hardware_class"] is None:
        del doc["hardware_class"]
    _apply_settings(doc, req.settings)
    return doc


HEADER = """\
# The nanofleet agent on this board, written by `nanofleet device enroll` (validated by
# device/agent/config.py; manifests/examples/agent.yaml documents every field).
# Start it: nanofleet device run --config {config}
"""


# --- the enrolment ------------------------------------------------------------------------------------


def already_enrolled(folder: Path) -> str | None:
    """Why ``folder`` holds an enrolment that must not be overwritten, or None."""
    cfg = folder / CONFIG_FILE
    if not cfg.exists():
        return None
    try:
        doc = yaml.safe_load(cfg.read_text()) or {}
        who = f"device {doc.get('device_id')!r}, broker {doc.get('mqtt', {}).get('url')}"
    except (OSError, yaml.YAMLError, AttributeError):
        who = "unreadable"
    return f"{cfg} already exists ({who}): already enrolled (move it away to enrol again)"


def _trusted_key_files(
    info: Mapping[str, Any], fleet_key: str, extra: list[Path], staging: Path
) -> tuple[list[Path], list[str]]:
    """Write every key the board trusts into staging/trusted-keys/; returns their files and key ids."""
    kdir = staging / KEYS_DIR
    kdir.mkdir()
    files: list[Path] = []
    ids: list[str] = []

    def add(name: str, pem: bytes, source: str) -> None:
        try:
            key = load_public_key(pem)
        except KeyFormatError as exc:
            raise EnrollError(f"{source}: {exc.message}") from exc
        kid = key_id_of(key)
        if kid in ids:
            return
        path = kdir / name
        path.write_bytes(public_pem(key))
        os.chmod(path, 0o644)
        files.append(path)
        ids.append(kid)

    for k in info.get("trusted_keys") or []:
        add(f"bundle-{k['key_id']}.pub", str(k["pem"]).encode(), "a key the fleet trusts")
    for p in extra:
        try:
            pem = p.read_bytes()
        except OSError as exc:
            raise EnrollError(f"--trusted-key {p}: {exc.strerror}") from exc
        add(p.name if p.suffix == ".pub" else p.name + ".pub", pem, f"--trusted-key {p}")
    add(FLEET_KEY_FILE, str(fleet_key).encode(), "the fleet's rollback key")
    return files, ids


def _write_secret(path: Path, value: str) -> None:
    """Mode 0600 from creation on: a secret is never readable by others, not even for an instant."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n" if value else "")
        fh.flush()
        os.fsync(fh.fileno())


def enroll(req: EnrollRequest, *, endpoint: FleetEndpoint | None = None) -> Enrollment:
    """Enrol this board (module docstring). Raises EnrollError with nothing changed on disk."""
    folder = req.folder
    if why := already_enrolled(folder):
        raise EnrollError(why)
    device_id = req.device_id or default_device_id()
    if not _DEVICE_ID.match(device_id):
        raise EnrollError(f"device id {device_id!r} must be 1-64 of A-Z a-z 0-9 _ . - (it is an MQTT topic level)")
    created = _missing_parents(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".enroll-", dir=folder))
    except OSError as exc:
        raise EnrollError(f"cannot write {exc.filename or folder}: {exc.strerror}") from exc
    fleet = endpoint or FleetEndpoint(req.fleet_url, req.timeout_s)
    done = False
    try:
        result = _enroll_into(req, fleet, staging, device_id)
        done = True
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if endpoint is None:
            fleet.close()
        if not done:  # leave no empty folders behind either
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()


def _missing_parents(path: Path) -> list[Path]:
    out: list[Path] = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return list(reversed(out))


def _enroll_into(req: EnrollRequest, fleet: FleetEndpoint, staging: Path, device_id: str) -> Enrollment:
    folder = req.folder
    info = fleet.info()
    try:
        announced, protocol = info["mqtt"]["url"], info["mqtt"].get("protocol")
        artifacts = info["artifacts_base_url"]
        fleet_key = info["fleet_public_key"]
    except (KeyError, TypeError) as exc:
        raise EnrollError(f"{fleet.url} answered an enrolment document without {exc}: is it a fleet?") from exc
    notes: list[str] = []
    if req.mqtt_url:
        mqtt_url = req.mqtt_url
    else:
        mqtt_url, note = board_mqtt_url(announced, req.fleet_url)
        if note:
            notes.append(note)
    public = str(info.get("fleet_url") or "")
    if public and board_mqtt_url("mqtt://" + (urlparse(public).hostname or ""), req.fleet_url)[1]:
        notes.append(
            f"the fleet's public URL is {public}, which this board may not reach: set public_url in the "
            "fleet's config, or downloads will fail"
        )
    keys, key_ids = _trusted_key_files(info, fleet_key, req.trusted_keys, staging)
    if not info.get("trusted_keys") and not req.trusted_keys:
        notes.append("the fleet trusts no bundle-signing key: give this board one with --trusted-key")
    build = {"device_id": device_id, "mqtt_url": mqtt_url, "protocol": protocol, "artifacts": artifacts, "keys": keys}
    # Validate the whole config before the token is spent, its paths pointing at the staged files.
    _write_secret(staging / API_TOKEN_FILE, "nfl_" + secrets.token_urlsafe(32))
    _write_secret(staging / PASSWORD_FILE, "")
    _write_config(staging / "check.yaml", config_document(req, staging, **build), final=staging / CONFIG_FILE)
    (staging / "check.yaml").unlink()
    (staging / PASSWORD_FILE).unlink()

    body: dict[str, Any] = {
        "token": req.token,
        "device_id": device_id,
        "hardware_class": req.hardware_class,
        "cpu_arch": platform.machine() or None,
        "ram_bytes": _ram_bytes(),
        # What the board can run (capabilities.py): the fleet picks its variant of a release from it.
        "capabilities": _capabilities(req),
        "tags": req.tags,
        "groups": req.groups,
    }
    # The board's own ed25519 key (identity.py): the fleet registers its public half. A board enrolled
    # before keeps its key; a new one is made in staging and moved in with the rest.
    key_home = req.data_dir if DataDir(req.data_dir).device_key.exists() else staging / "data"
    try:
        body["device_public_key"] = ensure_device_key(key_home)
    except AgentError as exc:
        raise EnrollError(exc.message) from exc
    creds = fleet.enroll({k: v for k, v in body.items() if v is not None})
    if not isinstance(creds.get("device_token"), str):
        raise EnrollError("the fleet's enrolment answer has no device_token")
    _write_secret(staging / PASSWORD_FILE, creds["device_token"])
    config = folder / CONFIG_FILE
    _write_config(staging / CONFIG_FILE, config_document(req, folder, **build), final=config, check=False)
    if key_home != req.data_dir:
        _move_device_key(DataDir(key_home).device_key, DataDir(req.data_dir).device_key)
        shutil.rmtree(key_home)
    _move_into_place(staging, folder)
    return Enrollment(
        device_id=str(creds.get("device_id") or device_id),
        config=config,
        data_dir=req.data_dir.absolute(),
        fleet_url=public or req.fleet_url,
        mqtt_url=mqtt_url,
        trusted_key_ids=key_ids,
        api=f"http://{req.api_bind}:{req.api_port}",
        notes=notes,
    )


def _write_config(path: Path, doc: dict[str, Any], *, final: Path, check: bool = True) -> None:
    """Write the config (0640) and, with ``check``, load it with the agent's own loader and trust store."""
    path.write_text(HEADER.format(config=final) + yaml.safe_dump(doc, sort_keys=False))
    os.chmod(path, 0o640)
    if not check:
        return
    try:
        load_config(path).trust_store()
    except AgentError as exc:
        lines = [x.strip() for x in exc.message.replace(f"{path}: ", "").splitlines() if x.strip()]
        raise EnrollError(lines[0] + " " + "; ".join(lines[1:]) if len(lines) > 1 else lines[0]) from exc


def _move_device_key(src: Path, dest: Path) -> None:
    """Into the data folder (another filesystem, maybe): a 0600 copy made under a temp name, then renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.enroll")
    tmp.unlink(missing_ok=True)
    _write_secret(tmp, "")
    with open(tmp, "wb") as fh:
        fh.write(src.read_bytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename each staged entry into the folder, agent.yaml last (its presence means: enrolled)."""
    for name in sorted(p.name for p in staging.iterdir() if p.name != CONFIG_FILE):
        dest = folder / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)  # a trusted-keys/ left by an enrolment that never finished
        os.replace(staging / name, dest)
    fsync_dir(folder)
    os.replace(staging / CONFIG_FILE, folder / CONFIG_FILE)
    fsync_dir(folder)


# --- systemd ------------------------------------------------------------------------------------------

UNIT_NAME = "nanofleet-agent"
UNIT_TEMPLATE = Path(__file__).resolve().parents[1] / "systemd" / "nanofleet-agent.service.j2"
SERVICE_USER = "nanofleet"


@dataclass
class Systemd:
    """Where and how the unit is installed; every command goes through ``run`` (faked in unit tests)."""

    unit_dir: Path = Path("/etc/systemd/system")
    user: str = SERVICE_USER
    run: Callable[[list[str]], None] = field(default=lambda argv: _run(argv))

    def preflight(self) -> Path:
        """Refuse before anything is spent: root, systemctl and this install's `nanofleet` are needed."""
        if os.geteuid() != 0:
            raise EnrollError("--systemd installs a system unit: run the command as root (sudo)")
        if shutil.which("systemctl") is None:
            raise EnrollError("--systemd: systemctl not found (this system does not run systemd)")
        exe = Path(sys.executable).parent / "nanofleet"
        if not exe.is_file():
            raise EnrollError(f"--systemd: {exe} not found; run the `nanofleet` of the install the unit should use")
        return exe

    def render(self, enrollment: Enrollment) -> str:
        import jinja2

        template = jinja2.Template(UNIT_TEMPLATE.read_text(), keep_trailing_newline=True)
        return template.render(
            nanofleet_venv=str(Path(sys.executable).parent.parent),
            nanofleet_config=str(enrollment.config),
            nanofleet_data_dir=str(enrollment.data_dir),
            nanofleet_user=self.user,
            nanofleet_group=self.user,
        )

    def install(self, enrollment: Enrollment) -> Path:
        """Create the service user when missing, give it the data folder and read access to the config
        folder's files, write the unit, enable and start it."""
        import grp
        import pwd

        try:
            pwd.getpwnam(self.user)
        except KeyError:
            self.run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    str(enrollment.data_dir),
                    "--shell",
                    "/usr/sbin/nologin",
                    self.user,
                ]
            )
        uid, gid = pwd.getpwnam(self.user).pw_uid, grp.getgrnam(self.user).gr_gid
        enrollment.data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(enrollment.data_dir, uid, gid)
        folder = enrollment.config.parent
        for name in (CONFIG_FILE, PASSWORD_FILE, API_TOKEN_FILE):
            os.chown(folder / name, 0, gid)
            os.chmod(folder / name, 0o640)
        unit = self.unit_dir / f"{UNIT_NAME}.service"
        atomic_write_text(unit, self.render(enrollment), mode=0o644)
        self.run(["systemctl", "daemon-reload"])
        self.run(["systemctl", "enable", "--now", f"{UNIT_NAME}.service"])
        return unit


def _run(argv: list[str]) -> None:
    import subprocess

    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnrollError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise EnrollError(f"{' '.join(argv)} failed: {msg[-1] if msg else f'exit {proc.returncode}'}")
