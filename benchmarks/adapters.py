"""LoRA adapters on the default model (not CI; results feed docs/benchmarks.md and docs/engine.md).

Builds the same weights twice with the direct builder, once without LoRA slots and once with slots on every
projection (what `nanofleet export` writes), then decodes greedily, rounds interleaved:

    no slots                 the graph before adapters existed
    slots, none active       the cost of being able to take an adapter (rank-0 MatMul pair + Add per slot)
    slots + adapter          each --adapter bundle bound through the engine's IO binding (our choice)
    slots + adapter, ORT Run the same adapter through onnxruntime's RunOptions.add_active_adapter: only a plain
                             Run applies it, so the KV cache cannot be bound in place and is copied every step

plus, per adapter, load time, bytes and resident memory added, and the per-request switch (binding another
adapter's matrices into a new request's state). Run it alone (`/work/heavy.sh --exclusive`); the load average is
recorded before and after.

    /work/heavy.sh --exclusive .venv/bin/python benchmarks/adapters.py --precision int8 \\
        --adapter .cache/test-adapters/adapter-qv-int8-*/adapter --json benchmarks/results/adapters.json

The adapters must be built for a base of this precision; their matrices are bound to this run's own graph
(same slot names and shapes), which a bundle's manifest check would refuse, so the check is skipped here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from device.engine import Engine, EngineOptions  # noqa: E402
from device.engine.adapters import Adapter, check_fits, read_adapter  # noqa: E402
from device.engine.bench import bench_prompt  # noqa: E402
from export.checkpoint import open_checkpoint  # noqa: E402
from export.direct import build_direct  # noqa: E402
from export.fuse_gqa import gqa_graph_spec, lora_slots  # noqa: E402
from export.quantize import RECIPES  # noqa: E402
from export.sources import load_config, load_tokenizer, resolve_source  # noqa: E402
from manifests import ADAPTER_FILE, LORA_SITES, ArchConfig  # noqa: E402


def build(out: Path, recipe: str, sites: tuple[str, ...]) -> tuple[Path, Any, ArchConfig]:
    src = resolve_source(None)
    config = load_config(src)
    ck = open_checkpoint(src.folder, src.gguf_file, config)
    cd = config.to_dict()
    build_direct(cd, ck.get, ck.has, out, None if recipe == "fp32" else RECIPES[recipe], 2048, lora_sites=sites)
    ck.close()
    load_tokenizer(src).backend_tokenizer.save(str(out / "tokenizer.json"))
    from export.archs import spec_for

    return (
        out,
        gqa_graph_spec(cd["num_hidden_layers"], lora=lora_slots(cd, sites)),
        spec_for(config).arch_config(config),
    )


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def decode_engine(engine: Engine, prompt: np.ndarray, new: int, adapter: Adapter | None) -> tuple[float, float]:
    """(TTFT ms, decode tok/s): the engine's own loop, greedy."""
    state = engine.new_state(prompt.shape[0] + new, adapter)
    t0 = time.perf_counter()
    tok = int(np.argmax(engine.prefill(state, prompt)))
    t1 = time.perf_counter()
    for _ in range(new - 1):
        tok = int(np.argmax(engine.forward(state, [tok])[0]))
    return (t1 - t0) * 1000, (new - 1) / (time.perf_counter() - t1)


def decode_ort_run(sess: ort.InferenceSession, arch: ArchConfig, prompt: np.ndarray, new: int,
                   lora: ort.LoraAdapter) -> tuple[float, float]:  # fmt: skip
    """The same greedy loop through session.run_with_ort_values + RunOptions.add_active_adapter: the past KV is
    fed, the present comes back as a new, longer tensor (GroupQueryAttention without a shared buffer)."""
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    ov = ort.OrtValue.ortvalue_from_numpy
    empty = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
    past = {f"past_key_values.{i}.{kv}": ov(empty) for i in range(arch.num_layers) for kv in ("key", "value")}
    outs = ["logits", *(n.replace("past_key_values", "present") for n in past)]

    def step(ids: np.ndarray, n_past: int) -> np.ndarray:
        total = n_past + ids.shape[0]
        feeds = {"input_ids": ov(ids.reshape(1, -1).astype(np.int64)), "seqlens_k": ov(np.array([total - 1], np.int32)),
                 "total_sequence_length": ov(np.array(total, np.int32)),
                 "logits_index": ov(np.array([ids.shape[0] - 1], np.int64)), **past}  # fmt: skip
        res = sess.run_with_ort_values(outs, feeds, ro)
        for name, value in zip(past, res[1:], strict=True):
            past[name] = value
        return res[0].numpy()[0, -1]

    t0 = time.perf_counter()
    tok = int(np.argmax(step(prompt, 0)))
    t1 = time.perf_counter()
    for i in range(new - 1):
        tok = int(np.argmax(step(np.array([tok]), prompt.shape[0] + i)))
    return (t1 - t0) * 1000, (new - 1) / (time.perf_counter() - t1)


def load_adapters(engine: Engine, paths: list[Path]) -> tuple[list[Adapter], list[dict[str, Any]]]:
    """Each adapter read and made resident over ``engine`` (manifest base check skipped: see the module doc)."""
    adapters, rows = [], []
    for path in paths:
        r0, t0 = rss_mb(), time.perf_counter()
        manifest, params = read_adapter(path, None)
        nbytes = check_fits(manifest, params, engine.lora_slots)
        adapter = Adapter(manifest.name, manifest.version, path, manifest, params, nbytes)
        engine.adapters.add(adapter)
        load_ms, added = (time.perf_counter() - t0) * 1000, rss_mb() - r0
        rows.append({"name": adapter.name, "bytes": nbytes, "file_bytes": (path / ADAPTER_FILE).stat().st_size,
                     "load_ms": round(load_ms, 2), "rss_added_mb": round(added, 2)})  # fmt: skip
        adapters.append(adapter)
    return adapters, rows


def run_threads(threads: int, plain: tuple, slotted: tuple, paths: list[Path], a: argparse.Namespace) -> dict:
    opts = EngineOptions(threads=threads, spin_wait=False, weights_cache=None)
    e_plain = Engine.from_parts(plain[0], plain[2], plain[1], opts)
    e_slots = Engine.from_parts(slotted[0], slotted[2], slotted[1], opts)
    adapters, per_adapter = load_adapters(e_slots, paths)
    sess = ort.InferenceSession(str(slotted[0] / "model.onnx"), _so(threads), providers=["CPUExecutionProvider"])
    prompt = np.asarray(bench_prompt(e_plain, a.prompt_tokens), dtype=np.int64)
    new = a.new_tokens
    cases: dict[str, Any] = {
        "no slots": lambda: decode_engine(e_plain, prompt, new, None),
        "slots, none active": lambda: decode_engine(e_slots, prompt, new, None),
    }
    for ad in adapters:
        lora = ort.LoraAdapter()
        lora.Load(str(ad.path / ADAPTER_FILE))
        cases[f"slots + {ad.name}"] = lambda ad=ad: decode_engine(e_slots, prompt, new, ad)
        cases[f"slots + {ad.name}, ORT Run"] = lambda lo=lora: decode_ort_run(sess, slotted[2], prompt, new, lo)
    for fn in cases.values():  # warm-up
        fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(a.rounds):
        for name, fn in cases.items():
            samples[name].append(fn())
    switch = []
    choices = [None, *adapters]
    for i in range(200):
        t0 = time.perf_counter()
        e_slots.new_state(a.prompt_tokens + new, choices[i % len(choices)])
        switch.append(time.perf_counter() - t0)
    base_rate = statistics.median(r for _, r in samples["no slots"])
    rows = {}
    for name, vals in samples.items():
        rate = statistics.median(r for _, r in vals)
        ttft = statistics.median(t for t, _ in vals)
        rows[name] = {
            "decode_tok_s": round(rate, 1),
            "ttft_ms": round(ttft, 1),
            "vs_no_slots": round(rate / base_rate, 3),
            "all_tok_s": [round(r, 1) for _, r in vals],
        }
    e_plain.close()
    e_slots.close()
    return {"cases": rows, "adapters": per_adapter, "switch_ms_median": round(statistics.median(switch) * 1000, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="int8", choices=["int8", "int4", "fp32"])
    ap.add_argument("--adapter", action="append", default=[], type=Path, help="adapter bundle (repeatable)")
    ap.add_argument("--threads", type=int, action="append", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="nf-adapters-bench-"))
    plain = build(work / "plain", a.precision, ())
    slotted = build(work / "slots", a.precision, LORA_SITES)
    results: dict[str, Any] = {"precision": a.precision, "onnxruntime": ort.__version__,
                               "cpu": platform.processor() or platform.machine(), "load_start": load_start,
                               "threads": {}}  # fmt: skip
    for threads in a.threads or [1, 2]:
        results["threads"][str(threads)] = run_threads(threads, plain, slotted, a.adapter, a)
    results["load_end"] = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")


def _so(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("mlas.disable_kleidiai", "1")
    so.log_severity_level = 3
    return so


if __name__ == "__main__":
    main()
