"""Drivers that know how to run one forward pass of a graph kind, holding the KV cache in a RunState.

Every driver takes ``token_ids`` [n] for one sequence (batch 1) and returns logits [n, vocab].

"optimum-kv": optimum's text-generation-with-past export. Inputs input_ids [1, n], attention_mask
[1, past + n], position_ids [1, n], past_key_values.{i}.key/value [1, kv_heads, past, head_dim];
outputs logits [1, n, vocab], present.{i}.key/value [1, kv_heads, past + n, head_dim]. The graph itself
concatenates past and new keys; we bind its present OrtValues straight back as the next past, so Python
never copies or reallocates the cache (IO binding keeps the tensors inside onnxruntime).

"gqa": export/fuse_gqa.py's graph with GroupQueryAttention. Inputs input_ids [1, n], seqlens_k [1] int32
(past + n - 1), total_sequence_length [] int32 (past + n), past_key_values.{i}.key/value
[1, kv_heads, capacity, head_dim]; outputs logits [1, n, vocab] and present.{i}.* bound to the SAME
buffers as the past inputs, so each step writes only its new rows in place (nothing is copied).
Optional LoRA slots lora.{i}.{site}.a [in, rank] / .b [rank, out] (manifests.LoraSlots): bound once per
request to an adapter's matrices (device/engine/adapters.py), or to rank-0 tensors when it has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from manifests import ArchConfig, GraphSpec

from .errors import UnsupportedGraphError

KV_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class RunState:
    """Per-request state: the KV cache (one OrtValue per layer and k/v) and the position."""

    n_past: int = 0  # tokens already in the cache
    # optimum-kv: 2*L tensors [1, kv_heads, n_past, head_dim]; gqa: [1, kv_heads, capacity, head_dim]
    past: list[ort.OrtValue] = field(default_factory=list)
    capacity: int = 0  # gqa: rows allocated per buffer
    binding: Any = None  # gqa: the IOBinding with the KV buffers bound once, reused every step
    # gqa: the LoRA slot inputs this request runs with (an adapter's OrtValues); holding them keeps an adapter
    # that is unloaded mid-stream alive until the stream ends
    lora: Mapping[str, ort.OrtValue] | None = None


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

    def new_state(self, capacity: int | None = None, lora: Mapping[str, ort.OrtValue] | None = None) -> RunState:
        if lora:
            raise UnsupportedGraphError("optimum-kv graphs have no LoRA slots")
        a = self.arch
        empty = np.zeros((1, a.num_kv_heads, 0, a.head_dim), dtype=self.kv_dtype)  # [1, kvh, 0, hd]
        return RunState(n_past=0, past=[ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names])

    def forward(self, state: RunState, token_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
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


class GQADriver:
    kind = "gqa"
    ROUND = 64  # buffer rows are allocated in multiples of this

    def __init__(
        self, session: ort.InferenceSession, arch: ArchConfig, graph: GraphSpec, context_length: int
    ) -> None:
        self.session = session
        self.arch = arch
        self.context_length = context_length
        self.kv_dtype = KV_DTYPES[graph.kv_dtype]
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        L = arch.num_layers
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        need = {"input_ids", "seqlens_k", "total_sequence_length", *self.past_names}
        missing = sorted(need - inputs) + sorted({"logits", *self.present_names} - outputs)
        if missing:
            raise UnsupportedGraphError(f"graph is not a gqa graph for {L} layers: missing {missing[:4]}")
        self.has_logits_index = "logits_index" in inputs  # the graph can skip the LM head for other rows
        # LoRA slots: rank-0 A [in, 0] and B [0, out] (a zero delta) unless a request binds an adapter's
        # (graph inputs; with rank-0 defaults they are listed as overridable initializers instead)
        slots = [*session.get_inputs(), *session.get_overridable_initializers()]
        self.lora_shapes = {i.name: tuple(i.shape) for i in slots if i.name.startswith("lora.")}
        self.no_lora = {name: self._empty_slot(name, shape) for name, shape in self.lora_shapes.items()}
        extra = inputs - need - {"logits_index"} - set(self.lora_shapes)
        if extra:
            raise UnsupportedGraphError(f"graph has inputs this driver does not feed: {sorted(extra)}")

    @staticmethod
    def _empty_slot(name: str, shape: tuple[Any, ...]) -> ort.OrtValue:
        fixed = shape[0] if name.endswith(".a") else shape[1]  # A [in, rank], B [rank, out]
        if not isinstance(fixed, int):
            raise UnsupportedGraphError(f"LoRA slot {name} has no fixed {'in' if name.endswith('.a') else 'out'} size")
        dims = (fixed, 0) if name.endswith(".a") else (0, fixed)
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(dims, dtype=np.float32))

    def _alloc(self, capacity: int) -> list[ort.OrtValue]:
        a = self.arch
        shape = (1, a.num_kv_heads, capacity, a.head_dim)  # [1, kvh, capacity, hd]
        # np.zeros maps fresh zero pages lazily: untouched rows cost no memory
        return [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.kv_dtype)) for _ in self.past_names
        ]

    def _round(self, n: int) -> int:
        return min(self.context_length, -(-n // self.ROUND) * self.ROUND)

    def new_state(self, capacity: int | None = None, lora: Mapping[str, ort.OrtValue] | None = None) -> RunState:
        """A fresh KV cache; ``lora`` (slot input name -> value) fills the graph's LoRA slots for this request."""
        cap = self._round(capacity or self.context_length)
        state = RunState(n_past=0, past=self._alloc(cap), capacity=cap, lora=lora)
        self._bind_cache(state)
        return state

    def _bind_cache(self, state: RunState) -> None:
        # The buffers never move, so they are bound once; a step rebinds only its small inputs and logits.
        b = self.session.io_binding()
        for past_name, present_name, buf in zip(self.past_names, self.present_names, state.past, strict=True):
            b.bind_ortvalue_input(past_name, buf)
            b.bind_ortvalue_output(present_name, buf)  # in place: GQA appends the new rows
        for name, empty in self.no_lora.items():  # like the KV buffers, the slots never move: bound once
            b.bind_ortvalue_input(name, (state.lora or {}).get(name, empty))
        b.bind_output("logits", "cpu")  # bound last: get_outputs()[-1]; rebinding keeps its place
        state.binding = b

    def _grow(self, state: RunState, need: int) -> None:
        """Rare: a caller fed more than it reserved. Copy into bigger buffers once (doubling)."""
        cap = self._round(max(need, 2 * state.capacity))
        new = self._alloc(cap)
        for old_v, new_v in zip(state.past, new, strict=True):
            new_v.numpy()[:, :, : state.n_past] = old_v.numpy()[:, :, : state.n_past]
        state.past, state.capacity = new, cap
        self._bind_cache(state)

    def forward(self, state: RunState, token_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        n = int(token_ids.shape[0])
        total = state.n_past + n
        if total > state.capacity:
            self._grow(state, total)
        b = state.binding
        # numpy inputs are bound without a copy: they stay alive in `feeds` until the run is done
        feeds = [
            ("input_ids", token_ids.astype(np.int64).reshape(1, n)),  # [1, n]
            ("seqlens_k", np.array([total - 1], dtype=np.int32)),  # [1]
            ("total_sequence_length", np.array(total, dtype=np.int32)),  # []
        ]
        if self.has_logits_index:
            rows = np.array([n - 1], dtype=np.int64) if last_only else np.arange(n, dtype=np.int64)  # [k]
            feeds.append(("logits_index", rows))
        for name, arr in feeds:
            b.bind_cpu_input(name, arr)
        b.bind_output("logits", "cpu")  # a fresh tensor each step: its shape changes
        self.session.run_with_iobinding(b)
        logits = b.get_outputs()[-1].numpy()[0]  # [k, vocab]: k = 1 with last_only, else n
        state.n_past = total
        return logits


Driver = OptimumKVDriver | GQADriver


def make_driver(
    session: ort.InferenceSession, arch: ArchConfig, graph: GraphSpec, context_length: int | None = None
) -> Driver:
    if graph.kind == "optimum-kv":
        return OptimumKVDriver(session, arch, graph)
    if graph.kind == "gqa":
        return GQADriver(session, arch, graph, context_length or arch.context_length)
    raise UnsupportedGraphError(
        f"graph kind {graph.kind!r} is not supported by this engine (knows: optimum-kv, gqa)"
    )
