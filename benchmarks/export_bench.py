"""Export benchmark (not in CI): wall time and peak RSS of `nanofleet export`, each case in its own process.

Cases:
  default          the default model (SmolLM2-135M-Instruct Q4_1 GGUF), INT8 default recipe, gate included:
                   the direct builder (the default `--builder auto`)
  default-traced   the same through optimum's traced export (`--builder traced`, the path before the direct
                   builder): the "no slower than today" comparison, in the same run
  tinyllama        full-size TinyLlama-1.1B config (22 layers, 32 heads, 4 KV heads), random bf16 weights,
                   INT8, direct builder; the gate runs but is opened wide (random weights make the metrics
                   meaningless). Target: peak RSS <= 4 GB and <= 120 s
  mistral-7b-int4  full-size Mistral-7B-v0.1 config (32 layers, hidden 4096, 8 KV heads), random bf16 weights,
                   INT4, direct builder, gate opened wide. Target: it exports on a 24 GB machine

The random checkpoints are written by benchmarks/random_checkpoint.py (streamed, never held in memory) under
.cache/random-checkpoints/ and reused; the 7B one (14.5 GB) is deleted after its case unless --keep. The traced
path is never run at full size: it peaked at 17.6 GB on TinyLlama (docs/benchmarks.md).

Peak RSS is the export process's own (wait4's ru_maxrss; the gate runs in the same process). Results are printed
as JSON and written into docs/benchmarks.md under "## Export" (the section is replaced, the rest kept).

    .venv/bin/python benchmarks/export_bench.py [--case default] [--case default-traced] [--case tinyllama]
        [--case mistral-7b-int4] [--no-write] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Export"
CHECKPOINTS = REPO / ".cache" / "random-checkpoints"
CONFIGS = {
    "tinyllama": REPO / "export" / "configs" / "tinyllama-1.1b-chat-v1.0.json",
    "mistral-7b-int4": REPO / "export" / "configs" / "mistral-7b-v0.1.json",
}
OPEN_GATE = ["--max-ppl-increase", "1000000", "--max-kl", "1000", "--min-top-match", "0"]
CASES = ("default", "default-traced", "tinyllama", "mistral-7b-int4")


def run_export(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nanofleet.cli", "export", "--json", *args]
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        _, status, rusage = os.wait4(proc.pid, 0)  # the child's own peak RSS (ru_maxrss, KiB)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"export failed ({code}): {stdout}\n{stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(rusage.ru_maxrss / 1024), "load_at_start": round(load, 2),
            "summary": json.loads(stdout)}  # fmt: skip


def random_checkpoint(case: str) -> tuple[Path, float]:
    folder = CHECKPOINTS / case
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder, 0.0
    sys.path.insert(0, str(REPO / "benchmarks"))
    from random_checkpoint import write_random_checkpoint

    t0 = time.perf_counter()
    write_random_checkpoint(CONFIGS[case], folder)
    return folder, round(time.perf_counter() - t0, 1)


def bench(case: str, work: Path, keep: bool) -> dict:
    from manifests import write_keypair

    priv, _ = write_keypair(work / f"keys-{case}")
    out = work / f"bundle-{case}"
    made_s = 0.0
    if case == "default":
        res = run_export(["--key", str(priv), "--out", str(out)])
    elif case == "default-traced":
        res = run_export(["--key", str(priv), "--out", str(out), "--builder", "traced"])
    else:
        src, made_s = random_checkpoint(case)
        extra = ["--precision", "int4"] if case.endswith("int4") else []
        try:
            res = run_export(["--model", str(src), "--key", str(priv), "--out", str(out), "--builder", "direct",
                              *extra, *OPEN_GATE])  # fmt: skip
        finally:
            if case == "mistral-7b-int4" and not keep:
                shutil.rmtree(src, ignore_errors=True)
    s = res["summary"]
    tf = s["teacher_forced"]
    row = {
        "case": case,
        "wall_s": res["wall_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "load_at_start": res["load_at_start"],
        "checkpoint_written_s": made_s,
        "recipe": s["recipe"],
        "fp32_mb": round(s["sizes"]["fp32_model_bytes"] / 1e6, 1),
        "model_mb": round(s["sizes"]["model_bytes"] / 1e6, 1),
        "size_ratio": s["sizes"]["model_size_ratio"],
        "ppl_fp32": s["ppl_reference"],
        "ppl_quantized": s["ppl_quantized"],
        "ppl_increase_pct": s["ppl_increase_pct"],
        "kl_mean": tf["kl_mean"],
        "top_token_match": tf["top_token_match"],
        "timings": s["timings"],
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def render(rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION,
        "",
        f"`benchmarks/export_bench.py`, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores ({cpu}), "
        "run under `/work/heavy.sh --exclusive`; the load average when each case started is in its row (read "
        "times as ±10% on an idle machine, far worse on a busy one). One process per export, imports included; "
        "peak RSS is that process's (the gate runs in it).",
        "",
        "| case | builder | recipe | wall s | peak RSS MB | load | model MB | /fp32 | ppl fp32 | ppl quantized | "
        "KL to fp32 | same top token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        builder = "traced" if r["case"].endswith("traced") else "direct"
        lines.append(
            f"| {r['case']} | {builder} | {r['recipe']} | {r['wall_s']} | {r['peak_rss_mb']} | {r['load_at_start']} | "
            f"{r['model_mb']} | {r['size_ratio']:.3f} | {r['ppl_fp32']:.2f} | {r['ppl_quantized']:.2f} | "
            f"{r['kl_mean']:.4f} | {r['top_token_match']:.1%} |"
        )
    lines += ["", "Step times (s):", ""]
    for r in rows:
        lines.append(f"- {r['case']}: " + ", ".join(f"{k} {v}" for k, v in r["timings"].items()))
    made = [r for r in rows if r["checkpoint_written_s"]]
    if made:
        lines += ["", "Random checkpoints written for this run (not part of the export times): "
                  + ", ".join(f"{r['case']} {r['checkpoint_written_s']} s" for r in made) + "."]  # fmt: skip
    lines += [
        "",
        "Targets: default model export + quantize + gate no slower than the traced path and ≤ 120 s; full-size "
        "TinyLlama-1.1B exported, quantized and gated with peak RSS ≤ 4 GB and ≤ 120 s; a Mistral-7B-size model "
        "exported to int4 on a 24 GB machine. (Random-weight cases: their quality columns mean nothing.)",
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
    ap.add_argument("--case", action="append", choices=CASES, help="repeatable; default: all")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--keep", action="store_true", help="keep the 7B random checkpoint (14.5 GB) afterwards")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir under .cache)")
    a = ap.parse_args()
    cases = a.case or list(CASES)
    base = a.work or REPO / ".cache"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-bench-", dir=base) as tmp:
        rows = []
        for case in cases:
            rows.append(bench(case, Path(tmp), a.keep))
            print(json.dumps(rows[-1]), flush=True)
    if not a.no_write:
        write_section(render(rows))
        print(f"wrote the Export section of {DOC}")


if __name__ == "__main__":
    main()
