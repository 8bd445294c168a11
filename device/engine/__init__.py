"""The device inference engine: onnxruntime + numpy + tokenizers (never torch or transformers).

engine = Engine.from_bundle(bundle_dir, trust)          # verifies, then loads
engine = Engine.from_parts(model_dir, arch, graph)     # export-time gate, no manifest
engine.perplexity(ids); engine.greedy(ids, n); for tok in engine.generate(ids, SamplingParams(...)): ...
"""

from .engine import Completion, Engine, TextEvent, TokenStream
from .errors import (
    BundleLoadError,
    ContextWindowError,
    EngineClosedError,
    EngineError,
    InvalidParamsError,
    NoTokenizerError,
    UnsupportedGraphError,
)
from .graph import RunState
from .options import EngineOptions, SamplingParams
from .providers import ExecutionProviderUnavailableError, choose_providers
from .spec import arch_from_hf_config, graph_spec_for_folder, optimum_kv_graph

__all__ = [
    "BundleLoadError",
    "Completion",
    "ContextWindowError",
    "Engine",
    "EngineClosedError",
    "EngineError",
    "EngineOptions",
    "ExecutionProviderUnavailableError",
    "InvalidParamsError",
    "NoTokenizerError",
    "RunState",
    "SamplingParams",
    "TextEvent",
    "TokenStream",
    "UnsupportedGraphError",
    "arch_from_hf_config",
    "choose_providers",
    "graph_spec_for_folder",
    "optimum_kv_graph",
]
