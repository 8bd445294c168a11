"""Wave planning: a pure function, checked over many fleet sizes and strategies."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from fleet.rollout import plan_waves
from manifests import DeploymentManifest


def manifest(strategy: dict) -> DeploymentManifest:
    return DeploymentManifest.from_obj(
        {"metadata": {"name": "x"}, "spec": {"bundle": {"name": "m", "version": 1}, "strategy": strategy}}
    )


@given(n=st.integers(0, 500), canary=st.integers(1, 50))
def test_canary_by_devices(n: int, canary: int) -> None:
    sizes = plan_waves(n, manifest({"type": "canary", "canary": {"devices": canary}}))
    assert sum(sizes) == n and all(s > 0 for s in sizes)
    if n:
        assert sizes[0] == min(canary, n) and len(sizes) == (1 if canary >= n else 2)


@given(n=st.integers(1, 500), pct=st.floats(0.1, 100))
def test_canary_by_percent_starts_with_at_least_one(n: int, pct: float) -> None:
    sizes = plan_waves(n, manifest({"type": "canary", "canary": {"percent": pct}}))
    assert sum(sizes) == n and sizes[0] == max(1, min(n, math.ceil(n * pct / 100)))


@given(n=st.integers(0, 500), steps=st.lists(st.floats(0.5, 100), min_size=1, max_size=6))
def test_percent_steps_are_cumulative(n: int, steps: list[float]) -> None:
    steps = sorted(steps)
    sizes = plan_waves(n, manifest({"type": "waves", "waves": {"percent_steps": steps}}))
    assert sum(sizes) == n and all(s > 0 for s in sizes)
    assert len(sizes) <= len(steps) + 1


@given(n=st.integers(0, 500), waves=st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_sizes_then_the_rest(n: int, waves: list[int]) -> None:
    sizes = plan_waves(n, manifest({"type": "waves", "waves": {"sizes": waves}}))
    assert sum(sizes) == n and all(s > 0 for s in sizes)
    if n >= sum(waves):
        assert sizes[: len(waves)] == waves


def test_examples() -> None:
    assert plan_waves(6, manifest({"type": "waves", "waves": {"percent_steps": [20, 50, 100]}})) == [2, 1, 3]
    assert plan_waves(10, manifest({"type": "waves", "waves": {"sizes": [1, 5]}})) == [1, 5, 4]
    assert plan_waves(3, manifest({"type": "all-at-once"})) == [3]
    assert plan_waves(0, manifest({"type": "all-at-once"})) == []


def test_example_fleet_config_loads() -> None:
    from pathlib import Path

    from fleet.config import FleetConfig

    cfg = FleetConfig.load(Path(__file__).resolve().parents[2] / "manifests" / "examples" / "fleet.yaml")
    assert cfg.broker.embedded and cfg.port == 8600 and cfg.trusted_keys
