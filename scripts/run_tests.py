"""Run the test suite one tests/<part>/ folder per pytest process, N processes at a time, then print one
overall summary.

Why separate processes: the parts load heavy native libraries (torch, onnxruntime, a browser driver, an
in-process MQTT broker) and patch global state (ansible patches sys.intern, which breaks torch's exporter;
optimum patches model classes while exporting); a process per part keeps one part's leftovers from failing
another's tests, as each part runs on its own in real use.

Why two at a time by default: much of the suite waits (MQTT round trips, real processes starting and being
killed, a browser, qemu), so a second part overlaps that waiting even on 2 cores. Parts share only build-once
caches under .cache/ (the default bundle, the emulated board), and those are built under a file lock. The
longest parts start first (measured durations are kept in .cache/test-durations.json; a fresh checkout uses
the static estimates below). Each part's output is printed whole when it ends, so logs never interleave.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DURATIONS = REPO / ".cache" / "test-durations.json"
# Seconds per part on the 2-core CI machine, run alone (the start order on a fresh checkout).
ESTIMATES = {
    "export": 420,
    "target": 400,
    "ansible": 300,
    "device_agent": 240,
    "device_engine": 200,
    "fleet": 170,
    "offline": 150,
    "dashboard": 120,
    "device_api": 100,
    "manifests": 20,
}


@dataclass
class PartResult:
    name: str
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    problem: str = ""  # "" when the part passed


def parts() -> list[Path]:
    return sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py")))


def longest_first(found: list[Path]) -> list[Path]:
    known: dict[str, float] = {}
    try:
        known = {k: float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(found, key=lambda p: -known.get(p.name, ESTIMATES.get(p.name, 60)))


def run_part(part: Path, argv: list[str], tmp: Path, print_lock: threading.Lock) -> PartResult:
    xml, log = tmp / f"{part.name}.xml", tmp / f"{part.name}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "--durations=5", f"--junitxml={xml}", *argv, str(part)]
    with print_lock:
        print(f"... {part.name} started", flush=True)
    start = time.monotonic()
    with open(log, "wb") as out:
        rc = subprocess.call(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    res = PartResult(part.name, seconds=time.monotonic() - start)
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
        print(f"--- {part.name}: {status} ({res.seconds:.0f}s)", flush=True)
    return res


def main(argv: list[str]) -> int:
    jobs = int(os.environ.get("NANOFLEET_TEST_JOBS", "2"))
    if argv[:1] == ["--jobs"]:
        jobs, argv = int(argv[1]), argv[2:]
    jobs = max(1, jobs)
    todo = longest_first(parts())
    print(f"running {len(todo)} parts, {jobs} at a time: {', '.join(p.name for p in todo)}", flush=True)
    t0 = time.monotonic()
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="nanofleet-tests-") as tmp, ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda p: run_part(p, argv, Path(tmp), lock), todo))
    if not argv:  # a whole run: remember how long each part took, to start the longest first next time
        DURATIONS.parent.mkdir(exist_ok=True)
        DURATIONS.write_text(json.dumps({r.name: round(r.seconds) for r in results}, indent=1) + "\n")
    bad = [r.problem for r in results if r.problem]
    minutes = (time.monotonic() - t0) / 60
    if bad:
        print(f"\nparts with failures: {', '.join(bad)}")
    print(f"\nwhole suite in {minutes:.1f} min ({jobs} parts at a time)")
    passed = sum(r.passed for r in results)
    failed = sum(r.failed + r.errors for r in results)
    print(f"{passed} passed, {failed} failed, {sum(r.skipped for r in results)} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
