"""Full-size speed side by side: one random TinyLlama-1.1B checkpoint as our bundles and as llama.cpp's and
onnxruntime-genai's models, all run in the same session (not CI; results feed docs/benchmarks.md).

The same bf16 weights (benchmarks/random_checkpoint.py, .cache/random-checkpoints/tinyllama) become:
  nanofleet          `nanofleet export --builder direct`: int8 (8-bit MatMulNBits block 32), int4 (4-bit
                     block 32 body, 8-bit head and table) and int4-b64 (block 64: 4.5 bits per weight, as Q4_0),
                     gate opened wide (random weights)
  llama.cpp          an F16 GGUF written here with the gguf package (llama.cpp's Q/K row permutation applied, a
                     32000-piece placeholder vocabulary), requantized by llama.cpp itself to Q8_0, Q4_0, Q4_K_M
  onnxruntime-genai  its own model builder from the same folder: int8 and int4
Every runtime gets the same prompt token ids, decodes greedily with EOS ignored, in a fresh process of its own
venv (peak RSS is its own), at 1 and 2 threads and 128- and 512-token prompts, `--rounds` times interleaved.

Decode is reported as a fraction of this machine's memory bandwidth, measured in the same run (numpy reading a
1 GiB array: one process, and two at once): bytes read per token (every weight but the embedding table,
whose one row per token is negligible) x tok/s. The board rows apply the same bytes per token to published
bandwidths (FACTS.md).

    .venv/bin/python benchmarks/full_size_peers.py [--setup] [--threads 1 2] [--prompts 128 512]
        [--new-tokens 64] [--rounds 1] [--peers nanofleet,llamacpp,ortgenai] [--bundles int8,int4,int4-b64]
        [--quants Q8_0,Q4_0,Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from engine_peers import HERE, PEERS, aggregate, run  # noqa: E402

WORK = ROOT / ".cache" / "full-size"
CKPT = ROOT / ".cache" / "random-checkpoints" / "tinyllama"
CONFIG = ROOT / "export" / "configs" / "tinyllama-1.1b-chat-v1.0.json"
OPEN_GATE = ["--max-ppl-increase", "1000000", "--max-kl", "1000", "--min-top-match", "0"]
# llama.cpp's llama_ftype values
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}
# Same bits per weight, for the ratios: (nanofleet bundle, llama.cpp quant(s), onnxruntime-genai precision)
PAIRS = {"int8": ("Q8_0",), "int4": ("Q4_0", "Q4_K_M")}
# Published effective read bandwidths (GB/s) of the boards (FACTS.md): Pi 4 from llama.cpp's TinyLlama Q8_0
# 3 tok/s, Pi 5 STREAM read 1 and 2 threads, Orin Nano CPU cluster a realistic 20-30 (68 theoretical).
BOARDS = {"Raspberry Pi 4 (A72)": (3.5, 3.5), "Raspberry Pi 5 (A76)": (9.3, 13.2), "Jetson Orin Nano (A78AE)": (20, 30)}


def checkpoint() -> Path:
    if not (CKPT / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_checkpoint.py"), str(CONFIG), str(CKPT)],
                       check=True)  # fmt: skip
    return CKPT


# Our bundles by label: 8-bit block 32, 4-bit block 32 (5 bits per weight with its fp32 scales) and 4-bit block 64
# (4.5 bits per weight, exactly llama.cpp Q4_0's).
BUNDLE_PLAN = {"int8": ["--recipe", "int8"], "int4": ["--precision", "int4"], "int4-b64": ["--recipe", "int4-b64"]}


def bundles(src: Path, diagnose: bool = False, labels: tuple[str, ...] = tuple(BUNDLE_PLAN)) -> dict[str, Path]:
    """Our bundles named in ``labels``; with ``diagnose`` also each without LoRA slots (`--lora-sites none`), to
    measure what the empty slots cost at this size."""
    from manifests import write_keypair

    key = WORK / "keys" / "nanofleet.key"
    if not key.is_file():
        write_keypair(key.parent)
    out = {}
    plan = [(label, BUNDLE_PLAN[label]) for label in labels]
    if diagnose:
        plan += [(f"{label}-nolora", [*extra, "--lora-sites", "none"]) for label, extra in plan]
    for label, extra in plan:
        b = WORK / f"tinyllama-{label}"
        if not (b / "manifest.yaml").is_file():
            print(f"exporting {b.name} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "nanofleet.cli", "export", "--model", str(src), "--key", str(key),
                            "--out", str(b), "--force", "--builder", "direct", *extra, *OPEN_GATE],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
        out[label] = b
    return out


def write_f16_gguf(src: Path, path: Path) -> Path:
    """The checkpoint as an F16 llama GGUF, one tensor at a time (llama.cpp's layout: Q/K rows permuted for its
    rotary, norms F32). The vocabulary is a placeholder (3 specials, 256 byte pieces, filler pieces): runs
    feed token ids, so only its size must match."""
    if path.is_file():
        return path
    import gguf

    from export.checkpoint import SafetensorsReader

    cfg = json.loads((src / "config.json").read_text())
    ck = SafetensorsReader(src)
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    plan = [("model.embed_tokens.weight", "token_embd.weight")]
    for i in range(layers):
        for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
            hf = f"model.layers.{i}.{part}"
            plan.append((hf + ".weight", names.get_name(hf) + ".weight"))
    plan += [("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")]

    def tensor(hf: str, gname: str) -> np.ndarray:
        w = ck.get(hf)
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            n = nq if "attn_q" in gname else nkv
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w.astype(np.float32 if w.ndim == 1 else np.float16)

    writer = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    writer.add_name("tinyllama-1.1b-random")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(nq)
    writer.add_head_count_kv(nkv)
    writer.add_rope_dimension_count(cfg["hidden_size"] // nq)
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    shapes = {}
    for hf, gname in plan:  # shapes first (the header), then the data tensor by tensor
        w = tensor(hf, gname) if hf.endswith("norm.weight") else None
        shape = w.shape if w is not None else tuple(ck.get(hf).shape)
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        shapes[gname] = shape
        writer.add_tensor_info(gname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf, gname in plan:
        writer.write_tensor_data(tensor(hf, gname))
    writer.close()
    os.replace(str(path) + ".tmp", path)
    return path


def read_bytes_per_token(model: Path) -> int:
    """Bytes of weights streamed per decoded token: every weight but the embedding table (and rope caches),
    of which a token reads one row."""
    if model.suffix == ".gguf":
        import gguf

        r = gguf.GGUFReader(str(model))
        return int(sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight"))
    import onnx

    files = sorted(model.glob("*.onnx"))
    g = onnx.load(str(files[0]), load_external_data=False).graph
    # a lookup table and its scales / zero points: one row read per token
    gathered = {i for n in g.node if n.op_type in ("Gather", "GatherBlockQuantized") for i in n.input}
    rows_only = {n.input[0] for n in g.node if n.op_type == "Reshape" and n.output[0] in gathered}
    skip = gathered | rows_only | {"cos_cache", "sin_cache"}
    readers = [n for n in g.node if n.op_type not in ("Gather", "GatherBlockQuantized", "Reshape")]
    used_elsewhere = {i for n in readers for i in n.input}
    total = 0
    for t in g.initializer:
        if t.name in skip and t.name not in used_elsewhere:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def bandwidth() -> dict[str, float]:
    """GB/s of numpy summing a 1 GiB float32 array (best of 5): one process, and two processes at once."""
    code = ("import numpy as np,time; a=np.ones(2**28,np.float32); a.sum(); b=[]\n"
            "for _ in range(5):\n t=time.perf_counter(); a.sum(); b.append(time.perf_counter()-t)\n"
            "print(a.nbytes/min(b)/1e9)")  # fmt: skip
    one = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    two = sum(float(p.communicate()[0]) for p in procs)
    return {"1": round(one, 1), "2": round(two, 1)}


def jobs(base: dict[str, Any], nf: dict[str, Path], peers: list[str], diagnose: bool = False,
         quants: tuple[str, ...] = tuple(LLAMA_FTYPES)) -> list[tuple[str, Path, str, dict]]:  # fmt: skip
    out: list[tuple[str, Path, str, dict]] = []
    if "nanofleet" in peers:
        for label, b in nf.items():
            job = {**base, "model_dir": str(b), "label": f"{label} bundle", "weights_cache": str(WORK / "wcache")}
            out.append(("nanofleet", Path(sys.executable), "run_nanofleet.py", job))
            if diagnose and "-" not in label:  # the same bundle packed in this process's memory (anonymous pages)
                job = {**job, "label": f"{label} bundle, packed at load", "weights_cache": None}
                out.append(("nanofleet", Path(sys.executable), "run_nanofleet.py", job))
    if "llamacpp" in peers:
        f16 = WORK / "tinyllama-f16.gguf"
        for q, ftype in ((q, LLAMA_FTYPES[q]) for q in quants):
            out.append(("llamacpp", PEERS / "llamacpp/bin/python", "run_llamacpp.py",
                        {**base, "gguf": str(WORK / f"tinyllama-{q}.gguf"), "requantize_from": str(f16),
                         "ftype": ftype, "label": q}))  # fmt: skip
    if "ortgenai" in peers:
        for p in ("int8", "int4"):
            job = {**base, "hf_dir": str(CKPT), "model_dir": str(WORK / f"ortgenai-{p}"), "precision": p}
            out.append(("ortgenai", PEERS / "ortgenai/bin/python", "run_ortgenai.py", job))
    return out


def model_path(r: dict[str, Any], nf: dict[str, Path]) -> Path:
    if r["runtime"] == "nanofleet":
        return nf[r["weights"].split()[0]]
    if r["runtime"] == "llama.cpp":
        return WORK / f"tinyllama-{r['weights']}.gguf"
    return WORK / f"ortgenai-{r['weights'].split()[0]}"


def markdown(results: list[dict[str, Any]], bw: dict[str, float]) -> str:
    rows = ["| runtime | weights | threads | prompt | TTFT ms | TTFT vs llama.cpp | decode tok/s | vs llama.cpp "
            "(same bits) | GB/token | % of bandwidth | peak RSS MB | RSS budget MB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        head = f"| {r['runtime']} | {r.get('weights', '')} | {r['threads']} | {r['prompt_tokens']} |"
        if "error" in r:
            rows.append(f"{head} error: {r['error'][:80]} | | | | | | | | |")
            continue
        bits = "int8" if ("8" in r["weights"]) else "int4"
        refs = [x for x in results if x.get("runtime") == "llama.cpp" and x.get("weights") in PAIRS[bits]
                and x["threads"] == r["threads"] and x["prompt_tokens"] == r["prompt_tokens"]
                and "error" not in x]  # fmt: skip
        # Each ratio against llama.cpp's best at these bits (fastest decode, shortest TTFT), so a "1.0x" is met
        # against whichever of its quants suits it best.
        best = max(refs, key=lambda x: x["decode_tok_s"], default=None)
        first = min(refs, key=lambda x: x["ttft_ms"], default=None)
        gb = r["bytes_per_token"] / 1e9
        frac = gb * r["decode_tok_s"] / r.get("bandwidth_gb_s", bw)[str(r["threads"])]
        ttft = f"{r['ttft_ms'] / first['ttft_ms']:.2f}x ({first['weights']})" if first else "n/a"
        dec = f"{r['decode_tok_s'] / best['decode_tok_s']:.2f}x ({best['weights']})" if best else "n/a"
        lo_hi = r.get("decode_tok_s_range")
        spread = f" ({lo_hi[0]:.1f}-{lo_hi[1]:.1f})" if lo_hi and r.get("rounds", 1) > 1 else ""
        budget = f"{1.2 * r['model_mb'] + 150:.0f}" if r["runtime"] == "nanofleet" else ""
        lo, hi = r.get("load", [float("nan")] * 2)
        load = f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f}"
        rows.append(f"{head} {r['ttft_ms']:.0f} | {ttft} | {r['decode_tok_s']:.2f}{spread} | {dec} | {gb:.3f} | "
                    f"{frac:.0%} | {r['peak_rss_mb']:.0f} | {budget} | {load} |")  # fmt: skip
    rows += ["", f"Memory read bandwidth measured in the run: {bw['1']} GB/s (1 process), {bw['2']} GB/s (2 at once).",
             ""]  # fmt: skip
    return "\n".join(rows + board_rows(results, bw))


def board_rows(results: list[dict[str, Any]], bw: dict[str, float]) -> list[str]:
    """Per board and model file: the bandwidth ceiling (board GB/s / GB read per token, 1 / 2 threads), and
    that ceiling times the fraction of bandwidth the runtime reached here (the shortest prompt): a
    bandwidth-bound decode keeps roughly its efficiency from host to board, compute-bound parts do not."""
    shortest = min((r["prompt_tokens"] for r in results), default=0)
    variants: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        if "error" not in r and r["prompt_tokens"] == shortest and r["runtime"] != "onnxruntime-genai":
            variants.setdefault(f"{r['runtime']} {r['weights']}", {})[r["threads"]] = r
    rows = ["| board | read GB/s (1 / 2 threads) | " + " | ".join(f"{k} tok/s" for k in variants) + " |",
            "|---|---|" + "---|" * len(variants)]  # fmt: skip
    for board, (b1, b2) in BOARDS.items():
        cells = []
        for by_threads in variants.values():
            parts = []
            for t, b in ((1, b1), (2, b2)):
                r = by_threads.get(t)
                if r is None:
                    parts.append("n/a")
                    continue
                gb = r["bytes_per_token"] / 1e9
                frac = gb * r["decode_tok_s"] / r.get("bandwidth_gb_s", bw)[str(t)]
                parts.append(f"≤ {b / gb:.1f} (≈ {b * frac / gb:.1f})")
            cells.append(" / ".join(parts))
        rows.append(f"| {board} | {b1} / {b2} | " + " | ".join(cells) + " |")
    return rows


def prompt_ids(n: int) -> list[int]:
    """``n`` token ids of the bench prompt text in the checkpoint's own tokenizer (every id below its 2000
    pieces, so valid in every runtime's 32000-row table)."""
    from tokenizers import Tokenizer

    from device.engine.bench import PROMPT_TEXT

    tok = Tokenizer.from_file(str(CKPT / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
    return ids[:n]


def prepare(peers: list[str], timeout: float, diagnose: bool = False, labels: tuple[str, ...] = tuple(BUNDLE_PLAN),
            quants: tuple[str, ...] = tuple(LLAMA_FTYPES)) -> dict[str, Path]:  # fmt: skip
    """Everything the timed runs read, built before them (minutes; needs no quiet machine): the checkpoint, our
    bundles and their prepacked-weights cache entries (what the agent builds at install), the F16 GGUF and
    llama.cpp's requantizations, onnxruntime-genai's two models."""
    WORK.mkdir(parents=True, exist_ok=True)
    src = checkpoint()
    nf = bundles(src, diagnose, labels)
    code = ("import sys; from device.engine import EngineOptions; from device.engine.bench import load_for_bench;"
            "o = EngineOptions(threads=1, weights_cache=sys.argv[2]);"
            "print(load_for_bench(sys.argv[1], None, o).weights)")  # fmt: skip
    for b in nf.values():
        out = subprocess.run([sys.executable, "-c", code, str(b), str(WORK / "wcache")], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0 or out.stdout.strip() != "mapped":
            print(f"weights cache for {b} not built: {out.stderr.strip()[-500:]}", file=sys.stderr)
    base = {"prompt_ids": [1], "new_tokens": 1, "threads": 2, "runs": 0, "prepare_only": True}
    if "llamacpp" in peers:
        write_f16_gguf(src, WORK / "tinyllama-f16.gguf")
    for peer, python, script, job in jobs(base, nf, [p for p in peers if p != "nanofleet"], quants=quants):
        if python.exists():
            print(f"preparing {peer} {job.get('label') or job.get('precision')} ...", file=sys.stderr, flush=True)
            res = run(python, script, job, timeout)
            if "error" in res:
                raise SystemExit(f"preparing {peer} failed: {res['error']}")
    return nf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup-new-tokens", type=int, default=4,
                    help="tokens the warm-up run decodes (its prefill is the full prompt)")  # fmt: skip
    ap.add_argument("--runs", type=int, default=1, help="measured runs per process (median), after a warm-up")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--peers", default="nanofleet,llamacpp,ortgenai")
    ap.add_argument("--bundles", default=",".join(BUNDLE_PLAN),
                    help=f"our bundles to run, of {', '.join(BUNDLE_PLAN)}")  # fmt: skip
    ap.add_argument("--quants", default=",".join(LLAMA_FTYPES),
                    help=f"llama.cpp quantizations to run, of {', '.join(LLAMA_FTYPES)}")  # fmt: skip
    ap.add_argument("--setup", action="store_true", help="run benchmarks/peers/setup.sh for the peers first")
    ap.add_argument("--prepare-only", action="store_true", help="build every model, measure nothing")
    ap.add_argument("--diagnose", action="store_true",
                    help="add nanofleet rows that isolate causes: each bundle packed at load (no mapped cache) "
                         "and each bundle without LoRA slots")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "full_size_peers.json"))
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="measure nothing: print the tables of earlier runs' --out files (for example a 1-thread "
                         "and a 2-thread run), each row against its own run's bandwidth")  # fmt: skip
    a = ap.parse_args()
    if a.report:
        docs = [json.loads(Path(f).read_text()) for f in a.report]
        print(markdown([r for d in docs for r in d["results"]], docs[-1]["bandwidth_gb_s"]))
        return
    peers = a.peers.split(",")
    if a.setup:
        subprocess.run([str(HERE / "setup.sh"), *[p for p in peers if p != "nanofleet"]], check=False)
    labels, quants = tuple(a.bundles.split(",")), tuple(a.quants.split(","))
    unknown = [x for x in labels if x not in BUNDLE_PLAN] + [x for x in quants if x not in LLAMA_FTYPES]
    if unknown:
        raise SystemExit(f"unknown bundle or quantization: {', '.join(unknown)}")
    nf = prepare(peers, a.timeout, a.diagnose, labels, quants)
    if a.prepare_only:
        return
    load_start = os.getloadavg()
    bw = bandwidth()
    print(json.dumps({"bandwidth_gb_s": bw, "load": load_start}), flush=True)
    raw: list[dict[str, Any]] = []
    groups = []
    for threads in a.threads:
        for plen in a.prompts:
            base = {"prompt_ids": prompt_ids(plen), "new_tokens": a.new_tokens, "threads": threads, "runs": a.runs,
                    "warmup_new_tokens": a.warmup_new_tokens}  # fmt: skip
            groups.append((threads, plen, jobs(base, nf, peers, a.diagnose, quants)))
    # Rounds: every runtime once per round, the order rotated each round, so a machine whose speed drifts
    # shifts all runtimes alike; the table gives each one's median over the rounds.
    for rnd in range(a.rounds):
        for threads, plen, js in groups:
            shift = rnd % len(js)
            for peer, python, script, job in js[shift:] + js[:shift]:
                load = round(os.getloadavg()[0], 2)
                res = run(python, script, job, a.timeout) if python.exists() else {
                    "error": f"{python} missing: run benchmarks/peers/setup.sh {peer}"}  # fmt: skip
                res.setdefault("runtime", {"llamacpp": "llama.cpp", "ortgenai": "onnxruntime-genai"}.get(peer, peer))
                res.setdefault("weights", job.get("label", f"{job.get('precision', '')} (its builder)"))
                res.update(threads=threads, prompt_tokens=plen, round=rnd, load=load)
                raw.append(res)
                print(json.dumps(res), flush=True)
    results = aggregate(raw)
    for r in results:
        key = (r["runtime"], r.get("weights"), r["threads"], r["prompt_tokens"])
        loads = [x["load"] for x in raw if (x["runtime"], x.get("weights"), x["threads"], x["prompt_tokens"]) == key]
        r["load"] = [min(loads), max(loads)]
        r["bandwidth_gb_s"] = bw
        if "error" not in r:
            r["bytes_per_token"] = read_bytes_per_token(model_path(r, nf))
    doc = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "bandwidth_gb_s": bw,
           "load_at_start": load_start, "load_at_end": os.getloadavg(), "rounds": a.rounds,
           "new_tokens": a.new_tokens, "results": results, "raw": raw}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(results, bw))


if __name__ == "__main__":
    main()
