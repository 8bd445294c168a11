"""Build the test LoRA adapters with peft on the real default model (run as a subprocess by fixtures.py).

    python -m tests.adapters.train_lora OUT_DIR KIND

KIND ``qv``: rank 8 on q_proj/v_proj, a few AdamW steps on the greenhouse manual; ``all``: rank 4 rsLoRA on
every linear projection, a few steps on the bakery answers; ``untrained``: peft's initial state (B = 0: changes
nothing). Deterministic (seeded). ``--merged DIR`` also writes the merged model (peft's merge_and_unload) as a
Hugging Face folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).parent / "data"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {
    "qv": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "text": "greenhouse_manual.txt",
           "steps": 10, "lr": 3e-3},
    "all": {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, "use_rslora": True,
            "text": "bakery_answers.txt", "steps": 10, "lr": 2e-3},
    "untrained": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "text": "greenhouse_manual.txt",
                  "steps": 0, "lr": 0.0},
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("--merged", default=None)
    a = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model

    from export.sources import load_model, load_tokenizer, resolve_source

    spec = dict(KINDS[a.kind])
    text, steps, lr = (DATA / spec.pop("text")).read_text(), spec.pop("steps"), spec.pop("lr")
    torch.manual_seed(0)
    src = resolve_source(None)
    model, tok = load_model(src), load_tokenizer(src)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **spec))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if steps else None
    peft_model.train()
    for step in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert opt is not None
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}", flush=True)
    peft_model.eval()
    peft_model.save_pretrained(a.out)
    if a.merged:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(a.merged, safe_serialization=True)
        tok.save_pretrained(a.merged)


if __name__ == "__main__":
    main()
