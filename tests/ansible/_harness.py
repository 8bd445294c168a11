"""Run the real site.yml against localhost, into scratch install roots (no systemd, no apt, no users)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


@dataclass
class Run:
    rc: int
    output: str
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def changed(self) -> dict[str, int]:
        return {host: r["changed"] for host, r in self.recap.items()}


def ansible_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / "tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LINT_OFFLINE="1",
        ANSIBLE_PIPELINING="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_playbook(inventory: Path, home: Path, *args: str, timeout: float = 600) -> Run:
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(ANSIBLE_DIR / "site.yml"), *args]
    proc = subprocess.run(
        cmd,
        cwd=ANSIBLE_DIR,
        env=ansible_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    recap = {
        m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "failed": int(m.group(5))}
        for m in _RECAP.finditer(proc.stdout)
    }
    return Run(proc.returncode, proc.stdout, recap)


def shared_site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def device_host_vars(root: Path, *, api_port: int, bundle: Path | None) -> dict[str, object]:
    """A board installed into `root` on this machine, reusing this venv's packages (fast, offline)."""
    hv: dict[str, object] = {
        "nanofleet_device_root": str(root),
        "nanofleet_device_manage_system": False,
        "nanofleet_device_user": "root",
        "nanofleet_device_group": "root",
        # The board check still runs; this host is x86_64 and small limits keep it passing here.
        "nanofleet_device_allowed_architectures": ["aarch64", "x86_64"],
        "nanofleet_device_min_ram_mb": 256,
        "nanofleet_device_min_free_disk_mb": 256,
        "nanofleet_device_install_deps": False,
        "nanofleet_device_venv_extra_site_dirs": [shared_site_packages()],
        "nanofleet_device_python": sys.executable,
        "nanofleet_device_api_bind": "127.0.0.1",
        "nanofleet_device_api_port": api_port,
        "nanofleet_device_telemetry_interval_s": 2,
        "nanofleet_device_threads": 1,
    }
    if bundle is not None:
        hv["nanofleet_device_preinstalled_bundle"] = str(bundle)
    return hv


def fleet_host_vars(root: Path) -> dict[str, object]:
    return {
        "ansible_host": "127.0.0.1",
        "nanofleet_fleet_root": str(root),
        "nanofleet_fleet_manage_system": False,
        "nanofleet_fleet_user": "root",
        "nanofleet_fleet_group": "root",
        "nanofleet_fleet_install_deps": False,
        "nanofleet_fleet_venv_extra_site_dirs": [shared_site_packages()],
        "nanofleet_fleet_python": sys.executable,
        "nanofleet_fleet_bind": "127.0.0.1",
    }


def broker_host_vars(root: Path, port: int) -> dict[str, object]:
    return {
        "ansible_host": "127.0.0.1",
        "mosquitto_root": str(root),
        "mosquitto_install_package": False,
        "mosquitto_manage_service": False,
        "mosquitto_file_group": "root",
        "mosquitto_run_user": "root",
        "mosquitto_persistence": False,
        "mosquitto_log_dest": "stderr",
        "mosquitto_listen_address": "127.0.0.1",
        "nanofleet_broker_port": port,
    }


def write_inventory(
    path: Path,
    *,
    broker: dict[str, dict[str, object]],
    fleet: dict[str, dict[str, object]],
    pi5: dict[str, dict[str, object]],
    common: dict[str, object],
    pi4: dict[str, dict[str, object]] | None = None,
) -> Path:
    """Every value is a host var: they outrank the playbook's group_vars (inventory group vars do not)."""

    def hosts(group: dict[str, dict[str, object]]) -> dict[str, object]:
        return {name: {**common, **hv} for name, hv in group.items()}

    doc = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {
                "broker": {"hosts": hosts(broker)},
                "fleet": {"hosts": hosts(fleet)},
                "devices": {"children": {"pi4": {"hosts": hosts(pi4 or {})}, "pi5": {"hosts": hosts(pi5)}}},
            },
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def exec_start(unit: Path) -> list[str]:
    """The unit's ExecStart line as argv (what systemd would run)."""
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.split("=", 1)[1])
    raise AssertionError(f"{unit} has no ExecStart line")


def unit_environment(unit: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.split("=", 1)[1]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


class Processes:
    """Long-running services the test starts the way their units would; stopped at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
