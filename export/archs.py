"""One declarative config per supported architecture (the optimum exporters' pattern, kept shallow).

Each ``ArchSpec`` says which Hugging Face ``model_type`` it covers and where that family keeps the numbers
the device engine needs; ``arch_config`` turns a transformers config into the manifest's ``ArchConfig`` so a
board never needs transformers. Adding a family is adding one entry to ``ARCHITECTURES`` plus a test that a
tiny random model of it exports (tests/export/test_archs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from manifests import ArchConfig

from .errors import UnsupportedArchitectureError

ONNX_TASK = "text-generation-with-past"
# The optimum text-generation-with-past graph: past_key_values.N.key/value in, present.N.* out.
GRAPH_KIND = "optimum-kv"


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    families: str
    # Attribute names differ between families only rarely; the defaults hold for every one listed here.
    layers_attr: str = "num_hidden_layers"
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str = "num_key_value_heads"
    context_attr: str = "max_position_embeddings"
    # Whether the exported graph takes position_ids (gemma2's optimum config derives them inside).
    takes_position_ids: bool = True

    def arch_config(self, config: Any, generation: dict[str, Any] | None = None) -> ArchConfig:
        """The manifest's architecture block from a transformers ``PretrainedConfig``."""
        generation = generation or {}
        heads = int(getattr(config, self.heads_attr))
        kv_heads = getattr(config, self.kv_heads_attr, None) or heads
        hidden = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        eos = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
        eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None]
        bos = generation.get("bos_token_id", getattr(config, "bos_token_id", None))
        pad = generation.get("pad_token_id", getattr(config, "pad_token_id", None))
        rope_theta = getattr(config, "rope_theta", None)
        return ArchConfig(
            architecture=self.model_type,
            num_layers=int(getattr(config, self.layers_attr)),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(config.vocab_size),
            context_length=int(getattr(config, self.context_attr)),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            pad_token_id=int(pad) if pad is not None else None,
            rope_theta=float(rope_theta) if rope_theta is not None else None,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "Llama 2/3, TinyLlama, SmolLM/SmolLM2"),
        ArchSpec("mistral", "Mistral"),
        ArchSpec("qwen2", "Qwen2, Qwen2.5"),
        ArchSpec("phi3", "Phi-3 (mini)"),
        ArchSpec("gemma2", "Gemma 2", takes_position_ids=False),
    )
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def spec_for(config: Any) -> ArchSpec:
    """The spec for a transformers config, or a named error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(str(model_type))
    if spec is None:
        listed = ", ".join(f"{s.model_type} ({s.families})" for s in ARCHITECTURES.values())
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported architectures: {listed}"
        )
    return spec
