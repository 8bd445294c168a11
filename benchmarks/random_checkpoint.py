"""Write a full-size random-weight Hugging Face checkpoint without ever holding it in memory.

The export benchmarks need TinyLlama-1.1B- and Mistral-7B-sized checkpoints (no hub here). Building them with
``AutoModelForCausalLM.from_config`` would materialise the whole model in RAM (29 GB fp32 for 7B), so this writes
the ``model.safetensors`` file directly: the header (names, dtypes, shapes, offsets) is known from the config,
then each tensor's bytes are generated and written in chunks of 16 M values. Weights are N(0, 0.02) as
transformers initialises them, norms are ones, stored as bf16 like the real checkpoints. A small byte-level
BPE tokenizer (trained on the shipped eval text) completes the folder.

    .venv/bin/python benchmarks/random_checkpoint.py CONFIG.json OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16 * 1024 * 1024  # values generated at a time (64 MB of fp32)


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of a Llama-family checkpoint (llama, mistral, qwen2 layout), in file order."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    nq = config["num_attention_heads"]
    nkv = config.get("num_key_value_heads") or nq
    hd = config.get("head_dim") or h // nq
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (nq * hd, h)),
            (f"{p}.self_attn.k_proj.weight", (nkv * hd, h)),
            (f"{p}.self_attn.v_proj.weight", (nkv * hd, h)),
            (f"{p}.self_attn.o_proj.weight", (h, nq * hd)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (vocab, h)))
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (round to nearest even), as uint16."""
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_random_checkpoint(config_path: Path, out: Path, seed: int = 0) -> Path:
    config = json.loads(config_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config)
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}  # type: ignore[assignment]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    part = out / "model.safetensors.partial"
    with open(part, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape in shapes:
            n = int(np.prod(shape))
            if name.endswith("norm.weight"):
                fh.write(np.full(n, 0x3F80, dtype=np.uint16).tobytes())  # bf16 1.0
                continue
            for at in range(0, n, CHUNK):
                chunk = rng.standard_normal(min(CHUNK, n - at), dtype=np.float32) * np.float32(0.02)
                fh.write(_bf16(chunk).tobytes())
    part.rename(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sys.path.insert(0, str(REPO))
    from tests.export.models import train_tokenizer

    # 2000 merges asked (861 learnt): the eval text becomes 512 tokens, about what a real 32000-piece
    # tokenizer makes of it (the tests' 400-piece one makes 1066, doubling the gate's work)
    train_tokenizer(2000).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="a Hugging Face config.json (export/configs/ has full-size ones)")
    ap.add_argument("out", type=Path, help="folder to create")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    write_random_checkpoint(a.config, a.out, a.seed)
    size = (a.out / "model.safetensors").stat().st_size
    print(json.dumps({"out": str(a.out), "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
