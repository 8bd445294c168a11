"""LoRA adapters over one loaded base: verified, checked against the base, kept resident, chosen per request.

An adapter bundle (manifests/adapter.py) holds its A/B matrices in onnxruntime's adapter format
(``onnxruntime.AdapterFormat``), named as the base graph's LoRA slot inputs (``lora.{layer}.{site}.a/.b``) and
packed as the slots consume them, so loading is reading that file: the OrtValues it gives are views of the
file's bytes, bound as graph inputs into each request's IO binding (graph.GQADriver). No base weight is
touched, nothing is reloaded, and a request holds the adapter's values for its whole length: unloading an
adapter mid-stream frees it when the last stream on it ends.

Why not ``RunOptions.add_active_adapter``: onnxruntime applies active adapters in ``Run`` only, never in
``RunWithBinding``, and the gqa graph's in-place KV cache needs IO binding (docs/engine.md, measured).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from manifests import ManifestError, TrustStore
from manifests.adapter import (
    ADAPTER_FILE,
    ADAPTER_ROLE,
    AdapterManifest,
    check_adapter_base,
    read_adapter_manifest_unverified,
    verify_adapter,
)

from .errors import EngineError


class AdapterError(EngineError):
    """An adapter cannot be loaded or used (the message says why; ``reason`` names the kind)."""

    reason = "adapter_error"


class AdapterRejectedError(AdapterError):
    """Verification failed: signature, expiry, a file's size or sha256, or a malformed manifest."""

    reason = "adapter_rejected"


class AdapterBaseError(AdapterError):
    """The adapter was built for another base, or its matrices do not fit the loaded graph's slots."""

    reason = "adapter_base_mismatch"


class UnknownAdapterError(AdapterError):
    """No resident adapter has this name."""

    reason = "adapter_not_found"


@dataclass(frozen=True)
class Adapter:
    """One resident adapter: its manifest and the slot inputs it fills (graph input name -> OrtValue)."""

    name: str
    version: int
    path: Path
    manifest: AdapterManifest
    params: Mapping[str, ort.OrtValue] = field(repr=False)
    nbytes: int = 0  # the A/B matrices' bytes

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def read_adapter(adapter_dir: str | Path, trust: TrustStore | None) -> tuple[AdapterManifest, dict[str, ort.OrtValue]]:
    """Verify (with ``trust``; unverified without, for local development) and read an adapter bundle."""
    root = Path(adapter_dir)
    try:
        manifest = verify_adapter(root, trust) if trust is not None else read_adapter_manifest_unverified(root)
    except ManifestError as exc:
        raise AdapterRejectedError(f"adapter {root} rejected: {exc.message or exc}") from exc
    entry = manifest.file(ADAPTER_ROLE)
    path = root / (entry.path if entry else ADAPTER_FILE)
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as exc:  # onnxruntime's own error types: a truncated or foreign file
        raise AdapterRejectedError(f"adapter {root}: cannot read {path.name}: {exc}") from exc
    return manifest, dict(params)


def check_fits(manifest: AdapterManifest, params: Mapping[str, ort.OrtValue], slots: Mapping[str, tuple]) -> int:
    """Every matrix names a slot of the loaded graph with the slot's fixed size, A and B of one slot share a
    rank; returns the matrices' bytes. ``slots``: slot input name -> its shape in the graph."""
    if not slots:
        raise AdapterBaseError(f"adapter {manifest.ref}: the loaded model's graph has no LoRA slots (re-export the "
                               "base with this nanofleet)")  # fmt: skip
    nbytes = 0
    for name, value in params.items():
        if name not in slots:
            raise AdapterBaseError(f"adapter {manifest.ref}: {name} is not a LoRA slot of the loaded graph")
        shape, want = tuple(value.shape()), slots[name]
        fixed_at = 0 if name.endswith(".a") else 1
        if len(shape) != 2 or shape[fixed_at] != want[fixed_at] or value.data_type() != "tensor(float)":
            raise AdapterBaseError(f"adapter {manifest.ref}: {name} is {value.data_type()} {list(shape)}, the "
                                   f"slot takes float {list(want)}")  # fmt: skip
        pair = name[:-1] + ("b" if name.endswith(".a") else "a")
        if pair not in params:
            raise AdapterBaseError(f"adapter {manifest.ref}: {name} has no {pair}")
        other = tuple(params[pair].shape())
        if name.endswith(".a") and other[0] != shape[1]:
            raise AdapterBaseError(f"adapter {manifest.ref}: {name} has rank {shape[1]}, {pair} rank {other[0]}")
        nbytes += 4 * shape[0] * shape[1]
    return nbytes


class AdapterSet:
    """The adapters resident over one engine, by name. Thread-safe; ``get`` is what a request captures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}

    def add(self, adapter: Adapter, replace: bool = True) -> Adapter | None:
        """Make ``adapter`` resident; returns the one it replaced (same name), whose streams run on."""
        with self._lock:
            old = self._by_name.get(adapter.name)
            if old is not None and not replace:
                raise AdapterError(f"an adapter named {adapter.name!r} is already loaded ({old.ref})",
                                   reason="adapter_exists")  # fmt: skip
            self._by_name[adapter.name] = adapter
            return old

    def remove(self, name: str) -> Adapter:
        with self._lock:
            try:
                return self._by_name.pop(name)
            except KeyError:
                raise UnknownAdapterError(f"no adapter named {name!r} is loaded") from None

    def get(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._by_name.get(name)
        if adapter is None:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded ({', '.join(self.names()) or 'none'})")
        return adapter

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def snapshot(self) -> list[Adapter]:
        with self._lock:
            return [self._by_name[n] for n in sorted(self._by_name)]

    def clear(self) -> None:
        with self._lock:
            self._by_name.clear()


def load_adapter(
    adapter_dir: str | Path,
    trust: TrustStore | None,
    base_name: str,
    base_manifest_sha256: str | None,
    slots: Mapping[str, tuple],
) -> Adapter:
    """Read, verify and check one adapter against the loaded base (its manifest's sha256 and graph slots)."""
    manifest, params = read_adapter(adapter_dir, trust)
    try:
        check_adapter_base(manifest, base_name, base_manifest_sha256)
    except ManifestError as exc:
        raise AdapterBaseError(exc.message) from exc
    nbytes = check_fits(manifest, params, slots)
    return Adapter(manifest.name, manifest.version, Path(adapter_dir), manifest, params, nbytes)
