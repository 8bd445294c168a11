"""Run the test suite one tests/<part>/ folder per pytest process, a few processes at a time, then print one
overall summary.

Why separate processes: the parts load heavy native libraries (torch, onnxruntime, a browser driver, an
in-process MQTT broker) and patch global state (ansible patches sys.intern, which breaks torch's exporter;
optimum patches model classes while exporting); a process per part keeps one part's leftovers from failing
another's tests, as each part runs on its own in real use.

Why several at a time: much of the suite waits (MQTT round trips, real processes starting and being killed,
a browser), so parts overlap that waiting even on 2 cores. Parts share only build-once caches under .cache/
(the default bundle, the emulated board), and those are built under a file lock.

Scheduling: each part has a wall time and a CPU load (CPU seconds / wall seconds), measured by the last whole
run (.cache/test-durations.json) or, on a fresh checkout such as CI, the ESTIMATES below. The longest part
starts first (the emulated-board part, qemu, is the critical path), and a part starts only while the CPU
loads of the running parts leave room for it on this machine's cores (OVERCOMMIT): the single-core qemu
part runs from the start beside two others, and parts that mostly wait fill the gaps, but no three
CPU-bound parts share two cores. Each part's output is printed whole when it ends, so logs never
interleave; the summary gives every part's wall and CPU time.

    python scripts/run_tests.py [--jobs N] [pytest args...]      e.g. -m "not slow"
    NANOFLEET_TEST_JOBS=1 python scripts/run_tests.py              one part at a time
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DURATIONS = REPO / ".cache" / "test-durations.json"
DEFAULT_JOBS = 3
# Running parts may ask for this many times the machine's cores in CPU load: parts that mostly wait leave
# room, but three CPU-bound parts at once only slow each other (and make timeouts flaky).
OVERCOMMIT = 1.3
# (wall seconds, CPU load) per part, measured in a whole run on a 2-core machine (2026-12-01, two parts at a
# time, other users' load about 1): the start order and the admission rule on a fresh checkout such as CI.
# target's wall includes waiting for the default bundle, which the export part usually builds.
ESTIMATES: dict[str, tuple[float, float]] = {
    # (wall s, CPU load) as CI measured them alone-ish; the durations file replaces them after a run.
    # target: 333 s measured 2026-12-02 (load ~3) with the board and the default bundle already built, plus
    # ~76 s for the board on a fresh machine; one full emulation now (results cache), not two.
    "target": (480, 0.95),
    # adapters: 453 s wall, 457 CPU s measured 2026-12-02 fresh (.cache/test-adapters empty, the shared fp32/int4
    # bases rebuilt in the run too; other users' load 2.3-3.4); warm 153 s. In a whole run the export part builds
    # the int8/fp32 bases it shares. (Before: 896 s wall, 647 CPU s in CI.)
    "adapters": (455, 1.0),
    "export": (440, 0.6),
    "ansible": (330, 0.5),
    "fleet": (190, 0.35),
    "device_agent": (180, 0.3),
    "device_engine": (170, 0.65),
    # scale: 240 s wall, 82 CPU s in a whole fresh run 2026-12-03 (the benchmark's own test added, ~35 s).
    "scale": (240, 0.35),
    "device_api": (125, 0.65),
    "onboarding": (110, 0.5),
    "dashboard": (95, 0.3),
    "offline": (75, 0.65),
    "security": (50, 0.55),
    "manifests": (5, 0.55),
    "tooling": (5, 0.45),
}
UNKNOWN = (60.0, 1.0)


@dataclass
class PartResult:
    name: str
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    problem: str = ""  # "" when the part passed


def parts() -> list[Path]:
    return sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py")))


def known_profiles() -> dict[str, tuple[float, float]]:
    """(wall, CPU load) per part: the last whole run's measurements over the static estimates."""
    profiles = dict(ESTIMATES)
    try:
        for name, v in json.loads(DURATIONS.read_text()).items():
            if isinstance(v, dict):  # {"seconds": wall, "cpu_seconds": cpu}
                wall = float(v["seconds"])
                profiles[name] = (wall, max(0.1, float(v.get("cpu_seconds", wall)) / max(wall, 1.0)))
            else:  # an older file: wall seconds only
                profiles[name] = (float(v), profiles.get(name, UNKNOWN)[1])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return profiles


def longest_first(found: list[Path], profiles: dict[str, tuple[float, float]] | None = None) -> list[Path]:
    profiles = profiles if profiles is not None else known_profiles()
    return sorted(found, key=lambda p: -profiles.get(p.name, UNKNOWN)[0])


class Scheduler:
    """Hands out parts longest first, at most ``jobs`` at once, their CPU loads within ``capacity``.

    A part whose load does not fit beside the running ones waits, and a shorter one that fits goes first;
    with nothing running, the next part starts whatever its load (a part alone may use every core).
    """

    def __init__(self, todo: list[Path], profiles: dict[str, tuple[float, float]], jobs: int, capacity: float):
        self.todo = list(todo)
        self.profiles = profiles
        self.jobs = jobs
        self.capacity = capacity
        self.running: dict[str, float] = {}
        self.cond = threading.Condition()

    def load(self, part: Path) -> float:
        return self.profiles.get(part.name, UNKNOWN)[1]

    def next_fit(self) -> Path | None:
        """The part that would start now (None: none fits, or no slot is free); call with ``cond`` held."""
        if len(self.running) >= self.jobs:
            return None
        busy = sum(self.running.values())
        for part in self.todo:
            if not self.running or busy + self.load(part) <= self.capacity:
                return part
        return None

    def take(self) -> Path | None:
        """The next part to run (blocking until one fits), or None when every part has been handed out."""
        with self.cond:
            while self.todo:
                part = self.next_fit()
                if part is not None:
                    self.todo.remove(part)
                    self.running[part.name] = self.load(part)
                    return part
                self.cond.wait()
            return None

    def done(self, part: Path) -> None:
        with self.cond:
            self.running.pop(part.name, None)
            self.cond.notify_all()


def _wait_with_usage(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Exit code and CPU seconds (user + system) of the process and every descendant it waited for."""
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def run_part(part: Path, argv: list[str], tmp: Path, print_lock: threading.Lock) -> PartResult:
    xml, log = tmp / f"{part.name}.xml", tmp / f"{part.name}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "--durations=5", f"--junitxml={xml}", *argv, str(part)]
    with print_lock:
        print(f"... {part.name} started", flush=True)
    start = time.monotonic()
    with open(log, "wb") as out:
        rc, cpu = _wait_with_usage(subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
    res = PartResult(part.name, seconds=time.monotonic() - start, cpu_seconds=cpu)
    if rc == 5:  # every test of this part deselected (e.g. -m "not slow"): not a failure
        pass
    elif not xml.is_file():
        res.errors, res.problem = 1, f"{part.name} (pytest exit {rc}, no report)"
    else:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = int(suite.get("tests", 0))
        res.failed, res.errors, res.skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        res.passed = n - res.failed - res.errors - res.skipped
        if rc != 0:
            res.problem = f"{part.name} (exit {rc})"
    with print_lock:
        print(f"\n=== {part.relative_to(REPO)} ===", flush=True)
        sys.stdout.write(log.read_text(errors="replace"))
        status = "no tests selected" if rc == 5 else (
            f"{res.passed} passed, {res.failed} failed, {res.errors} errors, {res.skipped} skipped"
        )
        print(f"--- {part.name}: {status} ({res.seconds:.0f}s, cpu {res.cpu_seconds:.0f}s)", flush=True)
    return res


def main(argv: list[str]) -> int:
    jobs = int(os.environ.get("NANOFLEET_TEST_JOBS", str(DEFAULT_JOBS)))
    if argv[:1] == ["--jobs"]:
        jobs, argv = int(argv[1]), argv[2:]
    jobs = max(1, jobs)
    cores = float(os.environ.get("NANOFLEET_TEST_CORES") or os.cpu_count() or 2)
    profiles = known_profiles()
    todo = longest_first(parts(), profiles)
    print(f"running {len(todo)} parts, up to {jobs} at a time, CPU load up to {cores * OVERCOMMIT:g} "
          f"({cores:g} cores): {', '.join(p.name for p in todo)}", flush=True)  # fmt: skip
    t0 = time.monotonic()
    lock = threading.Lock()
    sched = Scheduler(todo, profiles, jobs, cores * OVERCOMMIT)
    results: list[PartResult] = []

    def worker(tmp: Path) -> None:
        while (part := sched.take()) is not None:
            try:
                results.append(run_part(part, argv, tmp, lock))
            finally:
                sched.done(part)

    with tempfile.TemporaryDirectory(prefix="nanofleet-tests-") as tmp:
        threads = [threading.Thread(target=worker, args=(Path(tmp),)) for _ in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    results.sort(key=lambda r: -r.seconds)
    if not argv:  # a whole run: remember each part's wall and CPU time, to schedule the next run by them
        DURATIONS.parent.mkdir(exist_ok=True)
        DURATIONS.write_text(
            json.dumps(
                {r.name: {"seconds": round(r.seconds), "cpu_seconds": round(r.cpu_seconds)} for r in results},
                indent=1,
            )
            + "\n"
        )
    bad = [r.problem for r in results if r.problem]
    minutes = (time.monotonic() - t0) / 60
    print("\npart            wall s   cpu s   cpu load")
    for r in results:
        print(f"{r.name:<15} {r.seconds:>6.0f}  {r.cpu_seconds:>6.0f}   {r.cpu_seconds / max(r.seconds, 1):>6.2f}")
    if bad:
        print(f"\nparts with failures: {', '.join(bad)}")
    print(f"\nwhole suite in {minutes:.1f} min (up to {jobs} parts at a time)")
    passed = sum(r.passed for r in results)
    failed = sum(r.failed + r.errors for r in results)
    print(f"{passed} passed, {failed} failed, {sum(r.skipped for r in results)} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
