"""The adapter manifest: a signed LoRA fine-tune of one exact base bundle.

An adapter bundle is a folder, signed like a model bundle (same file names, its own ``format``)::

    manifest.yaml           this schema, as YAML (``format: nanofleet-adapter``)
    manifest.sig            detached ed25519 signature over the exact bytes of manifest.yaml
    adapter.onnx_adapter    the A/B matrices in onnxruntime's adapter format, named as the base graph's LoRA
                            slot inputs (``lora_input_names``), scale folded into B, packed per slot
    quality_report.json     the adapter's quality report (also in the manifest)

The adapter is bound to its base by the sha256 of the base bundle's ``manifest.yaml`` bytes: a base rebuilt,
re-signed or of another precision is a different base, and ``check_adapter_base`` refuses it with a reason.
``verify_bundle`` refuses an adapter folder (another format) and ``verify_adapter`` a model bundle.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._files import atomic_write_bytes, sha256_file
from .bundle import (
    LORA_SITES,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleFile,
    Provenance,
    TeacherForced,
    check_not_expired,
    format_validation_error,
    load_yaml_mapping,
    verify_file,
)
from .errors import MissingFileError, SchemaError, UnsupportedFormatError, VerificationError
from .signing import Signature, SigningKey, TrustStore

ADAPTER_FORMAT = "nanofleet-adapter"
ADAPTER_FORMAT_VERSION = 1
SUPPORTED_ADAPTER_FORMAT_VERSIONS = frozenset({1})
ADAPTER_FILE = "adapter.onnx_adapter"
ADAPTER_ROLE = "adapter"


class AdapterBaseMismatchError(VerificationError):
    """The adapter was built for another base bundle (or the loaded model has no LoRA slots)."""

    reason = "adapter_base_mismatch"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterBase(_Model):
    """The one base bundle this adapter runs on."""

    name: str
    version: int = Field(ge=1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the base's manifest.yaml bytes")


class LoraSpec(_Model):
    """What the fine-tune is: peft's LoRA settings and where the file's matrices go."""

    peft_type: Literal["LORA"] = "LORA"
    rank: int = Field(gt=0, description="peft's r (the largest, with a rank_pattern)")
    alpha: float
    scale: float = Field(description="alpha / rank (alpha / sqrt(rank) with rsLoRA), already folded into B")
    use_rslora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    target_modules: list[str] = Field(description="the checkpoint's modules the adapter changes, e.g. q_proj")
    sites: list[Literal["qkv", "o", "gate_up", "down"]] = Field(description="the base graph's LoRA slots filled")
    layers: list[int] = Field(description="decoder layers the adapter changes")
    parameters: int = Field(ge=0, description="A/B values in the file (packed slots, zero blocks included)")
    dtype: Literal["float32"] = "float32"
    base_model_name_or_path: str | None = Field(default=None, description="as peft's adapter_config.json said")


class AdapterEval(_Model):
    """One model's perplexity on the adapter's eval text."""

    what: str = Field(description="'engine:base', 'engine:base+adapter', 'torch+peft', 'torch:base'")
    perplexity: float


class AdapterEffect(_Model):
    """What the adapter changes, through the device engine: base alone vs base + adapter on the eval text."""

    kl_mean: float = Field(ge=0, description="mean KL(base || base+adapter) per token, nats")
    top_token_changed: float = Field(ge=0, le=1, description="fraction of positions whose top token changed")
    ppl_base: float
    ppl_adapter: float
    min_kl_mean: float = Field(ge=0, description="the floor kl_mean must reach: an adapter that changes nothing "
                               "is refused")  # fmt: skip


class AdapterQuality(_Model):
    """The adapter through the device engine against torch+peft, and against the base alone."""

    eval_text_sha256: str
    tokens: int = Field(ge=1)
    evals: list[AdapterEval] = Field(description="perplexity of each model on the eval text")
    vs_reference: TeacherForced = Field(description="engine base+adapter vs torch+peft (fp32), teacher-forced, "
                                        "judged by the base precision's gate limits")  # fmt: skip
    effect: AdapterEffect
    passed: bool
    failures: dict[str, str] = Field(default_factory=dict, description="each failed check and why, one line")

    def perplexity(self, what: str) -> float | None:
        return next((e.perplexity for e in self.evals if e.what == what), None)


class AdapterManifest(_Model):
    format: Literal["nanofleet-adapter"] = ADAPTER_FORMAT
    format_version: int = ADAPTER_FORMAT_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$", description="served as '<base id>:<name>'")
    version: int = Field(ge=1, description="monotonic; anti-rollback compares it")
    created_at: dt.datetime
    expires_at: dt.datetime | None = None
    base: AdapterBase
    lora: LoraSpec
    files: list[BundleFile]
    quality: AdapterQuality | None = None
    provenance: Provenance

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, role: str) -> BundleFile | None:
        return next((f for f in self.files if f.role == role), None)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> AdapterManifest:
        data = load_yaml_mapping(text, "adapter manifest")
        if data.get("format") != ADAPTER_FORMAT:
            raise UnsupportedFormatError(f"not a nanofleet adapter manifest (format={data.get('format')!r})")
        fv = data.get("format_version")
        if fv not in SUPPORTED_ADAPTER_FORMAT_VERSIONS:
            raise UnsupportedFormatError(
                f"unknown adapter format_version {fv!r}; this build understands "
                f"{sorted(SUPPORTED_ADAPTER_FORMAT_VERSIONS)}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(format_validation_error(exc, "adapter manifest")) from exc


# The version an adapter rollback names when the board held no earlier version of it: the board unloads the
# adapter and its base serves alone. No adapter bundle has this version (versions start at 1).
UNLOADED_VERSION = 0


class AdapterRef(BaseModel):
    """In a desired state (manifests/mqtt.py): a LoRA adapter bundle to make resident over the board's base."""

    name: str
    version: int
    manifest_sha256: str | None = None
    # The exact base it needs (the base bundle's manifest sha256): the agent checks it before a byte is fetched.
    base_manifest_sha256: str
    base_name: str | None = None
    base_version: int | None = None
    # Where to fetch: {base_url}/manifest.yaml, /manifest.sig and each file's path beneath it.
    base_url: str


class AdapterInfo(BaseModel):
    """In a reported state: one adapter on the board, resident over the serving base or not (its base is not
    the one serving), with the version kept on disk for a rollback."""

    name: str
    version: int
    manifest_sha256: str
    base_manifest_sha256: str
    resident: bool = True
    previous_version: int | None = None


def verify_adapter_manifest_bytes(
    body: bytes, sig: bytes, trust: TrustStore, *, now: dt.datetime | None = None
) -> AdapterManifest:
    """Signature over the exact bytes → format version → expiry (files are checked once they are on disk)."""
    trust.verify(body, Signature.from_json(sig))
    manifest = AdapterManifest.from_yaml(body)
    check_not_expired(manifest.expires_at, manifest.ref, now=now)
    return manifest


def is_adapter_manifest(body: bytes) -> bool:
    """Whether manifest bytes claim the adapter format (a cheap look before the full, verified parse)."""
    try:
        data = yaml.safe_load(body)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("format") == ADAPTER_FORMAT


def manifest_sha256(bundle_dir: str | Path) -> str:
    """sha256 of a bundle's manifest.yaml bytes: what an adapter's ``base.manifest_sha256`` names."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MissingFileError(f"{path} not found: not a bundle folder")
    return sha256_file(path)


def write_signed_adapter_manifest(adapter_dir: str | Path, manifest: AdapterManifest, key: SigningKey) -> Signature:
    root = Path(adapter_dir)
    body = manifest.to_yaml().encode("utf-8")
    sig = key.sign(body)
    atomic_write_bytes(root / MANIFEST_NAME, body)
    atomic_write_bytes(root / SIGNATURE_NAME, sig.to_json().encode())
    return sig


def read_adapter_manifest_unverified(adapter_dir: str | Path) -> AdapterManifest:
    """Parse an adapter manifest without checking its signature: for ``inspect`` and local development."""
    path = Path(adapter_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MissingFileError(f"{path} not found: not an adapter folder")
    return AdapterManifest.from_yaml(path.read_bytes())


def verify_adapter(
    adapter_dir: str | Path,
    trust: TrustStore,
    *,
    now: dt.datetime | None = None,
    check_files: bool = True,
    max_file_size: int | None = None,
) -> AdapterManifest:
    """Signature → format version → expiry → every file's path, size and sha256 (as ``verify_bundle``)."""
    root = Path(adapter_dir)
    mpath, spath = root / MANIFEST_NAME, root / SIGNATURE_NAME
    for p in (mpath, spath):
        if not p.is_file():
            raise MissingFileError(f"{p.name} is missing from {root}")
    body = mpath.read_bytes()
    trust.verify(body, Signature.from_json(spath.read_bytes()))
    manifest = AdapterManifest.from_yaml(body)
    check_not_expired(manifest.expires_at, manifest.ref, now=now)
    if check_files:
        for entry in manifest.files:
            verify_file(root, entry, max_size=max_file_size)
    return manifest


def check_adapter_base(adapter: AdapterManifest, base_name: str, base_manifest_sha256: str | None) -> None:
    """Refuse, with a reason naming both sides, an adapter whose base is not exactly this bundle."""
    if base_manifest_sha256 is None:
        raise AdapterBaseMismatchError(
            f"adapter {adapter.ref} needs the signed base bundle {adapter.base.name}@{adapter.base.version}; "
            "the loaded model has no manifest"
        )
    if adapter.base.manifest_sha256 != base_manifest_sha256:
        raise AdapterBaseMismatchError(
            f"adapter {adapter.ref} was built for base {adapter.base.name}@{adapter.base.version} (manifest sha256 "
            f"{adapter.base.manifest_sha256[:12]}…), not for the loaded {base_name} (manifest sha256 "
            f"{base_manifest_sha256[:12]}…)"
        )


__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_FORMAT",
    "ADAPTER_FORMAT_VERSION",
    "ADAPTER_ROLE",
    "LORA_SITES",
    "UNLOADED_VERSION",
    "AdapterBase",
    "AdapterBaseMismatchError",
    "AdapterInfo",
    "AdapterRef",
    "AdapterEffect",
    "AdapterEval",
    "AdapterManifest",
    "AdapterQuality",
    "LoraSpec",
    "check_adapter_base",
    "is_adapter_manifest",
    "manifest_sha256",
    "read_adapter_manifest_unverified",
    "verify_adapter",
    "verify_adapter_manifest_bytes",
    "write_signed_adapter_manifest",
]
