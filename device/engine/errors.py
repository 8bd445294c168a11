"""One exception tree for the engine. The API maps each class to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error raised by ``device.engine``."""

    code: str = "engine_error"


class BundleLoadError(EngineError):
    """A bundle (or its parts) cannot be loaded: missing file, failed verification, bad graph."""

    code = "bundle_load_error"


class UnsupportedGraphError(BundleLoadError):
    """The graph's kind or I/O names are not ones this engine knows how to drive."""

    code = "unsupported_graph"


class InvalidParamsError(EngineError, ValueError):
    """Sampling or request parameters out of range."""

    code = "invalid_params"


class ContextWindowError(InvalidParamsError):
    """The prompt (plus what must be generated) does not fit in the context window."""

    code = "context_length_exceeded"


class NoTokenizerError(EngineError):
    """Text in/out was asked of an engine loaded without a tokenizer."""

    code = "no_tokenizer"


class EngineClosedError(EngineError):
    """The engine's session was released by ``close()``."""

    code = "engine_closed"
