"""The bundle manifest: what the build side promises and the device checks before using a byte.

A bundle is a folder::

    manifest.yaml        this schema, as YAML
    manifest.sig         detached ed25519 signature over the exact bytes of manifest.yaml
    model.onnx [+ data]  the graph (and external data for models over 2 GB)
    tokenizer.json
    chat_template.jinja
    generation_config.json

``verify_bundle`` checks, in this order, so that nothing unverified is ever parsed or opened:
signature → format version → expiry → every file's path, size and sha256.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._files import atomic_write_bytes, sha256_file
from .errors import (
    ExpiredError,
    FileTooLargeError,
    MissingFileError,
    SchemaError,
    TamperedFileError,
    UnsafePathError,
    UnsupportedFormatError,
)
from .signing import Signature, SigningKey, TrustStore

BUNDLE_FORMAT = "nanofleet-bundle"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
MANIFEST_NAME = "manifest.yaml"
SIGNATURE_NAME = "manifest.sig"
REPORT_NAME = "quality_report.json"
# The files of a bundle's model, named once here for the export side and the engine alike.
MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx_data"  # the external weights beside it (optimum's name too)
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchConfig(_Model):
    """Everything the device engine needs to know about the network, so it never needs transformers."""

    architecture: str = Field(description="config key, e.g. 'llama', 'mistral', 'qwen2'")
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    context_length: int = Field(gt=0)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = Field(default_factory=list)
    pad_token_id: int | None = None
    rope_theta: float | None = None
    tie_word_embeddings: bool = False


LORA_SITES = ("qkv", "o", "gate_up", "down")  # the packed projections of one decoder layer, in graph order


def lora_input_names(layer: int, site: str) -> tuple[str, str]:
    """The graph inputs (A [in, rank], B [rank, out]) of one LoRA slot: ``lora.{layer}.{site}.a`` / ``.b``."""
    return f"lora.{layer}.{site}.a", f"lora.{layer}.{site}.b"


class LoraSite(_Model):
    """One packed projection that takes a low-rank term, ``y = x·W + (x·A)·B`` (A, B: graph inputs)."""

    name: Literal["qkv", "o", "gate_up", "down"]
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    modules: list[str] = Field(description="the checkpoint's linear modules packed here, in output order")
    splits: list[int] = Field(description="each module's share of out_features, in the same order")


class LoraSlots(_Model):
    """The graph's LoRA slots: every layer has inputs ``lora_input_names(layer, site)`` for each site, fp32,
    rank dynamic. Rank-0 tensors (A [in, 0], B [0, out]) mean no adapter."""

    sites: list[LoraSite]
    dtype: Literal["float32"] = "float32"

    def site(self, name: str) -> LoraSite | None:
        return next((s for s in self.sites if s.name == name), None)


class GraphSpec(_Model):
    """How to drive the ONNX graph: its I/O names and KV-cache layout."""

    kind: str = Field(description="'optimum-kv' (past_key_values.N.key/value in, present.N.* out) or 'gqa'")
    model_file: str = "model.onnx"
    input_names: list[str]
    output_names: list[str]
    kv_dtype: Literal["float32", "float16"] = "float32"
    # past/present KV tensors are [batch, num_kv_heads, seq, head_dim]
    kv_layout: str = "bnsh"
    shared_kv_buffer: bool = Field(
        default=False, description="past and present may alias one preallocated buffer (GroupQueryAttention)"
    )
    lora: LoraSlots | None = Field(default=None, description="LoRA adapter slots (gqa graphs); None: none")


class Runtime(_Model):
    target: Literal["arm64", "x86_64"]
    min_onnxruntime: str
    operators: list[str] = Field(description="'domain:OpType' for every node in the graph, sorted")
    verified_onnxruntime: list[str] = Field(default_factory=list)
    execution_providers: list[str] = Field(
        default_factory=list,
        description="onnxruntime execution providers the bundle wants, most preferred first (e.g. "
        "CUDAExecutionProvider for an fp16 Jetson variant). Empty: CPU. The engine uses the first the board "
        "has; CPUExecutionProvider in the list allows falling back to it (device/engine/providers.py)",
    )


class Recipe(_Model):
    precision: Literal["fp32", "fp16", "int8", "int4"]
    method: str = Field(description="'none', 'matmulnbits' (weight-only, block-wise) or 'dynamic-int8'")
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    quantize_embeddings: bool = False
    source_grid_matmuls: int = Field(
        default=0,
        description="MatMuls whose weights already lay on a 4-bit block grid (a Q4 GGUF's) and were written as"
        " exact 4-bit MatMulNBits plus a block-offset term, instead of being re-quantized to `bits`",
    )
    nodes_excluded: list[str] = Field(default_factory=list)
    graph_optimizations: list[str] = Field(default_factory=list)


class TeacherForcedLimits(_Model):
    """What a teacher-forced comparison was judged by: the nominal limits, and what they became for the number
    of tokens scored. A short text's sampling error widens each limit by ``z`` standard errors of its own
    estimate (export/teacher_forced.py derives it); ``note`` says when that mattered."""

    max_kl_mean: float = Field(ge=0, description="nominal limit on the mean KL divergence (nats)")
    min_top_token_match: float = Field(ge=0, le=1, description="nominal floor on the same-top-token rate")
    max_ppl_change_pct: float = Field(ge=0, description="nominal limit on the perplexity change, percent")
    ppl_two_sided: bool = Field(
        default=False, description="False: only an increase counts (vs fp32); True: either way (target vs build)"
    )
    z: float = Field(ge=0, description="standard errors added to each limit")
    kl_mean_limit: float = Field(description="the KL limit applied at this many tokens")
    top_token_match_limit: float = Field(description="the same-top-token floor applied at this many tokens")
    ppl_change_limit_pct: float = Field(description="the perplexity-change limit applied at this many tokens")
    note: str | None = None


class TeacherForced(_Model):
    """A candidate's next-token distributions against a reference's at every position of one text, both fed the
    text's own tokens (teacher forcing), as llama.cpp's perplexity tool reports them. Unlike free-running greedy
    agreement, one near-tie changes one position, not the rest of the sequence."""

    reference: str = Field(description="what the candidate was compared with: 'fp32' or 'build'")
    tokens: int = Field(ge=1, description="positions scored (predicted tokens of the text)")
    kl_mean: float = Field(description="mean KL(reference || candidate) per token, nats")
    kl_mean_se: float = Field(ge=0, description="standard error of kl_mean")
    kl_p99: float = Field(description="99th percentile of the per-token KL divergence")
    kl_max: float
    top_token_match: float = Field(ge=0, le=1, description="fraction of positions with the same argmax token")
    ppl_reference: float
    ppl_candidate: float
    ppl_ratio: float = Field(description="ppl_candidate / ppl_reference")
    log_ppl_ratio_se: float = Field(ge=0, description="standard error of log(ppl_ratio) (paired per-token NLL)")
    limits: TeacherForcedLimits
    passed: bool
    failures: dict[str, str] = Field(
        default_factory=dict,
        description="each failed check ('kl_mean', 'top_token_match', 'ppl_ratio', 'finite') and why, one line",
    )


class TargetVerification(_Model):
    cpu: str
    onnxruntime: str
    perplexity: float
    greedy_agreement: float = Field(
        description="same-top-token rate vs the build (teacher_forced.top_token_match); before teacher-forced "
        "metrics: free-running greedy agreement"
    )
    passed: bool
    eval_tokens: int | None = None
    message: str = ""
    teacher_forced: TeacherForced | None = Field(default=None, description="target vs build on the eval text")


class QualityReport(_Model):
    eval_text_sha256: str
    eval_tokens: int
    ppl_reference: float = Field(description="fp32 perplexity on the eval text")
    ppl_quantized: float
    ppl_increase_pct: float
    greedy_agreement: float = Field(
        ge=0.0,
        le=1.0,
        description="fraction of the eval text's positions whose top token equals fp32's, teacher-forced (= "
        "teacher_forced.top_token_match). Reports without teacher_forced measured free-running greedy agreement "
        "over greedy_prompts x greedy_tokens_per_prompt instead",
    )
    greedy_prompts: int = Field(description="0: teacher-forced (no free-running prompts)")
    greedy_tokens_per_prompt: int
    max_ppl_increase_pct: float
    min_greedy_agreement: float = Field(description="the floor on greedy_agreement")
    passed: bool
    onnxruntime: str
    target_verifications: list[TargetVerification] = Field(default_factory=list)
    teacher_forced: TeacherForced | None = Field(default=None, description="quantized vs fp32 on the eval text")


class GoldenCheck(_Model):
    """The agent's health check on activation: this prompt must yield these greedy tokens, in budget."""

    prompt_token_ids: list[int]
    expected_token_ids: list[int]
    latency_budget_ms: float = Field(gt=0)


class BundleFile(_Model):
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: str = "data"

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        check_relative_path(v)
        return v


class Provenance(_Model):
    source: str
    source_kind: Literal["hub", "folder", "gguf"]
    source_sha256: str | None = None
    source_revision: str | None = None
    tools: dict[str, str] = Field(default_factory=dict)
    built_on: str | None = None


class BundleManifest(_Model):
    format: Literal["nanofleet-bundle"] = BUNDLE_FORMAT
    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")
    version: int = Field(ge=1, description="monotonic; anti-rollback compares it")
    created_at: dt.datetime
    expires_at: dt.datetime | None = None
    arch: ArchConfig
    graph: GraphSpec
    runtime: Runtime
    recipe: Recipe
    files: list[BundleFile]
    quality: QualityReport | None = None
    golden: GoldenCheck | None = None
    provenance: Provenance
    generation: dict[str, Any] = Field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def file(self, role: str) -> BundleFile | None:
        return next((f for f in self.files if f.role == role), None)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> BundleManifest:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SchemaError(f"manifest is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise SchemaError("manifest must be a YAML mapping")
        fv = data.get("format_version")
        if data.get("format") != BUNDLE_FORMAT:
            raise UnsupportedFormatError(f"not a nanofleet bundle manifest (format={data.get('format')!r})")
        if fv not in SUPPORTED_FORMAT_VERSIONS:
            raise UnsupportedFormatError(
                f"unknown bundle format_version {fv!r}; this build understands {sorted(SUPPORTED_FORMAT_VERSIONS)}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(format_validation_error(exc, "manifest")) from exc


def load_yaml_mapping(text: str | bytes, what: str) -> dict[str, Any]:
    """YAML text that must hold one mapping; a SchemaError naming ``what`` otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SchemaError(f"{what} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be a YAML mapping")
    return data


def format_validation_error(exc: ValidationError, what: str) -> str:
    lines = [f"invalid {what}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def check_relative_path(path: str) -> None:
    """A bundle path must stay inside its folder: relative, no '..', no backslashes or NULs."""
    if not path or "\\" in path or "\x00" in path:
        raise UnsafePathError(f"unsafe bundle path {path!r}")
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or path.startswith("/"):
        raise UnsafePathError(f"bundle path {path!r} escapes the bundle folder")


def describe_file(root: Path, rel: str, role: str) -> BundleFile:
    full = root / rel
    return BundleFile(path=rel, size=full.stat().st_size, sha256=sha256_file(full), role=role)


def write_signed_manifest(bundle_dir: str | Path, manifest: BundleManifest, key: SigningKey) -> Signature:
    """Write manifest.yaml and its detached signature into ``bundle_dir``."""
    root = Path(bundle_dir)
    body = manifest.to_yaml().encode("utf-8")
    sig = key.sign(body)
    atomic_write_bytes(root / MANIFEST_NAME, body)
    atomic_write_bytes(root / SIGNATURE_NAME, sig.to_json().encode())
    return sig


def read_manifest_unverified(bundle_dir: str | Path) -> BundleManifest:
    """Parse a manifest without checking its signature: for ``inspect`` and tooling only."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MissingFileError(f"{path} not found: not a bundle folder")
    return BundleManifest.from_yaml(path.read_bytes())


def verify_manifest_bytes(
    body: bytes, signature: bytes | str, trust: TrustStore, *, now: dt.datetime | None = None
) -> BundleManifest:
    """Check a manifest's signature, then its format version, then its expiry."""
    trust.verify(body, Signature.from_json(signature))
    manifest = BundleManifest.from_yaml(body)
    check_not_expired(manifest.expires_at, manifest.ref, now=now)
    return manifest


def check_not_expired(expires_at: dt.datetime | None, what: str, *, now: dt.datetime | None = None) -> None:
    if expires_at is None:
        return
    now = now or utcnow()
    exp = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=dt.timezone.utc)
    if now >= exp:
        raise ExpiredError(f"{what} expired at {exp.isoformat()}")


def verify_file(root: Path, entry: BundleFile, *, max_size: int | None = None) -> None:
    check_relative_path(entry.path)
    full = root / entry.path
    # Symlinks could point anywhere: a bundle holds plain files only.
    if full.is_symlink():
        raise UnsafePathError(f"{entry.path} is a symlink; bundles hold plain files only")
    try:
        resolved = full.resolve(strict=True)
    except FileNotFoundError as exc:
        raise MissingFileError(f"{entry.path} is missing from the bundle") from exc
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafePathError(f"{entry.path} resolves outside the bundle folder")
    size = resolved.stat().st_size
    cap = entry.size if max_size is None else min(entry.size, max_size)
    if max_size is not None and entry.size > max_size:
        raise FileTooLargeError(f"{entry.path} declares {entry.size} bytes, over the cap of {max_size}")
    if size != entry.size:
        raise TamperedFileError(f"{entry.path}: size {size} != {entry.size} in the manifest")
    if size > cap:
        raise FileTooLargeError(f"{entry.path} is {size} bytes, over the cap of {cap}")
    digest = sha256_file(resolved)
    if digest != entry.sha256:
        raise TamperedFileError(f"{entry.path}: sha256 {digest[:16]}… does not match the manifest")


def verify_bundle(
    bundle_dir: str | Path,
    trust: TrustStore,
    *,
    now: dt.datetime | None = None,
    check_files: bool = True,
    max_file_size: int | None = None,
) -> BundleManifest:
    """Verify a bundle folder end to end; raises a ``VerificationError`` subclass naming the reason."""
    root = Path(bundle_dir)
    mpath, spath = root / MANIFEST_NAME, root / SIGNATURE_NAME
    for p in (mpath, spath):
        if not p.is_file():
            raise MissingFileError(f"{p.name} is missing from {root}")
    manifest = verify_manifest_bytes(mpath.read_bytes(), spath.read_bytes(), trust, now=now)
    if check_files:
        for entry in manifest.files:
            verify_file(root, entry, max_size=max_file_size)
    return manifest
