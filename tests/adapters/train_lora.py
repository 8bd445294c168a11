"""Build the test LoRA adapters with peft on the real default model (run as a subprocess by fixtures.py).

    python -m tests.adapters.train_lora OUT_ROOT [KIND ...]

Every KIND (default: all of them) in one process, the default model loaded once: ``OUT_ROOT/<kind>/`` is its
PEFT folder, and ``OUT_ROOT/qv-merged/`` the default model with ``qv`` merged in (peft's merge_and_unload) as a
Hugging Face folder. KIND ``qv``: rank 8 on q_proj/v_proj, a few AdamW steps on the greenhouse manual; ``all``:
rank 4 rsLoRA on every linear projection, 5 steps on the bakery answers (each step of the 135M model costs
~6 CPU seconds; 5 already take its perplexity on them from ~31 to ~3); ``untrained``: peft's initial state
(B = 0: changes nothing). Deterministic (seeded per kind).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

DATA = Path(__file__).parent / "data"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {
    "qv": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "text": "greenhouse_manual.txt",
           "steps": 10, "lr": 3e-3},
    "all": {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, "use_rslora": True,
            "text": "bakery_answers.txt", "steps": 5, "lr": 2e-3},
    "untrained": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "text": "greenhouse_manual.txt",
                  "steps": 0, "lr": 0.0},
}  # fmt: skip
MERGED = {"qv": "qv-merged"}  # kinds whose merged model is written too, and where


def train(model: object, tok: object, kind: str, out: Path, merged: Path | None) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    spec = dict(KINDS[kind])
    text, steps, lr = (DATA / spec.pop("text")).read_text(), spec.pop("steps"), spec.pop("lr")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **spec))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # type: ignore[operator]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if steps else None
    peft_model.train()
    for step in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert opt is not None
        opt.step()
        opt.zero_grad()
        print(f"{kind} step {step}: loss {loss.item():.4f}", flush=True)
    peft_model.eval()
    peft_model.save_pretrained(out)
    if merged is not None:
        peft_model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
        tok.save_pretrained(merged)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_root")
    ap.add_argument("kinds", nargs="*", metavar="KIND", help=f"any of {sorted(KINDS)} (default: all)")
    a = ap.parse_args()
    if unknown := sorted(set(a.kinds) - set(KINDS)):
        ap.error(f"unknown kind(s) {unknown}: choose from {sorted(KINDS)}")
    from export.sources import load_model, load_tokenizer, resolve_source

    src = resolve_source(None)
    model, tok = load_model(src), load_tokenizer(src)
    root = Path(a.out_root)
    for kind in a.kinds or sorted(KINDS):
        # peft wraps (and merging rewrites) the model in place: each kind starts from a pristine copy
        merged = root / MERGED[kind] if kind in MERGED else None
        train(copy.deepcopy(model), tok, kind, root / kind, merged)


if __name__ == "__main__":
    main()
