"""Read a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) into per-module matrices.

Only plain LoRA on linear layers is taken: DoRA, LoRA biases, ``modules_to_save`` (full copies of other layers)
and embedding LoRA change more than ``x·A·B`` and are refused by name, so a bundle never silently drops part
of a fine-tune. Each module's scale (``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA, per-module overrides in
``rank_pattern`` / ``alpha_pattern`` matched as peft matches them) is resolved here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_model keys: base_model.model.<module path>.lora_A.weight / .lora_B.weight (peft strips the adapter name)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class AdapterSourceError(ExportError):
    """The PEFT folder is missing, malformed, or uses a feature the bundle cannot carry."""

    reason = "adapter_source"


@dataclass(frozen=True)
class ModuleLora:
    """One adapted linear module: ``delta_W = scale · B @ A`` with A [r, in] and B [out, r] (HF layout)."""

    module: str  # e.g. model.layers.3.self_attn.q_proj
    a: np.ndarray  # [r, in] float32
    b: np.ndarray  # [out, r] float32
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class PeftAdapter:
    folder: Path
    config: dict[str, Any]
    modules: dict[str, ModuleLora]  # by module path

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    @property
    def is_noop(self) -> bool:
        """peft initialises B to zero: an adapter saved before training changes nothing."""
        return all(not np.any(m.b) for m in self.modules.values())


def read_peft(folder: str | Path) -> PeftAdapter:
    root = Path(folder)
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterSourceError(f"{root} is not a PEFT adapter folder: {CONFIG_FILE} not found")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterSourceError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterSourceError(f"{cfg_path} is not a JSON object")
    _refuse_unsupported(config, cfg_path)
    tensors = _read_tensors(root)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterSourceError(f"{root}: tensor {key!r} is not a LoRA A/B matrix of a linear layer (only "
                                     "plain LoRA is supported)")  # fmt: skip
        pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(np.float32, copy=False)
    if not pairs:
        raise AdapterSourceError(f"{root}: the adapter has no LoRA matrices")
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterSourceError(f"{root}: {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AdapterSourceError(f"{root}: {module} has A {list(a.shape)} and B {list(b.shape)}: ranks differ")
        modules[module] = ModuleLora(module, a, b, _scale(config, module, a.shape[0], root))
    return PeftAdapter(root, config, modules)


def _refuse_unsupported(config: dict[str, Any], where: Path) -> None:
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterSourceError(f"{where}: peft_type {config.get('peft_type')!r}; only LORA adapters are supported")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if config.get(flag):
            raise AdapterSourceError(f"{where}: {what} is not supported (only plain LoRA on linear layers)")
    if config.get("bias", "none") != "none":
        raise AdapterSourceError(f"{where}: bias={config['bias']!r} trains the base model's biases; only "
                                 "bias='none' is supported")  # fmt: skip
    for key in ("modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise AdapterSourceError(f"{where}: {key} ({config[key]}) trains whole layers or tokens besides "
                                     "LoRA; not supported")  # fmt: skip


def _read_tensors(root: Path) -> dict[str, np.ndarray]:
    st, pt = (root / f for f in WEIGHTS_FILES)
    try:
        if st.is_file():
            from safetensors import safe_open

            with safe_open(str(st), framework="pt") as h:  # pt: bf16 has no numpy dtype
                return {k: h.get_tensor(k).float().numpy() for k in h.keys()}  # noqa: SIM118 - not iterable
        if pt.is_file():
            import torch

            state = torch.load(str(pt), map_location="cpu", weights_only=True)
            return {k: v.float().numpy() for k, v in state.items()}
    except Exception as exc:  # a truncated or foreign file
        raise AdapterSourceError(f"cannot read the adapter weights in {root}: {exc}") from exc
    raise AdapterSourceError(f"{root} has no {' or '.join(WEIGHTS_FILES)}")


def _scale(config: dict[str, Any], module: str, rank: int, where: Path) -> float:
    """peft's scaling for ``module``: its rank and alpha (patterns matched with peft's own rule), rsLoRA or not."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = int(rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.get("r", 8)))
    alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.get("lora_alpha", 8)))
    if r != rank:
        raise AdapterSourceError(f"{where}: {module} has rank {rank} in the weights but {r} in {CONFIG_FILE}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
