"""One declarative config per supported architecture (the optimum exporters' pattern, kept shallow).

Each ``ArchSpec`` says which Hugging Face ``model_type`` it covers and where that family keeps the numbers
the device engine needs; ``arch_config`` turns a transformers config into the manifest's ``ArchConfig`` so a
board never needs transformers. Its ``direct`` part (``DirectSpec``) is what the direct builder, the checkpoint
readers and the streamed reference read: tensor names, supported activations and rope scalings, the sliding
window attribute, transformers' layer classes. Adding a family is adding one entry to ``ARCHITECTURES`` plus a
test that a tiny random model of it exports (tests/export/test_archs.py).
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
class TensorNames:
    """Where a family keeps its weights in a Hugging Face checkpoint (``{i}``: the layer). GGUF files are read
    through the gguf package's own name map from these (export/checkpoint.py)."""

    embed: str = "model.embed_tokens.weight"
    input_norm: str = "model.layers.{i}.input_layernorm.weight"
    q: str = "model.layers.{i}.self_attn.q_proj.weight"
    k: str = "model.layers.{i}.self_attn.k_proj.weight"
    v: str = "model.layers.{i}.self_attn.v_proj.weight"
    o: str = "model.layers.{i}.self_attn.o_proj.weight"
    post_norm: str = "model.layers.{i}.post_attention_layernorm.weight"
    gate: str = "model.layers.{i}.mlp.gate_proj.weight"
    up: str = "model.layers.{i}.mlp.up_proj.weight"
    down: str = "model.layers.{i}.mlp.down_proj.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def layer(self, i: int) -> dict[str, str]:
        """{role: checkpoint name} of layer ``i`` (q/k/v biases included; a family without them lacks them)."""
        names = {r: getattr(self, r).format(i=i) for r in ("input_norm", "q", "k", "v", "o", "post_norm",
                                                           "gate", "up", "down")}  # fmt: skip
        for r in ("q", "k", "v"):
            names[f"{r}_bias"] = names[r].removesuffix(".weight") + ".bias"
        return names


@dataclass(frozen=True)
class DirectSpec:
    """What the direct builder (export/direct.py: the fused graph written from the checkpoint's tensors, one
    layer at a time) needs to know about a family. Families without one export through optimum's tracer."""

    # transformers' module and classes of one decoder layer: the streamed fp32 reference runs them layer by
    # layer (export/reference.py), so the gate's reference is the family's own code, not a re-implementation
    modeling: str
    layer_class: str
    norm_class: str
    rotary_class: str
    names: TensorNames = TensorNames()
    hidden_acts: tuple[str, ...] = ("silu",)
    rope_scalings: tuple[str, ...] = ("default", "linear", "llama3")
    # config attribute of a sliding attention window (GroupQueryAttention's local_window_size), if any
    sliding_window_attr: str | None = None

    def unsupported_reason(self, config: Any) -> str | None:
        """Why this checkpoint config cannot be built directly (None: it can)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        act = get("hidden_act", "silu")
        if act not in self.hidden_acts:
            return f"hidden_act {act!r} is not supported by the GQA builder ({', '.join(self.hidden_acts)} only)"
        scaling = get("rope_scaling", None)
        if scaling:
            kind = scaling.get("rope_type") or scaling.get("type")
            if kind not in self.rope_scalings:
                return f"rope_scaling {kind!r} is not supported by the GQA builder ({', '.join(self.rope_scalings)})"
        return None


def _transformers(family: str, prefix: str, **kw: Any) -> DirectSpec:
    return DirectSpec(
        f"transformers.models.{family}.modeling_{family}",
        f"{prefix}DecoderLayer",
        f"{prefix}RMSNorm",
        f"{prefix}RotaryEmbedding",
        **kw,
    )


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
    # The direct (streaming) builder of the fused graph; None: optimum's traced export only.
    direct: DirectSpec | None = None

    def direct_unsupported(self, config: Any) -> str | None:
        """Why the direct builder cannot build this checkpoint (None: it can)."""
        if self.direct is None:
            only = ", ".join(direct_architectures())
            return f"model_type {self.model_type!r} is not supported by the GQA builder ({only})"
        return self.direct.unsupported_reason(config)

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
        ArchSpec("llama", "Llama 2/3, TinyLlama, SmolLM/SmolLM2", direct=_transformers("llama", "Llama")),
        ArchSpec(
            "mistral", "Mistral", direct=_transformers("mistral", "Mistral", sliding_window_attr="sliding_window")
        ),
        ArchSpec("qwen2", "Qwen2, Qwen2.5", direct=_transformers("qwen2", "Qwen2")),
        ArchSpec("phi3", "Phi-3 (mini)"),
        ArchSpec("gemma2", "Gemma 2", takes_position_ids=False),
    )
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def direct_architectures() -> list[str]:
    return sorted(k for k, s in ARCHITECTURES.items() if s.direct is not None)


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
