"""Build ArchConfig/GraphSpec from files on disk (a Hugging Face config.json, an ONNX graph's I/O), so
tools and tests can drive a plain optimum export without a bundle manifest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from manifests import MODEL_FILE, ArchConfig, GraphSpec

from .errors import BundleLoadError


def arch_from_hf_config(config: Mapping[str, Any] | str | Path) -> ArchConfig:
    """ArchConfig from a transformers config.json (dict or path), read as plain JSON."""
    if not isinstance(config, Mapping):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleLoadError(f"cannot read config {config}: {exc}") from exc
    c = dict(config)
    try:
        heads = int(c["num_attention_heads"])
        eos = c.get("eos_token_id")
        return ArchConfig(
            architecture=str(c.get("model_type", "llama")),
            num_layers=int(c["num_hidden_layers"]),
            hidden_size=int(c["hidden_size"]),
            num_attention_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            vocab_size=int(c["vocab_size"]),
            context_length=int(c.get("max_position_embeddings", 2048)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=[int(e) for e in eos]
            if isinstance(eos, list)
            else ([] if eos is None else [int(eos)]),
            pad_token_id=c.get("pad_token_id"),
            rope_theta=c.get("rope_theta"),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise BundleLoadError(f"config lacks {exc}") from exc


def optimum_kv_graph(num_layers: int, model_file: str = MODEL_FILE, kv_dtype: str = "float32") -> GraphSpec:
    """The GraphSpec of optimum's text-generation-with-past export."""
    kv = [f"past_key_values.{i}.{n}" for i in range(num_layers) for n in ("key", "value")]
    present = [f"present.{i}.{n}" for i in range(num_layers) for n in ("key", "value")]
    return GraphSpec(
        kind="optimum-kv",
        model_file=model_file,
        input_names=["input_ids", "attention_mask", "position_ids", *kv],
        output_names=["logits", *present],
        kv_dtype=kv_dtype,  # type: ignore[arg-type]
    )


GRAPH_SPEC_FILE = "graph.json"


def graph_spec_for_folder(folder: str | Path, num_layers: int) -> GraphSpec:
    """The GraphSpec of a plain model folder: ``graph.json`` when present (written by export/fuse_gqa.py),
    else optimum's text-generation-with-past convention."""
    path = Path(folder) / GRAPH_SPEC_FILE
    if path.is_file():
        try:
            return GraphSpec.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise BundleLoadError(f"{path} is not a valid GraphSpec: {exc}") from exc
    return optimum_kv_graph(num_layers)
