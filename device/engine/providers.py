"""Which onnxruntime execution providers a bundle's session runs on.

A bundle declares the providers it wants (``manifest.runtime.execution_providers``, most preferred first;
empty means CPU). The engine takes the first one this onnxruntime has; CPUExecutionProvider in the declared
list is the allowed fallback. A bundle that wants only providers the board lacks (an fp16 CUDA variant on a
CPU-only wheel) is refused with ``ExecutionProviderUnavailableError`` rather than run somewhere it was never
measured. CPUExecutionProvider always comes last in the session's list: onnxruntime places the operators
the accelerator lacks there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .errors import BundleLoadError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# Providers whose sessions keep weights off the CPU: the prepacked-weights cache (CPU kernels) does not apply.
ACCELERATORS = frozenset(
    {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider"}
)


class ExecutionProviderUnavailableError(BundleLoadError):
    """The bundle wants execution providers this onnxruntime does not have, and no CPU fallback."""

    reason = "execution_provider_unavailable"


def available_providers() -> list[str]:
    """The providers of the onnxruntime this process loads (onnxruntime-gpu lists CUDA/TensorRT)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(declared: Sequence[str], available: Sequence[str], *, bundle: str = "the bundle") -> list[str]:
    """The session's provider list for a bundle declaring ``declared`` on a board offering ``available``."""
    if not declared:
        return [CPU]
    for name in declared:
        if name in available:
            if name != declared[0]:
                log.warning("%s prefers %s, which this onnxruntime lacks; running on %s", bundle, declared[0], name)
            return [name] if name == CPU else [name, CPU]
    want = " or ".join(declared)
    have = ", ".join(available) or "none"
    hint = " (install onnxruntime-gpu for CUDA/TensorRT)" if set(declared) & ACCELERATORS else ""
    raise ExecutionProviderUnavailableError(f"{bundle} needs {want}; this onnxruntime has {have}{hint}")


def check_session(
    declared: Sequence[str], chosen: Sequence[str], running: Sequence[str], *, bundle: str = "the bundle"
) -> None:
    """After the session is made: onnxruntime quietly drops an accelerator it cannot start (CUDA or cuDNN
    libraries missing, no GPU visible) and runs on CPU. That is a fallback only if the bundle declared it."""
    if chosen[0] == CPU or chosen[0] in running:
        return
    if CPU in declared:
        log.warning("%s: onnxruntime could not start %s; running on %s", bundle, chosen[0], ", ".join(running))
        return
    raise ExecutionProviderUnavailableError(
        f"{bundle} needs {chosen[0]}, which this onnxruntime lists but could not start (running on "
        f"{', '.join(running) or 'nothing'}): check the CUDA/cuDNN/TensorRT libraries and that a GPU is visible"
    )
