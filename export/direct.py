"""The direct builder: the fused GQA graph written straight from a checkpoint's tensors, one layer at a time.

optimum's traced export holds the torch model, the traced graph and (for the fused graph) a copy of every
weight at once: a full-size TinyLlama-1.1B peaked at 17.6 GB. Here each weight is read from the checkpoint
(export/checkpoint.py), quantized by the recipe as it arrives, and appended to the external data file; the
graph proto keeps only references (offset, length). Peak memory is one layer (fp32, plus the quantizer's
working copy) and the embedding table, whatever the model's size.

The graph is the one export/fuse_gqa.py defines (``build_gqa_graph``); this module is its streaming weight
sink. The numbers written are the ones export/quantize.py's passes would write on the traced graph: the same
onnxruntime block quantizer (``DefaultWeightOnlyQuantizer``), the same exact 4-bit grid for a Q4 source's
weights (export/source_grid.py), the same shared 8-bit table for a tied embedding and LM head, so the direct
and traced bundles compute the same logits (tests/export/test_direct.py checks it, and the traced export stays
the reference that validates this builder and the fallback for families without a direct builder).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from manifests import MODEL_DATA_FILE, MODEL_FILE

from .fuse_gqa import Observer, build_gqa_graph, contiguous
from .graph_edit import ensure_ms_domain
from .quantize import QuantOutcome, QuantRecipe
from .source_grid import GridNodes, find_grid

# External tensors start on a page boundary, so onnxruntime can map them instead of copying.
ALIGN = 4096
INLINE_BYTES = 1024  # smaller tensors stay inside the proto (onnx's own default threshold)
EMBED = "model.embed_tokens.weight"


class ExternalData:
    """One external data file, written front to back; ``tensor`` returns the proto that points into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close(), after the last tensor
        self._offset = 0

    def tensor(self, name: str, array: np.ndarray) -> Any:
        from onnx import TensorProto, helper, numpy_helper

        a = contiguous(array)
        if a.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(a, name)
        pad = -self._offset % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self._offset += pad
        t = TensorProto()
        t.name = name
        t.dims.extend(a.shape)
        t.data_type = helper.np_dtype_to_tensor_dtype(a.dtype)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self._offset), ("length", a.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self._f.write(memoryview(a.reshape(-1).view(np.uint8)))
        self._offset += a.nbytes
        return t

    @property
    def bytes_written(self) -> int:
        return self._offset

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def _block_quant(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(packed B [N, K/block, block·bits/8] uint8, scales [N, K/block]) of ``weight`` [K, N]: onnxruntime's own
    quantizer, the one MatMulNBitsQuantizer runs on the traced graph."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    packed, scales, _zero_points = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(contiguous(weight))
    return packed, scales


class QuantizingSink:
    """A ``fuse_gqa.WeightSink`` that applies a recipe to each weight as it arrives and writes it to external
    data (``recipe`` None or method "none": fp32 weights, the reference bundle)."""

    def __init__(self, data: ExternalData, recipe: QuantRecipe | None) -> None:
        self.data = data
        self.recipe = recipe if recipe is not None and recipe.method == "matmulnbits" else None
        self.initializers: list[Any] = []
        self.notes: list[str] = []
        self.grid_kept: list[str] = []
        r = self.recipe
        self._grid = GridNodes(r.block_size, r.accuracy_level, self._add) if r and r.keep_source_grid else None
        self._head: tuple[str, str] | None = None  # a tied head's quantized (B, scales), made with the table

    def _add(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.tensor(name, array))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        return self._add(name, array)

    def _nbits(self, name: str, weight_name: str, x: str, weight: np.ndarray, out: str, bits: int) -> list[Any]:
        r = self.recipe
        assert r is not None and r.block_size
        k, n = weight.shape
        packed, scales = _block_quant(weight, bits, r.block_size, bool(r.symmetric))
        b = self._add(f"{weight_name}_Q{bits}", packed)
        s = self._add(f"{weight_name}_scales", scales)
        return [self._nbits_node(name, x, b, s, out, k, n, bits)]

    def _nbits_node(self, name: str, x: str, b: str, s: str, out: str, k: int, n: int, bits: int) -> Any:
        from onnx import helper

        r = self.recipe
        assert r is not None
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": r.block_size}
        if r.accuracy_level:
            attrs["accuracy_level"] = r.accuracy_level
        return helper.make_node("MatMulNBits", [x, b, s], [out], name=f"{name}_Q{bits}", domain="com.microsoft",
                                **attrs)  # fmt: skip

    def matmul(self, name: str, weight_name: str, x: str, weight: np.ndarray, out: str) -> list[Any]:
        from onnx import helper

        r = self.recipe
        if r is None:
            return [helper.make_node("MatMul", [x, self._add(weight_name, weight)], [out], name=name)]
        if self._grid is not None:
            grid = find_grid(weight, r.block_size or 32)  # the view: no copy unless it is a grid
            if grid is not None:
                self.grid_kept.append(name)
                return self._grid.nodes(grid, weight_name, name, x, out)
        assert r.bits
        return self._nbits(name, weight_name, x, weight, out, r.bits)

    def embedding(self, table: np.ndarray, ids: str, out: str, tied: bool) -> list[Any]:
        from onnx import helper

        r = self.recipe
        vocab, hidden = table.shape
        head_bits = (r.head_bits or r.bits) if r else None
        if r is not None and tied:  # the head reads Eᵀ, quantized once here (the table is in hand only now)
            self.notes.append("tied-lm-head-untied-to-constant")
            assert r.block_size and head_bits
            packed, scales = _block_quant(table.T, head_bits, r.block_size, bool(r.symmetric))
            self._head = (self._add(f"{EMBED}.transposed_const_Q{head_bits}", packed),
                          self._add(f"{EMBED}.transposed_const_scales", scales))  # fmt: skip
        fp32_gather = [helper.make_node("Gather", [EMBED, ids], [out], name="/model/embed_tokens/Gather")]
        if r is None or not r.quantize_embeddings:
            self._add(EMBED, table)
            return fp32_gather
        block = r.block_size or 32
        if hidden % block:
            self.notes.append(f"embedding-kept-fp32:hidden-{hidden}-not-multiple-of-{block}")
            self._add(EMBED, table)
            return fp32_gather
        nodes: list[Any] = []
        if self._head is not None and head_bits == 8 and r.symmetric:
            # MatMulNBits' B [vocab, H/block, block] with zero point 128 IS the table quantized along the hidden
            # axis: GatherBlockQuantized reads the same bytes (export/quantize.py's shared table)
            data, scales = f"{EMBED}.q_shared", f"{EMBED}.q_scales_shared"
            shape = self._add(f"{EMBED}.q_shape", np.array([vocab, hidden], dtype=np.int64))
            sshape = self._add(f"{EMBED}.q_scales_shape", np.array([vocab, hidden // block], dtype=np.int64))
            nodes += [
                helper.make_node("Reshape", [self._head[0], shape], [data], name=f"{EMBED}/q_reshape"),
                helper.make_node("Reshape", [self._head[1], sshape], [scales], name=f"{EMBED}/q_scales_reshape"),
            ]
            self.notes.append("embedding-8bit-shared-with-lm-head")
        else:
            packed, sc = _block_quant(table.T, 8, block, True)
            data = self._add(f"{EMBED}.q8", packed.reshape(vocab, hidden))
            scales = self._add(f"{EMBED}.q8_scales", sc.reshape(vocab, hidden // block).astype(np.float32))
            self.notes.append("embedding-8bit")
        nodes.append(helper.make_node("GatherBlockQuantized", [data, ids, scales], [out],
                                      name="/model/embed_tokens/Gather_Q8", domain="com.microsoft", gather_axis=0,
                                      quantize_axis=1, block_size=block, bits=8))  # fmt: skip
        return nodes

    def lm_head(self, x: str, weight: np.ndarray | None, out: str) -> list[Any]:
        from onnx import helper

        r = self.recipe
        if r is None:
            if weight is not None:
                return [helper.make_node("MatMul", [x, self._add("lm_head.weight", weight)], [out],
                                         name="/lm_head/MatMul")]  # fmt: skip
            return [
                helper.make_node("Transpose", [EMBED], ["/lm_head/Transpose_output_0"], name="/lm_head/Transpose",
                                 perm=[1, 0]),
                helper.make_node("MatMul", [x, "/lm_head/Transpose_output_0"], [out], name="/lm_head/MatMul"),
            ]  # fmt: skip
        head_bits = r.head_bits or r.bits
        assert head_bits
        if head_bits != r.bits:
            self.notes.append(f"lm-head-{head_bits}bit")
        if weight is None:
            assert self._head is not None
            b, s = self._head
            k = next(int(t.dims[1]) * int(t.dims[2]) for t in self.initializers if t.name == b)
            n = next(int(t.dims[0]) for t in self.initializers if t.name == b)
            return [self._nbits_node("/lm_head/MatMul", x, b, s, out, k, n, head_bits)]
        return self._nbits("/lm_head/MatMul", "lm_head.weight", x, weight, out, head_bits)


@dataclass
class DirectBuild:
    outcome: QuantOutcome
    data_bytes: int


def build_direct(
    config: Mapping[str, Any],
    get: Callable[[str], np.ndarray],
    has: Callable[[str], bool],
    out_dir: Path,
    recipe: QuantRecipe | None,
    max_seq: int,
    observer: Observer | None = None,
    on_layer_done: Callable[[int], None] | None = None,
    lora_sites: Sequence[str] = (),
) -> DirectBuild:
    """Write ``out_dir/model.onnx`` + ``model.onnx_data``: the fused graph, each weight quantized by ``recipe``
    (None: fp32) as the checkpoint streams past. Nothing but one layer's tensors is held at a time.
    ``lora_sites``: the projections that get LoRA adapter slots (fuse_gqa.lora_slots)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    data = ExternalData(out_dir / MODEL_DATA_FILE)
    sink = QuantizingSink(data, recipe)
    try:
        model = build_gqa_graph(config, get, has, sink, max_seq, observer=observer, on_layer_done=on_layer_done,
                                lora_sites=lora_sites)  # fmt: skip
    finally:
        data.close()
    if sink.recipe is not None:
        ensure_ms_domain(model)
    if sink.grid_kept:
        sink.notes.append(f"source-4bit-grid-kept:{len(sink.grid_kept)}-matmuls")
    # the order export/quantize.py's passes record them in, so both builders' manifests read alike
    order = ("tied-lm-head", "source-4bit-grid", "lm-head-", "embedding-")
    sink.notes.sort(key=lambda note: next(i for i, p in enumerate(order) if note.startswith(p)))
    path = out_dir / MODEL_FILE
    onnx.save_model(model, str(path))
    if data.bytes_written == 0:
        (out_dir / MODEL_DATA_FILE).unlink()
    outcome = QuantOutcome(path, notes=sink.notes, source_grid_matmuls=len(sink.grid_kept))
    return DirectBuild(outcome, data.bytes_written)
