"""scripts/run_tests.py: the start order and the CPU-load admission of the suite's parts."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rt() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_tests", REPO / "scripts" / "run_tests.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_tests"] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


PROFILES = {"target": (1350.0, 0.95), "export": (900.0, 1.6), "engine": (160.0, 1.0), "agent": (140.0, 0.5)}


def names(parts: list[Path]) -> list[str]:
    return [p.name for p in parts]


def test_every_part_has_an_estimate_and_the_emulated_board_starts_first(rt: ModuleType) -> None:
    found = rt.parts()
    assert {p.name for p in found} <= set(rt.ESTIMATES) , "a new tests/<part>: add it to ESTIMATES"
    assert names(rt.longest_first(found, dict(rt.ESTIMATES)))[0] == "target"


def test_a_part_that_does_not_fit_waits_and_a_lighter_one_goes_first(rt: ModuleType) -> None:
    todo = [Path(n) for n in ("target", "export", "engine", "agent")]
    sched = rt.Scheduler(todo, PROFILES, jobs=3, capacity=2.5)
    assert sched.take().name == "target"  # the longest first
    assert sched.take().name == "engine"  # export (1.6) does not fit beside target (0.95); engine (1.0) does
    assert sched.take().name == "agent"  # 0.95 + 1.0 + 0.5 <= 2.5
    sched.done(Path("engine"))
    sched.done(Path("agent"))
    assert sched.next_fit() is None  # export still does not fit beside target (0.95 + 1.6 > 2.5)
    sched.done(Path("target"))
    assert sched.take().name == "export"
    assert sched.take() is None


def test_nothing_running_means_the_next_part_starts(rt: ModuleType) -> None:
    sched = rt.Scheduler([Path("export"), Path("agent")], PROFILES, jobs=2, capacity=1.0)
    assert sched.take().name == "export"  # 1.6 > capacity, but alone it may use every core
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(sched.take().name))
    t.start()
    t.join(0.3)
    assert got == [], "agent (0.5) must wait: export alone already fills the capacity"
    sched.done(Path("export"))
    t.join(5)
    assert got == ["agent"] and sched.take() is None


def test_measured_profiles_override_the_estimates(rt: ModuleType, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    f = tmp_path / "durations.json"
    f.write_text(json.dumps({"target": {"seconds": 500, "cpu_seconds": 250}, "export": 700}))
    monkeypatch.setattr(rt, "DURATIONS", f)
    profiles = rt.known_profiles()
    assert profiles["target"] == (500.0, 0.5)
    assert profiles["export"] == (700.0, rt.ESTIMATES["export"][1])  # an old file: wall only
    f.write_text("not json")
    assert rt.known_profiles() == dict(rt.ESTIMATES)
