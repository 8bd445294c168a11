"""Quantization recipes, chosen by measured quality (see ../shared/FACTS.md and docs/export.md).

The default INT8 recipe is weight-only, block-wise ``MatMulNBits`` (8-bit, block 32, symmetric,
accuracy_level 4): +1-2% perplexity where dynamic INT8 of every MatMul (optimum's arm64 config, kept as
``dynamic-int8`` so the gate can be shown failing) costs +120%. The embedding table is quantized too
(``GatherBlockQuantized``), and when the LM head is tied to it (SmolLM2: 49152x576, 113 MB in fp32, the
biggest single tensor) both read ONE quantized copy: the LM head's MatMulNBits weight, reshaped for the
Gather. Without that the INT8 bundle would be about 0.5x of fp32 instead of under 0.3x.

Weights that already lie exactly on a 4-bit block grid (a Q4 GGUF's, like the default model's) are not
re-quantized: they keep that grid as 4-bit MatMulNBits plus an exact offset term (source_grid.py), the same
numbers in 0.6x the bytes. ``int8-requantized`` turns that off.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from manifests import Recipe

from .errors import QuantizationError
from .graph_edit import ensure_ms_domain, splice_nodes
from .onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, PROTOBUF_LIMIT
from .source_grid import keep_source_grid

Method = Literal["none", "matmulnbits", "dynamic-int8"]


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    precision: Literal["fp32", "int8", "int4"]
    method: Method
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    quantize_embeddings: bool = False
    # The LM head (and the embedding table shared with it) at 8 bits even in a 4-bit recipe.
    head_bits: int | None = None
    # MatMul weights that already lie exactly on a 4-bit block grid (a Q4 GGUF's) keep it instead of being
    # re-quantized to `bits` (export/source_grid.py): same numbers, 0.6x the bytes at decode.
    keep_source_grid: bool = False
    description: str = ""


# Block 32, not 64: block 64 is 4-5% faster at decode here, but on an emulated Cortex-A76 (onnxruntime 1.32
# aarch64) its greedy tokens left the golden check on the gqa graph (docs/export.md).
_INT8 = QuantRecipe(
    "int8",
    "int8",
    "matmulnbits",
    8,
    32,
    True,
    4,
    quantize_embeddings=True,
    head_bits=8,
    keep_source_grid=True,
    description=(
        "MatMulNBits 8-bit weight-only, block 32, symmetric, accuracy 4; embeddings too; weights already"
        " on a 4-bit grid (a Q4 GGUF's) are kept on it exactly instead of re-quantized"
    ),
)
RECIPES: dict[str, QuantRecipe] = {
    r.name: r
    for r in (
        QuantRecipe("fp32", "fp32", "none", description="the fp32 reference bundle"),
        _INT8,
        replace(
            _INT8,
            name="int8-requantized",
            keep_source_grid=False,
            description="as int8, but every weight is re-quantized to 8 bits, a source's 4-bit grid included",
        ),
        replace(
            _INT8,
            name="int8-fp32-embeddings",
            quantize_embeddings=False,
            description="as int8, but the embedding table stays fp32 (the fallback if quantizing it fails)",
        ),
        # A Q4 source keeps its grid at 4 bits too: re-quantizing its exact 4-bit weights to another 4-bit grid is
        # a second rounding (llama.cpp refuses to requantize without --allow-requantize). On the default model
        # (Q4_1) it cost mean KL 0.24 on the adapter tests' text, which a LoRA trained on the source amplified to
        # 0.61 (perplexity 6.35 vs torch+peft's 2.75; torch+peft over the same re-quantized weights: 6.33).
        replace(
            _INT8,
            name="int4",
            precision="int4",
            bits=4,
            description=(
                "MatMulNBits 4-bit, block 32, symmetric; LM head and embeddings 8-bit; weights already on a"
                " 4-bit grid (a Q4 GGUF's) are kept on it exactly instead of re-quantized"
            ),
        ),
        replace(
            _INT8,
            name="int4-requantized",
            precision="int4",
            bits=4,
            keep_source_grid=False,
            description="as int4, but every weight is re-quantized (RTN) to 4 bits, a source's 4-bit grid included",
        ),
        # 4.5 bits per weight, as llama.cpp's Q4_0 (4-bit + an fp16 scale per 32): block 64 with an fp32 scale.
        # Block 32 stores 5 bits per weight (6 once onnxruntime adds its block sums), and decode reads every
        # byte per token: block 64 decodes ~15-20% faster at full size (docs/benchmarks.md), for a slightly
        # higher KL on the default model (0.31 vs 0.28, ppl within noise). Not the default for small models.
        replace(
            _INT8,
            name="int4-b64",
            precision="int4",
            bits=4,
            block_size=64,
            keep_source_grid=False,
            description="MatMulNBits 4-bit, block 64 (4.5 bits per weight, as Q4_0), symmetric; head, embeddings 8-bit",
        ),
        QuantRecipe(
            "dynamic-int8",
            "int8",
            "dynamic-int8",
            description="dynamic INT8 of every MatMul (optimum arm64 config): known to fail the gate",
        ),
    )
}
# Tried in order for a precision when --recipe is not given: the first that passes the gate is published.
DEFAULT_RECIPES: dict[str, list[str]] = {
    "fp32": ["fp32"],
    "int8": ["int8", "int8-requantized", "int8-fp32-embeddings"],
    "int4": ["int4", "int4-requantized"],
}


@dataclass
class QuantOutcome:
    model_path: Path
    notes: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    source_grid_matmuls: int = 0

    def manifest_recipe(self, recipe: QuantRecipe, embeddings_quantized: bool) -> Recipe:
        return Recipe(
            precision=recipe.precision,
            method=recipe.method,
            bits=recipe.bits,
            block_size=recipe.block_size,
            symmetric=recipe.symmetric,
            accuracy_level=recipe.accuracy_level,
            quantize_embeddings=embeddings_quantized,
            source_grid_matmuls=self.source_grid_matmuls,
            nodes_excluded=self.excluded,
            graph_optimizations=self.notes,
        )


def quantize(src: Path, out_dir: Path, recipe: QuantRecipe) -> QuantOutcome:
    """Quantize the ONNX model at ``src`` into ``out_dir/model.onnx`` following ``recipe``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if recipe.method == "none":
            return _copy_fp32(src, out_dir)
        if recipe.method == "dynamic-int8":
            return _dynamic_int8(src, out_dir)
        return _matmulnbits(src, out_dir, recipe)
    except (OSError, KeyboardInterrupt, QuantizationError):
        raise
    except Exception as exc:
        raise QuantizationError(f"recipe {recipe.name} failed: {type(exc).__name__}: {exc}") from exc


def _copy_fp32(src: Path, out_dir: Path) -> QuantOutcome:
    for name in (MODEL_FILE, EXTERNAL_DATA_FILE):
        if (src.parent / name).exists():
            shutil.copyfile(src.parent / name, out_dir / name)
    return QuantOutcome(out_dir / MODEL_FILE)


def _dynamic_int8(src: Path, out_dir: Path) -> QuantOutcome:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    logging.getLogger("optimum").setLevel(logging.ERROR)
    quantizer = ORTQuantizer.from_pretrained(src.parent, file_name=src.name)
    config = AutoQuantizationConfig.arm64(is_static=False, per_channel=True)
    tmp = out_dir / "_dynamic"
    quantizer.quantize(save_dir=tmp, quantization_config=config, use_external_data_format=False)
    produced = next(tmp.glob("*quantized*.onnx"), None)
    if produced is None:
        raise QuantizationError(f"optimum's quantizer wrote no model into {tmp}")
    model = _load(produced)
    shutil.rmtree(tmp)
    path = _save(model, out_dir)
    return QuantOutcome(path, notes=["optimum-arm64-dynamic-int8-per-channel"])


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save(model: Any, out_dir: Path) -> Path:
    import onnx

    path = out_dir / MODEL_FILE
    big = model.ByteSize() > PROTOBUF_LIMIT - 64 * 1024**2 if _all_inline(model) else True
    if big:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def _all_inline(model: Any) -> bool:
    from onnx.external_data_helper import uses_external_data

    return not any(uses_external_data(t) for t in model.graph.initializer)


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def _untie_transposed_weights(model: Any) -> dict[str, str]:
    """Replace ``MatMul(x, Transpose(W))`` (a tied LM head) with a constant Wᵀ the quantizer can see.

    Returns {matmul node name: name of the original (embedding) initializer W}.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = _initializers(g)
    transposes = {n.output[0]: n for n in g.node if n.op_type == "Transpose" and n.input[0] in inits}
    tied: dict[str, str] = {}
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in transposes:
            continue
        tr = transposes[node.input[1]]
        w = numpy_helper.to_array(inits[tr.input[0]])
        if w.ndim != 2:
            continue
        new_name = f"{tr.input[0]}.transposed_const"
        if new_name not in inits:
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), new_name))
            inits[new_name] = g.initializer[-1]
        node.input[1] = new_name
        tied[node.name] = tr.input[0]
    used = {i for n in g.node for i in n.input}
    for out, tr in transposes.items():
        if out not in used:
            g.node.remove(tr)
    return tied


def _matmulnbits(src: Path, out_dir: Path, recipe: QuantRecipe) -> QuantOutcome:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    assert recipe.bits and recipe.block_size
    model = _load(src)
    tied = _untie_transposed_weights(model)
    notes: list[str] = []
    if tied:
        notes.append("tied-lm-head-untied-to-constant")
    head_names = _lm_head_names(model)
    head_bits = recipe.head_bits or recipe.bits
    # A MatMul whose B is a graph input (a LoRA slot: its rank-0 default is an overridable initializer of the
    # same name) is fed at run time: quantizing it would bake the default in and drop the input.
    fed = _fed_matmuls(model)
    body_excluded = (head_names if head_bits != recipe.bits else []) + fed
    kept: list[str] = []
    if recipe.keep_source_grid:
        rewrite = keep_source_grid(model, recipe.block_size, recipe.accuracy_level, exclude={*head_names, *fed})
        kept = rewrite.kept
        body_excluded = body_excluded + rewrite.fp32_matmuls
        if kept:
            notes.append(f"source-4bit-grid-kept:{len(kept)}-matmuls")

    def run(m: Any, bits: int, include: list[str] | None, exclude: list[str]) -> Any:
        q = MatMulNBitsQuantizer(
            m,
            bits=bits,
            block_size=recipe.block_size,
            is_symmetric=bool(recipe.symmetric),
            accuracy_level=recipe.accuracy_level,
            nodes_to_include=include,
            nodes_to_exclude=exclude,
            op_types_to_quantize=("MatMul",),
        )
        q.process()
        return q.model.model

    model = run(model, recipe.bits, None, body_excluded)
    if head_bits != recipe.bits:  # the head alone: every other MatMul left (offset terms, LoRA slots) stays fp32
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in head_names]
        model = run(model, head_bits, head_names, others)
        notes.append(f"lm-head-{head_bits}bit")
    excluded: list[str] = []
    if recipe.quantize_embeddings:
        notes.extend(_quantize_embeddings(model, tied, recipe.block_size))
    # MatMulNBits/GatherBlockQuantized live in com.microsoft; keep the default opset as exported.
    ensure_ms_domain(model)
    path = _save(model, out_dir)
    return QuantOutcome(path, notes=notes, excluded=excluded, source_grid_matmuls=len(kept))


def _fed_matmuls(model: Any) -> list[str]:
    """MatMuls whose weight is a graph input (LoRA slots), which no recipe may turn into a constant."""
    inputs = {i.name for i in model.graph.input}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inputs]


def _lm_head_names(model: Any) -> list[str]:
    """The MatMul producing the logits output (the LM head)."""
    g = model.graph
    logits = {o.name for o in g.output if o.name == "logits"}
    by_output = {o: n for n in g.node for o in n.output}
    names: list[str] = []
    frontier = list(logits)
    seen: set[str] = set()
    # Walk back through shape-only ops (Reshape/Cast/...) to the first MatMul.
    while frontier:
        t = frontier.pop()
        node = by_output.get(t)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul":
            names.append(node.name)
        elif node.op_type in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Mul", "Div", "Tanh"):
            frontier.extend(node.input[:1])
    return names


def _quantize_embeddings(model: Any, tied: dict[str, str], block_size: int) -> list[str]:
    """Gather(E, ids) → GatherBlockQuantized, 8-bit, block-wise along the hidden axis.

    A tied table reuses the LM head's MatMulNBits weight: its B is [vocab, hidden/block, block] uint8 (zero
    point 128, symmetric) and its scales [vocab, hidden/block] — exactly E quantized along the hidden axis.
    """
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    g = model.graph
    inits = _initializers(g)
    nbits_by_source: dict[str, Any] = {}
    for node in g.node:
        if node.op_type == "MatMulNBits":
            source = tied.get(node.name.removesuffix("_Q8").removesuffix("_Q4"))
            bits = next((a.i for a in node.attribute if a.name == "bits"), None)
            # GatherBlockQuantized reads the bytes with the implicit zero point 128: symmetric 8-bit only.
            has_zero_points = len(node.input) > 3 and bool(node.input[3])
            if source and bits == 8 and not has_zero_points:
                nbits_by_source[source] = node
    notes: list[str] = []
    new_nodes: list[tuple[int, list[Any]]] = []
    for idx, node in enumerate(g.node):
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        if len(table.dims) != 2 or table.data_type != 1:  # 2-D float tables only
            continue
        vocab, hidden = int(table.dims[0]), int(table.dims[1])
        if hidden % block_size:
            notes.append(f"embedding-kept-fp32:hidden-{hidden}-not-multiple-of-{block_size}")
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            continue
        base = node.input[0]
        shared = nbits_by_source.get(base)
        replacement: list[Any] = []
        if shared is not None:
            data_shape = numpy_helper.from_array(np.array([vocab, hidden], dtype=np.int64), f"{base}.q_shape")
            scale_shape = numpy_helper.from_array(
                np.array([vocab, hidden // block_size], dtype=np.int64), f"{base}.q_scales_shape"
            )
            g.initializer.extend([data_shape, scale_shape])
            data, scales = f"{base}.q_shared", f"{base}.q_scales_shared"
            replacement += [
                helper.make_node("Reshape", [shared.input[1], data_shape.name], [data], name=f"{base}/q_reshape"),
                helper.make_node(
                    "Reshape", [shared.input[2], scale_shape.name], [scales], name=f"{base}/q_scales_reshape"
                ),
            ]
            notes.append("embedding-8bit-shared-with-lm-head")
        else:
            cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8)
            e = numpy_helper.to_array(table)
            packed, sc, _zp = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(e.T))
            data, scales = f"{base}.q8", f"{base}.q8_scales"
            g.initializer.extend(
                [
                    numpy_helper.from_array(packed.reshape(vocab, hidden), data),
                    numpy_helper.from_array(sc.reshape(vocab, hidden // block_size).astype(np.float32), scales),
                ]
            )
            notes.append("embedding-8bit")
        replacement.append(
            helper.make_node(
                "GatherBlockQuantized",
                [data, node.input[1], scales],
                [node.output[0]],
                name=f"{node.name}_Q8",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=block_size,
                bits=8,
            )
        )
        new_nodes.append((idx, replacement))
    splice_nodes(g, new_nodes)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return notes


def operators(model_path: Path) -> list[str]:
    """Sorted 'domain:OpType' of every node (the default domain is written 'ai.onnx')."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    ops: set[str] = set()

    def walk(graph: Any) -> None:
        for n in graph.node:
            ops.add(f"{n.domain or 'ai.onnx'}:{n.op_type}")
            for a in n.attribute:
                if a.g is not None and a.g.node:
                    walk(a.g)

    walk(m.graph)
    return sorted(ops)


def min_onnxruntime(ops: list[str], recipe: QuantRecipe) -> str:
    """The oldest onnxruntime known to run these operators (FACTS.md: 8-bit MatMulNBits fails on 1.22)."""
    if recipe.method == "matmulnbits" and (recipe.bits == 8 or recipe.head_bits == 8):
        return "1.26"
    if any(op.startswith("com.microsoft:") for op in ops):
        return "1.20"
    return "1.17"
