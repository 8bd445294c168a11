"""Unit tests with fakes: ModelHolder drain semantics and ServingStats."""

from __future__ import annotations

import threading
import time

import pytest

from device.api import DrainTimeoutError, ModelHolder, NoModelError, RequestRecord, ServingStats


class FakeEngine:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_swap_waits_for_leases_on_the_old_engine() -> None:
    a, b = FakeEngine("a"), FakeEngine("b")
    holder = ModelHolder(a)  # type: ignore[arg-type]
    release = threading.Event()
    leased = threading.Event()

    def request() -> None:
        with holder.lease() as e:
            assert e is a
            leased.set()
            release.wait(10)

    t = threading.Thread(target=request)
    t.start()
    leased.wait(5)
    done = threading.Event()
    swapper = threading.Thread(target=lambda: (holder.swap(b), done.set()))  # type: ignore[arg-type]
    swapper.start()
    time.sleep(0.2)
    assert holder.engine is b  # new requests go to b at once
    with holder.lease() as e:
        assert e is b
    assert not done.is_set() and not a.closed  # a still serves its in-flight request
    assert holder.in_flight(a) == 1  # type: ignore[arg-type]
    release.set()
    t.join(5)
    swapper.join(5)
    assert done.is_set() and a.closed and not b.closed
    assert holder.in_flight() == 0


def test_swap_drain_timeout_leaves_old_open_and_new_serving() -> None:
    a, b = FakeEngine("a"), FakeEngine("b")
    holder = ModelHolder(a)  # type: ignore[arg-type]
    with holder.lease():
        with pytest.raises(DrainTimeoutError):
            holder.swap(b, drain_timeout=0.1)  # type: ignore[arg-type]
        assert holder.engine is b and not a.closed


def test_swap_returns_old_and_empty_holder_refuses_leases() -> None:
    holder = ModelHolder()
    assert not holder.ready
    with pytest.raises(NoModelError), holder.lease():
        pass
    a = FakeEngine("a")
    assert holder.swap(a) is None  # type: ignore[arg-type]
    assert holder.ready
    assert holder.swap(None) is a and a.closed
    assert holder.swaps == 2


def test_stats_snapshot_rates_and_percentiles() -> None:
    s = ServingStats(window=3)
    s.record(RequestRecord(0.100, 10, 11, 1.0, True))  # 10 decode tokens in 1 s
    s.record(RequestRecord(0.300, 10, 21, 1.0, True))  # 20 in 1 s
    s.record_error()
    s.record_rejected()
    snap = s()
    assert snap["requests"] == 4 and snap["errors"] == 1 and snap["rejected"] == 1
    assert snap["tokens_in"] == 20 and snap["tokens_out"] == 32
    assert snap["decode_tok_s"] == 15.0
    assert snap["ttft_p50_ms"] == pytest.approx(200.0) and snap["ttft_p95_ms"] == pytest.approx(290.0)
    for _ in range(3):
        s.record(RequestRecord(0.05, 1, 1, 0.0, True))
    assert s.snapshot()["ttft_p95_ms"] == pytest.approx(50.0)  # the window forgot the old ones
    s.reset()
    assert s.snapshot()["decode_tok_s"] is None and s.snapshot()["requests"] == 7
