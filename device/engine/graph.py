"""Drivers that know how to run one forward pass of a graph kind, holding the KV cache in a RunState.

Every driver takes ``token_ids`` [n] for one sequence (batch 1) and returns logits [n, vocab].

"optimum-kv": optimum's text-generation-with-past export. Inputs input_ids [1, n], attention_mask
[1, past + n], position_ids [1, n], past_key_values.{i}.key/value [1, kv_heads, past, head_dim];
outputs logits [1, n, vocab], present.{i}.key/value [1, kv_heads, past + n, head_dim]. The graph itself
concatenates past and new keys; we bind its present OrtValues straight back as the next past, so Python
never copies or reallocates the cache (IO binding keeps the tensors inside onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from manifests import ArchConfig, GraphSpec

from .errors import UnsupportedGraphError

KV_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class RunState:
    """Per-request state: the KV cache (one OrtValue per layer and k/v) and the position."""

    n_past: int = 0  # tokens already in the cache
    past: list[ort.OrtValue] = field(default_factory=list)  # 2*L tensors [1, kv_heads, n_past, head_dim]


class OptimumKVDriver:
    kind = "optimum-kv"

    def __init__(self, session: ort.InferenceSession, arch: ArchConfig, graph: GraphSpec) -> None:
        self.session = session
        self.arch = arch
        self.kv_dtype = KV_DTYPES[graph.kv_dtype]
        inputs = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        L = arch.num_layers
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        need_in = {"input_ids", "attention_mask", *self.past_names}
        missing = sorted(need_in - inputs)
        if missing:
            raise UnsupportedGraphError(
                f"graph is not an optimum-kv graph for {L} layers: missing inputs {missing[:4]}"
                f"{'…' if len(missing) > 4 else ''}"
            )
        missing_out = sorted({"logits", *self.present_names} - set(outputs))
        if missing_out:
            raise UnsupportedGraphError(f"graph lacks outputs {missing_out[:4]}")
        self.has_position_ids = "position_ids" in inputs
        extra = inputs - need_in - {"position_ids"}
        if extra:
            raise UnsupportedGraphError(f"graph has inputs this driver does not feed: {sorted(extra)}")

    def new_state(self) -> RunState:
        a = self.arch
        empty = np.zeros((1, a.num_kv_heads, 0, a.head_dim), dtype=self.kv_dtype)  # [1, kvh, 0, hd]
        return RunState(n_past=0, past=[ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names])

    def forward(self, state: RunState, token_ids: np.ndarray) -> np.ndarray:
        n = int(token_ids.shape[0])
        total = state.n_past + n
        ids = token_ids.astype(np.int64).reshape(1, n)  # [1, n]
        mask = np.ones((1, total), dtype=np.int64)  # [1, past + n]
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", mask)
        if self.has_position_ids:
            pos = np.arange(state.n_past, total, dtype=np.int64).reshape(1, n)  # [1, n]
            b.bind_cpu_input("position_ids", pos)
        for name, value in zip(self.past_names, state.past, strict=True):
            b.bind_ortvalue_input(name, value)
        b.bind_output("logits", "cpu")
        for name in self.present_names:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        outs = b.get_outputs()
        logits = outs[0].numpy()[0]  # [n, vocab]
        state.past = list(outs[1:])  # present -> next past, no copy
        state.n_past = total
        return logits


def make_driver(session: ort.InferenceSession, arch: ArchConfig, graph: GraphSpec) -> OptimumKVDriver:
    if graph.kind == "optimum-kv":
        return OptimumKVDriver(session, arch, graph)
    raise UnsupportedGraphError(
        f"graph kind {graph.kind!r} is not supported by this engine (knows: optimum-kv)"
    )
