"""Peer runner: optimum's ORTModelForCausalLM.generate over an optimum-kv ONNX folder (its own venv).

argv: JOB_JSON with model_dir, prompt_ids, new_tokens, threads, runs, label"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from _rss import peak_rss_mb


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import onnxruntime as ort
    import optimum
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    t = int(job["threads"])
    torch.set_num_threads(t)
    so = ort.SessionOptions()
    so.intra_op_num_threads = t
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(job["model_dir"], session_options=so, use_cache=True)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([job["prompt_ids"]])
    n = int(job["new_tokens"])

    def gen(k: int) -> float:
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - start

    ttfts, rates = [], []
    for r in range(int(job["runs"]) + 1):
        one = gen(1)
        full = gen(n)
        if r:
            ttfts.append(one)
            rates.append((n - 1) / max(full - one, 1e-9))
    size = sum(f.stat().st_size for f in Path(job["model_dir"]).iterdir() if f.suffix in (".onnx", ".data"))
    print(
        json.dumps(
            {
                "runtime": "optimum ORTModelForCausalLM",
                "version": getattr(optimum, "__version__", "?"),
                "weights": job.get("label", "int8"),
                "threads": t,
                "prompt_tokens": len(job["prompt_ids"]),
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
