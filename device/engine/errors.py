"""One exception tree for the engine. The API maps each class to an HTTP status."""

from __future__ import annotations

from manifests.errors import NanofleetError


class EngineError(NanofleetError):
    """Base of every error raised by ``device.engine``. ``code`` is the API's name for ``reason``."""

    reason = "engine_error"

    @property
    def code(self) -> str:
        return self.reason


class BundleLoadError(EngineError):
    """A bundle (or its parts) cannot be loaded: missing file, failed verification, bad graph."""

    reason = "bundle_load_error"


class UnsupportedGraphError(BundleLoadError):
    """The graph's kind or I/O names are not ones this engine knows how to drive."""

    reason = "unsupported_graph"


class InvalidParamsError(EngineError, ValueError):
    """Sampling or request parameters out of range."""

    reason = "invalid_params"


class ContextWindowError(InvalidParamsError):
    """The prompt (plus what must be generated) does not fit in the context window."""

    reason = "context_length_exceeded"


class NoTokenizerError(EngineError):
    """Text in/out was asked of an engine loaded without a tokenizer."""

    reason = "no_tokenizer"


class EngineClosedError(EngineError):
    """The engine's session was released by ``close()``."""

    reason = "engine_closed"
