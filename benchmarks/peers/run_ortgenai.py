"""Peer runner: onnxruntime-genai with its own model builder's int8 or int4 (its own venv). Prints one JSON line.

argv: JOB_JSON with hf_dir, model_dir (built here if missing), prompt_ids, new_tokens, threads, runs
[, precision: int8 (default) | int4, warmup_new_tokens, prepare_only]. ``warmup_new_tokens``: tokens the warm-up
run decodes (default: new_tokens); ``prepare_only``: only build the model (when needed) and print
{"prepared": dir}."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _rss import peak_rss_mb


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["model_dir"])
    if not (out / "genai_config.json").is_file():
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                job["hf_dir"],
                "-o",
                str(out),
                "-p",
                job.get("precision", "int8"),
                "-e",
                "cpu",
                "-c",
                str(out) + ".cache",
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    if job.get("prepare_only"):
        print(json.dumps({"prepared": str(out)}))
        return
    import onnxruntime_genai as og

    t = int(job["threads"])
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = t
    so["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    t0 = time.perf_counter()
    model = og.Model(str(out))
    load_s = time.perf_counter() - t0
    prompt = job["prompt_ids"]
    n = int(job["new_tokens"])
    ttfts, rates = [], []
    for r in range(int(job["runs"]) + 1):  # the first run warms up
        want = n if r else int(job.get("warmup_new_tokens") or n)
        params = og.GeneratorParams(model)
        total = len(prompt) + want
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(prompt)  # prefill; the logits of the last prompt token are ready
        gen.get_next_tokens()
        first = time.perf_counter()
        got = 1
        while got < want and not gen.is_done():
            gen.generate_next_token()
            got += 1
        end = time.perf_counter()
        del gen
        if r:
            ttfts.append(first - start)
            # append_tokens ran the prefill and left its logits computed, so the first generate_next_token only
            # samples: the loop ran got - 2 forward passes, not got - 1.
            rates.append((got - 2) / (end - first))
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".onnx", ".data"))
    print(
        json.dumps(
            {
                "runtime": "onnxruntime-genai",
                "version": og.__version__,
                "weights": f"{job.get('precision', 'int8')} (its builder)",
                "threads": t,
                "prompt_tokens": len(prompt),
                "new_tokens": n,
                "load_s": round(load_s, 3),
                "ttft_ms": round(statistics.median(ttfts) * 1000, 2),
                "decode_tok_s": round(statistics.median(rates), 2),
                "peak_rss_mb": peak_rss_mb(),
                "model_mb": round(size / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
