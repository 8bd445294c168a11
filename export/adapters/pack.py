"""PEFT's per-module matrices → the base graph's LoRA slots, in the layout the device engine binds as is.

The fused graph packs q|k|v and gate|up into one MatMul each (export/fuse_gqa.py), so a slot serves every
module packed into it: its A is the modules' A matrices side by side ([in, Σr]), its B block-diagonal
([Σr, out], each module's Bᵀ in its own columns, zeros elsewhere), with each module's scale folded in, so
``(x·A)·B = Σ_m scale_m · x·A_mᵀ·B_mᵀ``: exactly peft's unmerged forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manifests import ArchConfig, LoraSlots, lora_input_names

from ..archs import ARCHITECTURES
from ..fuse_gqa import SITE_ROLES
from .peft_dir import AdapterSourceError, ModuleLora, PeftAdapter


@dataclass(frozen=True)
class PackedAdapter:
    params: dict[str, np.ndarray]  # slot input name -> [in, r] / [r, out] float32
    sites: list[str]
    layers: list[int]

    @property
    def parameters(self) -> int:
        return int(sum(a.size for a in self.params.values()))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.params.values()))


def module_roles(arch: ArchConfig) -> dict[str, tuple[int, str]]:
    """Checkpoint module path (``model.layers.3.self_attn.q_proj``) -> (layer, role) for the base's family."""
    spec = ARCHITECTURES.get(arch.architecture)
    if spec is None or spec.direct is None:
        raise AdapterSourceError(f"adapters need a base of a family with LoRA slots; {arch.architecture!r} has none")
    out = {}
    for i in range(arch.num_layers):
        for role, name in spec.direct.names.layer(i).items():
            if not role.endswith("_bias"):
                out[name.removesuffix(".weight")] = (i, role)
    return out


def pack(adapter: PeftAdapter, arch: ArchConfig, slots: LoraSlots | None) -> PackedAdapter:
    """The slot tensors of ``adapter`` for a base with ``arch`` and ``slots`` (its GraphSpec.lora)."""
    if slots is None:
        raise AdapterSourceError("the base bundle's graph has no LoRA slots; re-export it with this nanofleet "
                                 "(`nanofleet export`, --lora-sites)")  # fmt: skip
    roles = module_roles(arch)
    site_of = {role: site for site, rs in SITE_ROLES.items() for role in rs}
    by_slot: dict[tuple[int, str], list[tuple[str, ModuleLora]]] = {}
    for path, mod in adapter.modules.items():
        if path not in roles:
            covered = ", ".join(f"{r}_proj" for r in sorted(site_of))
            raise AdapterSourceError(f"{adapter.folder}: {path} is not a projection of a decoder layer of this "
                                     f"{arch.architecture} base (LoRA slots cover {covered})")  # fmt: skip
        layer, role = roles[path]
        site = site_of[role]
        if slots.site(site) is None:
            have = ", ".join(s.name for s in slots.sites)
            raise AdapterSourceError(f"{adapter.folder}: the adapter changes {path.rsplit('.', 1)[-1]}, but the base "
                                     f"graph has LoRA slots only on {have}; re-export the base with "
                                     f"--lora-sites including {site}")  # fmt: skip
        by_slot.setdefault((layer, site), []).append((role, mod))
    params: dict[str, np.ndarray] = {}
    for (layer, site), mods in sorted(by_slot.items()):
        spec = slots.site(site)
        assert spec is not None
        offsets = dict(zip(SITE_ROLES[site], np.cumsum([0, *spec.splits[:-1]]).tolist(), strict=True))
        widths = dict(zip(SITE_ROLES[site], spec.splits, strict=True))
        mods.sort(key=lambda rm: SITE_ROLES[site].index(rm[0]))  # output order inside the slot
        total = sum(m.rank for _, m in mods)
        a = np.zeros((spec.in_features, total), dtype=np.float32)  # [in, Σr]
        b = np.zeros((total, spec.out_features), dtype=np.float32)  # [Σr, out], block-diagonal
        row = 0
        for role, m in mods:
            r, ma, mb = m.rank, m.a, m.b
            if ma.shape[1] != spec.in_features or mb.shape[0] != widths[role]:
                raise AdapterSourceError(
                    f"{adapter.folder}: {m.module} is [{mb.shape[0]}x{ma.shape[1]}] but the base's "
                    f"{role}_proj is [{widths[role]}x{spec.in_features}]: another model's adapter"
                )
            a[:, row : row + r] = ma.T
            b[row : row + r, offsets[role] : offsets[role] + widths[role]] = m.scale * mb.T
            row += r
        name_a, name_b = lora_input_names(layer, site)
        params[name_a], params[name_b] = a, b
    return PackedAdapter(params, sorted({s for _, s in by_slot}, key=list(SITE_ROLES).index),
                         sorted({i for i, _ in by_slot}))  # fmt: skip


def write_adapter_file(packed: PackedAdapter, path: Path, adapter_version: int, base_version: int) -> None:
    """onnxruntime's adapter format (flatbuffers): the engine reads it back as zero-copy OrtValues."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(base_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in packed.params.items()})
    fmt.export_adapter(str(path))
