"""nanofleet's contract: bundle manifests, signing, the MQTT topics and payloads, deployment manifests.

``device/`` imports this package and nothing else of ours; keep it free of heavy dependencies.
"""

from ._files import atomic_write_bytes, atomic_write_text, fsync_dir, sha256_file
from .adapter import (
    ADAPTER_FILE,
    ADAPTER_FORMAT,
    AdapterBase,
    AdapterBaseMismatchError,
    AdapterEffect,
    AdapterEval,
    AdapterManifest,
    AdapterQuality,
    LoraSpec,
    check_adapter_base,
    manifest_sha256,
    read_adapter_manifest_unverified,
    verify_adapter,
    write_signed_adapter_manifest,
)
from .bundle import (
    BUNDLE_FORMAT,
    CHAT_TEMPLATE_FILE,
    FORMAT_VERSION,
    GENERATION_CONFIG_FILE,
    LORA_SITES,
    MANIFEST_NAME,
    MODEL_DATA_FILE,
    MODEL_FILE,
    REPORT_NAME,
    SIGNATURE_NAME,
    TOKENIZER_FILE,
    ArchConfig,
    BundleFile,
    BundleManifest,
    GoldenCheck,
    GraphSpec,
    LoraSite,
    LoraSlots,
    Provenance,
    QualityReport,
    Recipe,
    Runtime,
    TargetVerification,
    TeacherForced,
    TeacherForcedLimits,
    check_not_expired,
    check_relative_path,
    describe_file,
    lora_input_names,
    read_manifest_unverified,
    verify_bundle,
    verify_file,
    verify_manifest_bytes,
    write_signed_manifest,
)
from .capabilities import CAPABILITIES_SCHEMA, CPU_PROVIDER, BoardCapabilities
from .deployment import DeploymentManifest, ReleaseSelector
from .errors import (
    BadSignatureError,
    ExpiredError,
    FileTooLargeError,
    KeyExistsError,
    KeyFormatError,
    ManifestError,
    MissingFileError,
    NanofleetError,
    SchemaError,
    TamperedFileError,
    UnknownKeyError,
    UnsafePathError,
    UnsupportedFormatError,
    VerificationError,
)
from .signed_doc import SignedDocument, canonical_json
from .signing import Signature, SigningKey, TrustStore, load_public_key, write_keypair
from .variants import Release, Variant, VariantChoice, VariantRefusal, VariantRules, resolve_variant

__all__ = [name for name in dir() if not name.startswith("_")]
