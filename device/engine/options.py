"""Frozen configuration: how to build the session (EngineOptions) and how to pick tokens (SamplingParams)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import InvalidParamsError

GraphOptimization = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True)
class EngineOptions:
    """onnxruntime session knobs. Defaults are the fast ones; ``threads=None`` lets onnxruntime pick
    (one per physical core)."""

    threads: int | None = None
    graph_optimization: GraphOptimization = "all"
    memory_arena: bool = True
    prepack_weights: bool = True
    # Idle worker threads spin before sleeping: lower latency on a dedicated board, waste on a busy host.
    spin_wait: bool = True
    # Caps the context below the model's own (memory on small boards); None = the model's context_length.
    max_context: int | None = None
    # Prompt tokens fed per forward pass: bounds the activations (and the [chunk, vocab] logits of graphs
    # without a last-row LM head). 128 rows already keep the int8 GEMMs busy: a 512-token prompt prefills
    # as fast as with 256 or 512 (measured), with ~12 MB less working memory than 256.
    prefill_chunk: int = 128
    # Optional path where onnxruntime saves the optimized graph (faster second load).
    optimized_model_path: str | None = None
    # Folder of the prepacked-weights cache (weights_cache.py): the first load on this machine builds an
    # entry in a child process; later loads map the packed weights instead of packing them in memory
    # (lower peak RSS, faster load). None = always pack in memory.
    weights_cache: str | None = None
    # onnxruntime's KleidiAI kernels (aarch64; ignored elsewhere). Off by default: for symmetric 4-bit
    # MatMulNBits they quantize activations per row and round scales to bf16, so a board computes other
    # numbers than the build machine's gate measured (on an emulated Cortex-A76: 2.3x the error on a test
    # matrix, greedy tokens 44% equal to the build's instead of 71%). On, they may be faster; the quality
    # gate's evidence then no longer applies as closely.
    kleidiai: bool = False

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise InvalidParamsError(f"threads must be >= 1 or None (auto), got {self.threads}")
        if self.graph_optimization not in ("disable", "basic", "extended", "all"):
            raise InvalidParamsError(f"unknown graph_optimization {self.graph_optimization!r}")
        if self.max_context is not None and self.max_context < 2:
            raise InvalidParamsError(f"max_context must be >= 2, got {self.max_context}")
        if self.prefill_chunk < 1:
            raise InvalidParamsError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token. ``temperature == 0`` is greedy (argmax); the rest then do nothing
    except ``repetition_penalty``, which applies before argmax too (as in transformers)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in prompt or output
    seed: int | None = None
    # Generation stops after emitting one of these (None = the model's EOS ids from ArchConfig).
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    stop: Sequence[str] = field(default_factory=tuple)  # text stop sequences (handled by TextStream)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InvalidParamsError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise InvalidParamsError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidParamsError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise InvalidParamsError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidParamsError("stop sequences must be non-empty strings")
        if len(self.stop) > 16:
            raise InvalidParamsError("at most 16 stop sequences")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
