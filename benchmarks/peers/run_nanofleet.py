"""Runner: nanofleet's engine (the project venv). Prints one JSON line.

argv: JOB_JSON with model_dir, prompt_ids, new_tokens, threads, runs, label [, weights_cache,
warmup_new_tokens]. ``warmup_new_tokens``: tokens the warm-up run decodes (default: new_tokens)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _rss import peak_rss_mb, rss_split_mb

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import onnxruntime as ort

    from device.engine import EngineOptions
    from device.engine.bench import load_for_bench
    from device.engine.weights_cache import source_files

    t = int(job["threads"])
    t0 = time.perf_counter()
    # weights_cache: the prepacked-weights cache the product uses by default (built before this process by
    # engine_peers.py, so this process only maps it); None = weights packed in this process's memory.
    options = EngineOptions(threads=t, weights_cache=job.get("weights_cache"))
    engine = load_for_bench(job["model_dir"], None, options)
    load_s = time.perf_counter() - t0
    prompt = np.asarray(job["prompt_ids"], dtype=np.int64)
    n = int(job["new_tokens"])
    ttfts, rates = [], []
    for r in range(int(job["runs"]) + 1):  # the first run warms up
        want = n if r else int(job.get("warmup_new_tokens") or n)
        state = engine.new_state(prompt.shape[0] + want)
        start = time.perf_counter()
        tok = int(np.argmax(engine.prefill(state, prompt)))
        first = time.perf_counter()
        for _ in range(want - 1):
            tok = int(np.argmax(engine.forward(state, [tok])[0]))
        end = time.perf_counter()
        del state  # freed when the request ends, as in the server, before the next run allocates its own
        if r:
            ttfts.append(first - start)
            rates.append((n - 1) / (end - first))
    print(
        json.dumps(
            {
                "runtime": "nanofleet",
                "version": f"onnxruntime {ort.__version__}",
                "weights": job.get("label", ""),
                "threads": t,
                "prompt_tokens": int(prompt.shape[0]),
                "new_tokens": n,
                "load_s": round(load_s, 3),
                "weights_source": engine.weights,
                "ttft_ms": round(statistics.median(ttfts) * 1000, 2),
                "decode_tok_s": round(statistics.median(rates), 2),
                "peak_rss_mb": peak_rss_mb(),
                **rss_split_mb(),
                "model_mb": round(sum(f.stat().st_size for f in source_files(engine.model_path)) / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
