"""torch → ONNX with KV cache (optimum's exporter), then a check of the graph against the torch reference."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from manifests import MODEL_DATA_FILE, MODEL_FILE, ArchConfig

from .archs import ONNX_TASK
from .errors import OnnxExportError, ValidationFailedError

EXTERNAL_DATA_FILE = MODEL_DATA_FILE
# onnx's protobuf limit: above it the weights must live in an external data file.
PROTOBUF_LIMIT = 2 * 1024**3
VALIDATION_PROMPT_LEN = 24


@dataclass(frozen=True)
class ValidationResult:
    max_abs_logit_diff: float
    logit_scale: float
    argmax_agreement: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "logit_scale": self.logit_scale,
            "argmax_agreement": self.argmax_agreement,
            "tokens": self.tokens,
        }


def export_onnx(model: Any, out_dir: Path) -> Path:
    """Export ``model`` to ``out_dir/model.onnx`` (+ external data over 2 GB); returns the model path."""
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir.mkdir(parents=True, exist_ok=True)
    # optimum logs every validation line at INFO and warns about things we check ourselves.
    for name in ("optimum", "optimum.exporters.onnx", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch's tracer warns about every Python-level shape branch in transformers; none matter here.
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, out_dir, task=ONNX_TASK, do_validation=False)
    except OSError:
        raise
    except Exception as exc:
        raise OnnxExportError(
            f"optimum could not export the model to ONNX: {type(exc).__name__}: {exc}"
        ) from exc
    path = out_dir / MODEL_FILE
    if not path.is_file():
        raise OnnxExportError(f"optimum reported success but wrote no {MODEL_FILE} into {out_dir}")
    return path


def validate_against_torch(
    model: Any, onnx_path: Path, arch: ArchConfig, token_ids: list[int], *, threads: int | None = None
) -> ValidationResult:
    """One forward pass of the prompt through torch and through the ONNX graph (empty KV cache).

    Checks the KV outputs' shapes against ``arch`` ([batch, kv_heads, seq, head_dim]) and the logits'
    closeness; raises ``ValidationFailedError`` naming what differs.
    """
    import onnxruntime as ort
    import torch

    ids = np.asarray(token_ids[:VALIDATION_PROMPT_LEN], dtype=np.int64)[None, :]  # [1, seq]
    seq = ids.shape[1]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits[0].float().numpy()  # [seq, vocab]

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(ids)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(seq, dtype=np.int64)[None, :]
        elif inp.name.startswith("past_key_values."):
            # [batch, kv_heads, past_seq=0, head_dim]
            feeds[inp.name] = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), dtype=np.float32)
        else:
            raise ValidationFailedError(f"the exported graph has an unexpected input {inp.name!r}")
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feeds), strict=True))
    del sess

    presents = [n for n in names if n.startswith("present.")]
    if len(presents) != 2 * arch.num_layers:
        raise ValidationFailedError(
            f"graph has {len(presents)} present.* outputs, expected {2 * arch.num_layers}"
        )
    want = (1, arch.num_kv_heads, seq, arch.head_dim)
    for n in presents:
        if tuple(outs[n].shape) != want:
            raise ValidationFailedError(
                f"{n} has shape {tuple(outs[n].shape)}, expected {want} from the config"
            )
    got = outs["logits"][0]  # [seq, vocab]
    if got.shape != ref.shape:
        raise ValidationFailedError(f"logits shape {got.shape} != torch's {ref.shape}")
    diff = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref))) or 1.0
    agree = float(np.mean(np.argmax(got, -1) == np.argmax(ref, -1)))
    result = ValidationResult(diff, scale, agree, seq)
    # fp32 kernels differ in summation order; 1% of the logit range is far above that and far below a bug.
    if diff > 0.01 * scale + 1e-3 or agree < 0.9:
        raise ValidationFailedError(
            f"ONNX logits differ from torch: max |diff| {diff:.4g} (logit range {scale:.4g}), "
            f"argmax agreement {agree:.1%} over {seq} positions"
        )
    return result
