"""Boards bootstrapped once and cloned per test, packages exported by the real fleet."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from manifests.offline.format import PACKAGE_DOC

from .conftest import Board, FleetProc


def bootstrapped(
    fleet: FleetProc, root: Path, device_id: str, v1: Path, release_pub: Path, *, with_key: bool = True, **kw: object
) -> Board:
    """A board enrolled in the fleet that committed ``v1`` and queued some telemetry, agent stopped.

    Done in-process with the agent's own Updater, Outbox and Sampler (and the fake runtime) to keep the
    suite fast: booting an agent process for each board is what the round-trip test does.
    """
    from device.agent.config import load_config
    from device.agent.runtime import ServingInfo
    from device.agent.telemetry import Sampler
    from device.agent.wiring import OutboxEmitter, agent_version, make_fetcher, make_updater, open_outbox
    from manifests.mqtt import telemetry_topic
    from tests.device_agent.fake_runtime import FakeRuntime

    # with_key=False: enrolled as by a release before boards had their own keys
    token = fleet.enroll(device_id, data_dir=root / "data" if with_key else None)
    board = Board(root, device_id, token, [release_pub, fleet.fleet_pub], **kw)  # type: ignore[arg-type]
    cfg = load_config(board.config)
    outbox = open_outbox(cfg)
    fetcher = make_fetcher(cfg)
    try:
        runtime = FakeRuntime()
        # The agent's own wiring (the board's config says disk_margin_bytes: 0).
        updater = make_updater(cfg, fetcher=fetcher, runtime=runtime, emit=OutboxEmitter(outbox, device_id))
        assert updater.bootstrap(v1) == "committed"
        sampler = Sampler(device_id, agent_version(), cfg.data_dir)
        serving: ServingInfo | None = runtime.serving()
        for _ in range(3):  # (the build callback runs under the outbox's lock: no outbox calls inside)
            outbox.put(
                telemetry_topic(device_id),
                lambda seq: sampler.sample(seq, runtime.stats(), serving, 0).to_bytes(),
            )
    finally:
        fetcher.close()
        outbox.close()
    return board


def clone(board: Board, root: Path, *, trusted: list[Path] | None = None) -> Board:
    """The same board (same id and credential) with a copy of its data dir."""
    doc = yaml.safe_load(board.config.read_text())
    copy = Board.__new__(Board)
    copy.root, copy.device_id, copy.data, copy.config, copy.proc = (
        root,
        board.device_id,
        root / "data",
        root / "agent.yaml",
        None,
    )
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(board.data, copy.data)
    doc["data_dir"] = str(copy.data)
    if trusted is not None:
        doc["trusted_keys"] = [str(p) for p in trusted]
    copy.config.write_text(yaml.safe_dump(doc))
    return copy


def export(fleet: FleetProc, deployment: str, out: Path, *args: str, cli: bool = False) -> Path:
    """An update package from the real fleet (through the CLI process, or the same code in-process)."""
    if cli:
        res = fleet.fleet_json("export-update", "--deployment", deployment, "--out", str(out), *args)
        pkg = Path(res["path"])
    else:
        from fleet.offline.media import write_package

        valid_days = float(args[args.index("--valid-days") + 1]) if "--valid-days" in args else 30.0
        with fleet.admin() as client:
            pkg = Path(write_package(client, deployment, out, valid_days=valid_days).path)
    assert (pkg / PACKAGE_DOC).is_file()
    return pkg


def snapshot(board: Board) -> dict[str, object]:
    """What must not change when a package is refused: the update record and both slots' files."""
    return {
        "state": (board.data / "state.json").read_bytes(),
        "a": board.slot_files("a"),
        "b": board.slot_files("b"),
    }
