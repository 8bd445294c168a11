"""`make bench`: every benchmark in one go (not CI). Each writes its own section of docs/benchmarks.md.

1. export_bench.py: wall time and peak RSS of exporting the default model and a full-size TinyLlama-config model.
2. engine_peers.py --setup: nanofleet's engine side by side with llama.cpp, onnxruntime-genai and optimum
   (installs each peer in its own venv under .cache/peers on first use; llama-cpp-python builds ~5 min).
Run it on an otherwise idle machine: the figures are only comparable within one run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = [
    [sys.executable, str(HERE / "export_bench.py"), "--case", "default", "--case", "tinyllama"],
    [
        sys.executable,
        str(HERE / "engine_peers.py"),
        "--setup",
        "--threads",
        "1",
        "2",
        "--prompts",
        "128",
        "512",
        "--packed-row",
        "--rounds",
        "3",
    ],
]


def main() -> int:
    failed = 0
    for step in STEPS:
        print("+", " ".join(step[1:]), flush=True)
        rc = subprocess.call(step, cwd=HERE.parent)
        if rc != 0:
            print(f"benchmark step failed with exit code {rc}: {' '.join(step[1:])}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
