"""Export benchmark (not in CI): wall time and peak RSS of `nanofleet export`.

Cases:
  default     the default model (SmolLM2-135M-Instruct GGUF), INT8 default recipe, gate included
  tinyllama   a full-size TinyLlama-1.1B-config model with random weights (22 layers, 32 heads, 4 KV heads),
              INT8; the gate is opened wide (random weights make perplexity meaningless)

Each export runs as its own process (`/usr/bin/time`-style: peak RSS from wait4's rusage), so the numbers
include imports and everything a user would wait for. Results are printed as JSON and written into
docs/benchmarks.md under "## Export" (the section is replaced, the rest of the file is kept).

    .venv/bin/python benchmarks/export_bench.py [--case default] [--case tinyllama] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Export"
LOAD_AT_START = os.getloadavg()[0]


def run_export(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nanofleet.cli", "export", "--json", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"export failed ({code}): {stdout}\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(rusage.ru_maxrss / 1024), "summary": summary}


def make_tinyllama(folder: Path) -> None:
    sys.path.insert(0, str(REPO))
    from tests.export.models import save_random_model, tinyllama_config

    save_random_model(folder, tinyllama_config())


def bench(case: str, work: Path) -> dict:
    from manifests import write_keypair

    priv, _ = write_keypair(work / f"keys-{case}")
    out = work / f"bundle-{case}"
    if case == "default":
        res = run_export(["--key", str(priv), "--out", str(out)])
    elif case == "tinyllama":
        src = work / "tinyllama-1.1b-random"
        t0 = time.perf_counter()
        make_tinyllama(src)
        print(f"made the random TinyLlama-1.1B folder in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        res = run_export(
            [
                "--model",
                str(src),
                "--key",
                str(priv),
                "--out",
                str(out),
                "--max-ppl-increase",
                "1000",
                "--min-agreement",
                "0",
            ]
        )
    else:
        raise SystemExit(f"unknown case {case}")
    s = res["summary"]
    return {
        "case": case,
        "wall_s": res["wall_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "fp32_mb": round(s["sizes"]["fp32_model_bytes"] / 1e6, 1),
        "int8_mb": round(s["sizes"]["model_bytes"] / 1e6, 1),
        "size_ratio": s["sizes"]["model_size_ratio"],
        "ppl_fp32": s["ppl_reference"],
        "ppl_int8": s["ppl_quantized"],
        "ppl_increase_pct": s["ppl_increase_pct"],
        "greedy_agreement": s["greedy_agreement"],
        "timings": s["timings"],
    }


def render(rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION,
        "",
        f"`benchmarks/export_bench.py`, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores ({cpu}), "
        f"load average {LOAD_AT_START:.1f} when it started (read times as ±10% on an idle machine, far worse on a "
        "busy one). One process per export, imports included.",
        "",
        "| case | wall s | peak RSS MB | fp32 MB | int8 MB | int8/fp32 | ppl fp32 | ppl int8 | Δppl "
        "| greedy agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['wall_s']} | {r['peak_rss_mb']} | {r['fp32_mb']} | {r['int8_mb']} | "
            f"{r['size_ratio']:.3f} | {r['ppl_fp32']:.2f} | {r['ppl_int8']:.2f} | "
            f"{r['ppl_increase_pct']:+.2f}% | "
            f"{r['greedy_agreement']:.1%} |"
        )
    lines += ["", "Step times (s):", ""]  # fuse: building the gqa graph and proving it equal to optimum's
    for r in rows:
        lines.append(f"- {r['case']}: " + ", ".join(f"{k} {v}" for k, v in r["timings"].items()))
    lines += [
        "",
        "Targets: default model export + quantize + gate ≤ 120 s here; INT8 perplexity within 2% of fp32; "
        "INT8 model ≤ 0.30× fp32. (tinyllama has random weights: its perplexity columns mean nothing.)",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(text + "\n", doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text + "\n"
    DOC.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=["default", "tinyllama"])
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temp dir under .cache)"
    )
    a = ap.parse_args()
    cases = a.case or ["default", "tinyllama"]
    base = a.work or REPO / ".cache"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-bench-", dir=base) as tmp:
        rows = []
        for case in cases:
            rows.append(bench(case, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    if not a.no_write:
        write_section(render(rows))
        print(f"wrote the Export section of {DOC}")


if __name__ == "__main__":
    main()
