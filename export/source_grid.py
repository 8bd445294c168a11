"""Keep a 4-bit source's grid: MatMul weights that already lie on a block-wise 4-bit grid are written exactly.

A Q4_0/Q4_1 GGUF (the default model ships as Q4_1) stores every linear weight as ``w = d·q + m`` per block of
32 input values, with ``q`` in 0..15. Dequantized to fp32 for the torch export, those weights still lie
exactly on that grid. Re-quantizing them to 8 bits adds no precision (the fp32 reference IS the 4-bit grid)
and costs 1.7x the bytes per weight at decode, which is memory-bound on the boards. So each such MatMul
becomes:

    y = MatMulNBits(x; q, d, 4-bit, block 32)     # Σ_b d_b · (x_b · (q_b - 8)), implicit zero point 8
      + (x @ E) @ O                                # Σ_b (m_b + 8·d_b) · Σ_{i∈b} x_i

where ``E`` [K, K/32] sums each block of x (a 0/1 matrix), and ``O`` [K/32, N] is the per-block offset
``m + 8·d``. MatMulNBits' own zero point is a uint8 (0..15), which cannot hold the GGUF's float minimum ``m``
(rounding it shifts a whole block by up to d/2, as lossy as a fresh 4-bit quantization), and onnxruntime's
float zero points take a dequantize-every-call path measured 30x slower; the offset term restores the exact
weights at the cost of two tiny GEMMs (K/32 wide).

Detection is exact: every block of 32 must be reproduced to 1e-3 of its step ``d``, with at most 15 steps
between its minimum and maximum (Q4_1 blocks span all 15; Q4_0's ``d·(q-8)`` blocks may span fewer); weights
from fp16/bf16 sources miss that by orders of magnitude, so they are left to the recipe's own quantizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .graph_edit import ensure_ms_domain, splice_nodes

GRID_BITS = 4
LEVELS = (1 << GRID_BITS) - 1  # 15 steps between a block's minimum and maximum
# MatMulNBits without zero points subtracts 8. Not written explicitly: zero points cost ~10% of decode speed
# on x86 (measured). On aarch64, onnxruntime sends such symmetric 4-bit MatMulNBits to KleidiAI kernels with
# coarser numerics (per-row activations, bf16 scales); the device engine turns KleidiAI off by default
# (EngineOptions.kleidiai), so a board computes what the build's gate measured.
IMPLICIT_ZERO_POINT = 1 << (GRID_BITS - 1)
# A block is on the grid when every value is reproduced to this fraction of the block's step.
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Grid:
    """One weight W [K, N] as a block-wise 4-bit grid along K: W[b*B + i, n] = scales[n, b]·q[n, b, i] + mins[n, b]."""

    q: np.ndarray  # [N, K/B, B] uint8, 0..15
    scales: np.ndarray  # [N, K/B] float32, the step d
    mins: np.ndarray  # [N, K/B] float32, the block minimum m

    @property
    def offsets(self) -> np.ndarray:
        """[K/B, N] float32: what the block-sum term adds, m + 8·d (MatMulNBits subtracts the zero point 8)."""
        return np.ascontiguousarray((self.mins + IMPLICIT_ZERO_POINT * self.scales).T.astype(np.float32))

    def packed(self) -> np.ndarray:
        """[N, K/B, B/2] uint8 in MatMulNBits' layout: element 2j in the low nibble, 2j+1 in the high one."""
        return (self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)

    def dequantized(self) -> np.ndarray:
        """[K, N] float32, for checks."""
        n, nb, b = self.q.shape
        w = self.q.astype(np.float32) * self.scales[..., None] + self.mins[..., None]
        return np.ascontiguousarray(w.reshape(n, nb * b).T)


def _fit_blocks(blocks: np.ndarray, mins: np.ndarray, spans: np.ndarray, steps_in_span: int) -> np.ndarray:
    """[rows] bool: which blocks ([rows, B]) lie on min + k·(span / steps_in_span), k integer."""
    step = spans / steps_in_span
    safe = np.where(step > 0, step, 1.0)
    q = np.rint((blocks - mins[:, None]) / safe[:, None])
    error = np.abs(q * step[:, None] + mins[:, None] - blocks)
    return np.all(error <= TOLERANCE * safe[:, None], axis=1)


def _steps_in_span(blocks: np.ndarray, mins: np.ndarray, spans: np.ndarray) -> np.ndarray | None:
    """[rows] int: per block, a number of grid steps between its minimum and maximum (1..15) that reproduces it,
    or None if some block fits none. 15 is tried first: Q4_1 maps every block's minimum to q=0 and its maximum
    to 15; then the fewest that fit.
    Q4_0 (d·(q-8)) puts only its largest-magnitude value on an end level, so its blocks span fewer steps."""
    found = np.where(_fit_blocks(blocks, mins, spans, LEVELS), LEVELS, 0)  # whole arrays: no gather copy
    for steps_in_span in range(1, LEVELS):
        todo = np.flatnonzero(found == 0)
        if todo.size == 0:
            break
        ok = _fit_blocks(blocks[todo], mins[todo], spans[todo], steps_in_span)
        found[todo[ok]] = steps_in_span
    return None if np.any(found == 0) else found


# Blocks tried first: a weight from an fp16/bf16 checkpoint fails on these at once, so the full search (up to
# 15 passes over every block) runs only for weights that look like a grid.
SAMPLE_BLOCKS = 256


def find_grid(weight: np.ndarray, block_size: int) -> Grid | None:
    """The exact 4-bit grid of a [K, N] float weight along K, or None if any block is off it."""
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    k, n = weight.shape
    if k % block_size or block_size % 2:
        return None
    nb = k // block_size
    # The sample first, gathered without touching the rest (a full pass, or the copy a transposed weight's
    # reshape makes, costs seconds per weight on a 1B model that has no grid at all).
    picks = np.linspace(0, n * nb - 1, min(SAMPLE_BLOCKS, n * nb)).astype(np.int64)  # block j: column j // nb
    rows = (picks % nb)[:, None] * block_size + np.arange(block_size)[None, :]  # [S, B]
    sampled = np.asarray(weight[rows, (picks // nb)[:, None]], dtype=np.float32)
    s_mins = sampled.min(axis=1)
    if _steps_in_span(sampled, s_mins, sampled.max(axis=1) - s_mins) is None:
        return None
    blocks = weight.T.reshape(n * nb, block_size)  # [N·K/B, B], block-major per column
    mins = blocks.min(axis=1)
    spans = blocks.max(axis=1) - mins
    steps_in_span = _steps_in_span(blocks, mins, spans)
    if steps_in_span is None:
        return None
    steps = (spans / steps_in_span).astype(np.float32)
    safe = np.where(steps > 0, steps, 1.0)
    q = np.rint((blocks - mins[:, None]) / safe[:, None])  # 0..steps_in_span <= 15
    shape = (n, k // block_size)
    return Grid(
        q=q.astype(np.uint8).reshape(*shape, block_size),
        scales=steps.reshape(shape),
        mins=mins.astype(np.float32).reshape(shape),
    )


@dataclass(frozen=True)
class GridRewrite:
    kept: list[str]  # the MatMul nodes now written as exact 4-bit MatMulNBits
    # The small fp32 MatMuls of the offset term: a later weight quantizer must leave them alone (quantizing the
    # offsets would undo the exactness this module is for).
    fp32_matmuls: list[str]


class GridNodes:
    """Emits the nodes of grid MatMuls (module doc) into one graph. The block-sum matrix E is shared by all
    MatMuls of one K, and the block sums x @ E by all MatMuls reading the same x. ``add`` stores an initializer
    (in the proto, or in external data) and returns its name."""

    def __init__(self, block_size: int, accuracy_level: int | None, add: Callable[[str, np.ndarray], str]) -> None:
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self._add = add
        self._indicators: dict[int, str] = {}  # K -> name of the [K, K/B] 0/1 block-sum matrix
        self._block_sums: dict[str, str] = {}  # input tensor -> its [.., K/B] block sums
        self.fp32_matmuls: list[str] = []

    def nodes(self, grid: Grid, weight_name: str, base: str, x: str, out: str) -> list[Any]:
        """``out = x @ W`` for the weight W [K, N] that ``grid`` reproduces exactly; ``base`` names the nodes."""
        from onnx import helper

        n, nb, b = grid.q.shape
        k = nb * b
        replacement: list[Any] = []
        if k not in self._indicators:
            indicator = np.zeros((k, k // self.block_size), dtype=np.float32)
            indicator[np.arange(k), np.arange(k) // self.block_size] = 1.0
            self._indicators[k] = self._add(f"source_grid.block_sum_{k}x{self.block_size}", indicator)
        if x not in self._block_sums:
            self._block_sums[x] = f"{base}/block_sums"
            replacement.append(
                helper.make_node("MatMul", [x, self._indicators[k]], [self._block_sums[x]], name=f"{base}/BlockSums")
            )
            self.fp32_matmuls.append(f"{base}/BlockSums")
        packed = self._add(f"{weight_name}.grid4_B", grid.packed())
        scales = self._add(f"{weight_name}.grid4_scales", grid.scales.reshape(-1))
        offsets = self._add(f"{weight_name}.grid4_offsets", grid.offsets)
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": GRID_BITS, "block_size": self.block_size}
        if self.accuracy_level is not None:
            attrs["accuracy_level"] = self.accuracy_level
        replacement += [
            helper.make_node("MatMulNBits", [x, packed, scales], [f"{base}/grid4"], name=f"{base}_Q4",
                             domain="com.microsoft", **attrs),  # fmt: skip
            helper.make_node("MatMul", [self._block_sums[x], offsets], [f"{base}/offset"], name=f"{base}/Offset"),
            helper.make_node("Add", [f"{base}/grid4", f"{base}/offset"], [out], name=f"{base}/AddOffset"),
        ]
        self.fp32_matmuls.append(f"{base}/Offset")
        return replacement


def keep_source_grid(
    model: Any, block_size: int, accuracy_level: int | None, exclude: set[str] | frozenset[str] = frozenset()
) -> GridRewrite:
    """Rewrite every MatMul whose constant weight lies on a 4-bit grid (see the module doc), in place.

    Weights shared by several nodes, or still used elsewhere, are left alone (the rewrite removes the fp32
    initializer).
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    graph_outputs = {o.name for o in g.output}

    def add(name: str, array: np.ndarray) -> str:
        g.initializer.append(numpy_helper.from_array(array, name))
        return name

    emit = GridNodes(block_size, accuracy_level, add)
    rewritten: list[str] = []
    new_nodes: list[tuple[int, list[Any]]] = []
    for idx, node in enumerate(g.node):
        if node.op_type != "MatMul" or node.name in exclude:
            continue
        weight_name = node.input[1]
        if weight_name not in inits or uses.get(weight_name, 0) != 1 or weight_name in graph_outputs:
            continue
        grid = find_grid(numpy_helper.to_array(inits[weight_name]), block_size)
        if grid is None:
            continue
        new_nodes.append((idx, emit.nodes(grid, weight_name, node.name or weight_name, node.input[0], node.output[0])))
        g.initializer.remove(inits.pop(weight_name))
        rewritten.append(node.name)
    splice_nodes(g, new_nodes)
    if rewritten:
        ensure_ms_domain(model)
    return GridRewrite(kept=rewritten, fp32_matmuls=emit.fp32_matmuls)
