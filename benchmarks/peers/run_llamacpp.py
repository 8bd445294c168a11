"""Peer runner: llama.cpp through llama-cpp-python (its own venv). Prints one JSON line.

argv: JOB_JSON  with gguf, prompt_ids, new_tokens, threads, runs [, requantize_from, ftype, warmup_new_tokens,
prepare_only]. ``warmup_new_tokens``: tokens the warm-up run decodes (default: new_tokens); ``prepare_only``:
only requantize (when needed) and print {"prepared": path}."""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _rss import peak_rss_mb


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import llama_cpp
    from llama_cpp import Llama

    path = job["gguf"]
    if job.get("requantize_from") and not os.path.exists(path):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(job.get("ftype", 7))  # LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        params.nthread = int(job["threads"])
        rc = llama_cpp.llama_model_quantize(
            job["requantize_from"].encode(), (path + ".tmp").encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed: {rc}")
        os.replace(path + ".tmp", path)
    if job.get("prepare_only"):
        print(json.dumps({"prepared": path, "model_mb": round(os.path.getsize(path) / 2**20, 1)}))
        return
    t = int(job["threads"])
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_threads=t, n_threads_batch=t, n_ctx=2048, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    prompt = job["prompt_ids"]
    n = int(job["new_tokens"])
    ttfts, rates = [], []
    for r in range(int(job["runs"]) + 1):  # the first run warms up
        want = n if r else int(job.get("warmup_new_tokens") or n)
        llm.reset()
        start = time.perf_counter()
        first = None
        gen = llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        for got, _tok in enumerate(gen, start=1):
            if first is None:
                first = time.perf_counter()
            if got >= want:
                break
        end = time.perf_counter()
        if r:
            ttfts.append(first - start)
            rates.append((n - 1) / (end - first))
    print(
        json.dumps(
            {
                "runtime": "llama.cpp",
                "version": llama_cpp.__version__,
                "weights": job.get("label", "Q8_0"),
                "threads": t,
                "prompt_tokens": len(prompt),
                "new_tokens": n,
                "load_s": round(load_s, 3),
                "ttft_ms": round(statistics.median(ttfts) * 1000, 2),
                "decode_tok_s": round(statistics.median(rates), 2),
                "peak_rss_mb": peak_rss_mb(),
                "model_mb": round(os.path.getsize(path) / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
