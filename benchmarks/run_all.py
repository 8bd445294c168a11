"""`make bench`: every benchmark in one go (not CI). Each writes its own section of docs/benchmarks.md.

1. export_bench.py: wall time and peak RSS of exporting the default model and a full-size TinyLlama-config model.
2. engine_peers.py --setup: nanofleet's engine side by side with llama.cpp, onnxruntime-genai and optimum
   (installs each peer in its own venv under .cache/peers on first use; llama-cpp-python builds ~5 min).
3. full_size_peers.py --setup: the same random TinyLlama-1.1B weights as our int8/int4 bundles, llama.cpp GGUFs
   (Q8_0, Q4_0, Q4_K_M) and onnxruntime-genai's builds, 1 and 2 threads, 128- and 512-token prompts.
4. constrained_decoding.py: decode and TTFT with and without a JSON schema; grammar compile time.
5. adapters.py: decode cost of LoRA slots (none active, one adapter bound) on the default model.
Not here, because they need inputs or a long set-up of their own: ota_bytes.py (--base/--adapter/--key) and
fleet_scale.py (setup, then run; ~20 minutes at 10,000 devices); docs/benchmarks.md gives their commands.
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
    [sys.executable, str(HERE / "full_size_peers.py"), "--setup", "--threads", "1", "2", "--rounds", "2"],
    [sys.executable, str(HERE / "constrained_decoding.py")],
    [sys.executable, str(HERE / "adapters.py")],
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
