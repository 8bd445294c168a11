"""Run the test suite one tests/<part>/ folder per pytest process, then print one overall summary.

Why separate processes: the parts load heavy native libraries (torch, onnxruntime, a browser driver, an
in-process MQTT broker) and patch global state (optimum patches model classes while exporting); a process per
part keeps one part's leftovers from failing another's tests, as each part runs on its own in real use.

    python scripts/run_tests.py [pytest args...]      e.g. -m "not slow"
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parts() -> list[Path]:
    return sorted(p for p in (REPO / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py")))


def main(argv: list[str]) -> int:
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    bad: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nanofleet-junit-") as tmp:
        for part in parts():
            xml = Path(tmp) / f"{part.name}.xml"
            start = time.monotonic()
            cmd = [sys.executable, "-m", "pytest", "-q", "-ra", f"--junitxml={xml}", *argv, str(part)]
            print(f"\n=== {part.relative_to(REPO)} ===", flush=True)
            rc = subprocess.call(cmd, cwd=REPO)
            took = time.monotonic() - start
            if rc == 5:  # every test of this part deselected (e.g. -m "not slow"): not a failure
                print(f"--- {part.name}: no tests selected ({took:.0f}s)", flush=True)
                continue
            if not xml.is_file():
                bad.append(f"{part.name} (pytest exit {rc}, no report)")
                totals["errors"] += 1
                continue
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            n = int(suite.get("tests", 0))
            f, e, s = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
            totals["passed"] += n - f - e - s
            totals["failed"] += f
            totals["errors"] += e
            totals["skipped"] += s
            if rc != 0:
                bad.append(f"{part.name} (exit {rc})")
            print(f"--- {part.name}: {n - f - e - s} passed, {f} failed, {e} errors, {s} skipped ({took:.0f}s)",
                  flush=True)
    minutes = (time.monotonic() - t0) / 60
    if bad:
        print(f"\nparts with failures: {', '.join(bad)}")
    print(f"\nwhole suite in {minutes:.1f} min")
    print(f"{totals['passed']} passed, {totals['failed'] + totals['errors']} failed, {totals['skipped']} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
