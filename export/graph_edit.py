"""Small in-place edits of an ONNX graph shared by the quantization passes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MS_DOMAIN = "com.microsoft"


def splice_nodes(graph: Any, replacements: Sequence[tuple[int, list[Any]]]) -> None:
    """Replace ``graph.node[idx]`` by the nodes of each (idx, nodes) pair, keeping topological order.

    ``replacements`` must be in increasing idx order (as collected by a forward scan of the nodes)."""
    for idx, nodes in reversed(replacements):
        del graph.node[idx]
        for offset, node in enumerate(nodes):
            graph.node.insert(idx + offset, node)


def ensure_ms_domain(model: Any) -> None:
    """Declare the com.microsoft opset (MatMulNBits, GatherBlockQuantized, ...) if the model lacks it."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
