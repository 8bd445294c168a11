"""One exception tree for the build side. Each error names its reason; the CLI maps them to exit codes."""

from __future__ import annotations

from manifests.errors import NanofleetError


class ExportError(NanofleetError):
    """Base of every error raised by ``export`` (``export.target``'s ``TargetError`` included)."""

    reason = "export_failed"


class SourceNotFoundError(ExportError):
    """The model source is neither a local folder, a .gguf file, nor a hub id in the cache or fetchable."""

    reason = "source_not_found"


class CorruptSourceError(ExportError):
    """The source exists but cannot be read as a model (truncated GGUF, missing weights, bad config)."""

    reason = "corrupt_source"


class UnsupportedArchitectureError(ExportError):
    reason = "unsupported_architecture"


class OnnxExportError(ExportError):
    reason = "onnx_export"


class ValidationFailedError(ExportError):
    """The exported ONNX graph does not reproduce the torch reference."""

    reason = "validation"


class QuantizationError(ExportError):
    reason = "quantization"


class QualityGateError(ExportError):
    """The quantized model is too far from fp32; no bundle was published, the report was written."""

    reason = "quality_gate"

    def __init__(self, message: str, report_path: str | None = None) -> None:
        super().__init__(message)
        self.report_path = report_path


class EngineUnavailableError(ExportError):
    """The device engine (device/engine) is needed for evaluation and could not be imported."""

    reason = "engine_unavailable"


class OutOfSpaceError(ExportError):
    reason = "no_space"


class ExportInterruptedError(ExportError):
    reason = "interrupted"


class SigningKeyError(ExportError):
    reason = "key_format"


class OutputExistsError(ExportError):
    reason = "output_exists"


class EvalTextError(ExportError):
    reason = "eval_text"
