"""`nanofleet export-adapter`: a PEFT LoRA folder + the base bundle → a signed adapter bundle, quality-gated.

Steps: read the base bundle's manifest (verified with --pubkey) and take the sha256 of its manifest.yaml (the
binding) → read the PEFT folder (export/adapters/peft_dir.py) → pack it into the base graph's LoRA slots
(pack.py) → write ``adapter.onnx_adapter`` into a staging folder beside --out → score it (quality.py): the base
bundle + the staged adapter through the device engine, torch + peft on the base's source checkpoint → sign →
one rename. A failed gate writes ``<out>.quality_report.json``, publishes nothing and exits 3.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests import (
    ADAPTER_FILE,
    REPORT_NAME,
    AdapterBase,
    AdapterManifest,
    AdapterQuality,
    BundleManifest,
    LoraSpec,
    ManifestError,
    Provenance,
    SigningKey,
    TrustStore,
    atomic_write_text,
    describe_file,
    fsync_dir,
    manifest_sha256,
    read_manifest_unverified,
    verify_bundle,
    write_signed_adapter_manifest,
)
from manifests.adapter import ADAPTER_ROLE

from ..errors import ExportError, OutputExistsError, QualityGateError
from ..gate import DEFAULT_EVAL_TEXT, engine_api
from ..progress import Reporter
from .pack import PackedAdapter, pack, write_adapter_file
from .peft_dir import AdapterSourceError, PeftAdapter, read_peft
from .quality import DEFAULT_MIN_EFFECT_KL, judge_adapter, limits_for, torch_scores

STAGING = ".staging-"


class BaseBundleError(ExportError):
    """The base bundle cannot be read or verified, or cannot take adapters."""

    reason = "base_bundle"


@dataclass(frozen=True)
class AdapterRequest:
    base: Path
    adapter: Path
    key: SigningKey
    name: str | None = None
    version: int | None = None
    out: Path | None = None
    eval_text: Path | None = None
    base_trust: TrustStore | None = None  # verify the base bundle (signature, files) before using it
    model: str | None = None  # the base's source for torch + peft; default: the base manifest's provenance
    min_effect_kl: float = DEFAULT_MIN_EFFECT_KL
    expires_days: int | None = 365
    force: bool = False
    threads: int | None = None


@dataclass
class AdapterResult:
    out: Path
    manifest: AdapterManifest
    quality: AdapterQuality
    adapter_bytes: int
    base_bytes: int
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        m, q = self.manifest, self.quality
        return {
            "ok": True,
            "adapter": str(self.out),
            "name": m.name,
            "version": m.version,
            "base": m.base.model_dump(mode="json"),
            "lora": m.lora.model_dump(mode="json"),
            "adapter_bytes": self.adapter_bytes,
            "base_model_bytes": self.base_bytes,
            "quality": q.model_dump(mode="json"),
            "timings": self.timings,
        }


def default_adapter_name(folder: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-._")
    return (name or "adapter")[:128]


def run_export_adapter(req: AdapterRequest, reporter: Reporter | None = None) -> AdapterResult:
    reporter = reporter or Reporter(enabled=False)
    with reporter.step("base", f"reading the base bundle {req.base.name}"):
        base, base_sha = _read_base(req.base, req.base_trust)
    with reporter.step("read", f"reading the PEFT adapter {req.adapter.name}"):
        peft = read_peft(req.adapter)
        packed = pack(peft, base.arch, base.graph.lora)
    name = req.name or default_adapter_name(req.adapter)
    out = (req.out or Path("adapters") / name).resolve()
    if out.exists() and not req.force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}", dir=out.parent))
    try:
        created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        manifest = AdapterManifest(
            name=name,
            version=req.version or int(created.timestamp()),
            created_at=created,
            expires_at=created + dt.timedelta(days=req.expires_days) if req.expires_days else None,
            base=AdapterBase(name=base.name, version=base.version, manifest_sha256=base_sha),
            lora=_lora_spec(peft, packed),
            files=[],
            provenance=_provenance(req.adapter, peft),
        )
        write_adapter_file(packed, stage / ADAPTER_FILE, manifest.version, base.version)
        manifest = manifest.model_copy(update={"files": [describe_file(stage, ADAPTER_FILE, ADAPTER_ROLE)]})
        (stage / "manifest.yaml").write_text(manifest.to_yaml(), encoding="utf-8")  # unsigned, for scoring only
        quality = _score(req, base, stage, reporter)
        report = {"quality": quality.model_dump(mode="json"), "base": manifest.base.model_dump(mode="json"),
                  "lora": manifest.lora.model_dump(mode="json"), "adapter": str(req.adapter)}  # fmt: skip
        if not quality.passed:
            report_path = out.with_name(out.name + "." + REPORT_NAME)
            atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
            raise QualityGateError(
                f"adapter quality gate failed, nothing published ({'; '.join(quality.failures.values())}); "
                f"report written to {report_path}",
                report_path=str(report_path),
            )
        with reporter.step("bundle", "signing and writing the adapter bundle"):
            atomic_write_text(stage / REPORT_NAME, json.dumps(report, indent=2) + "\n")
            files = [*manifest.files, describe_file(stage, REPORT_NAME, "report")]
            manifest = manifest.model_copy(update={"files": files, "quality": quality})
            write_signed_adapter_manifest(stage, manifest, req.key)
            for f in stage.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(stage)
            _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    base_bytes = sum(f.size for f in base.files if f.role in ("model", "model_data"))
    return AdapterResult(out, manifest, quality, (out / ADAPTER_FILE).stat().st_size, base_bytes,
                         dict(reporter.timings))  # fmt: skip


def _read_base(path: Path, trust: TrustStore | None) -> tuple[BundleManifest, str]:
    try:
        digest = manifest_sha256(path)
        base = verify_bundle(path, trust) if trust is not None else read_manifest_unverified(path)
    except ManifestError as exc:
        raise BaseBundleError(f"base bundle {path}: {exc.message}") from exc
    if manifest_sha256(path) != digest:
        raise BaseBundleError(f"base bundle {path}: manifest.yaml changed while it was read")
    if base.graph.lora is None:
        raise BaseBundleError(f"base bundle {base.ref} has no LoRA slots in its graph (kind {base.graph.kind}); "
                              "re-export it with this nanofleet (`nanofleet export --lora-sites ...`)")  # fmt: skip
    return base, digest


def _lora_spec(peft: PeftAdapter, packed: PackedAdapter) -> LoraSpec:
    c = peft.config
    scales = {round(m.scale, 9) for m in peft.modules.values()}
    return LoraSpec(
        rank=peft.rank,
        alpha=peft.alpha,
        scale=next(iter(scales)) if len(scales) == 1 else max(scales),
        use_rslora=peft.use_rslora,
        rank_pattern={str(k): int(v) for k, v in (c.get("rank_pattern") or {}).items()},
        alpha_pattern={str(k): float(v) for k, v in (c.get("alpha_pattern") or {}).items()},
        target_modules=peft.target_modules,
        sites=packed.sites,  # type: ignore[arg-type]
        layers=packed.layers,
        parameters=packed.parameters,
        base_model_name_or_path=c.get("base_model_name_or_path"),
    )


def _provenance(folder: Path, peft: PeftAdapter) -> Provenance:
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    tools = {}
    for dist in ("nanofleet", "torch", "transformers", "peft", "onnxruntime"):
        try:
            tools[dist] = version(dist)
        except PackageNotFoundError:
            continue
    built_on = f"{platform.system()} {platform.machine()} python {platform.python_version()}"
    return Provenance(source=str(folder.resolve()), source_kind="folder", source_sha256=h.hexdigest(), tools=tools,
                      built_on=built_on)  # fmt: skip


def _score(req: AdapterRequest, base: BundleManifest, stage: Path, reporter: Reporter) -> AdapterQuality:
    from ..sources import resolve_source

    api = engine_api()
    text_path = req.eval_text or DEFAULT_EVAL_TEXT
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read the eval text {text_path}: {exc}", reason="eval_text") from exc
    src = resolve_source(req.model or base.provenance.source)
    if req.model is None and base.provenance.source_sha256 and src.fingerprint() != base.provenance.source_sha256:
        raise BaseBundleError(f"{src.spec} is not the checkpoint base {base.ref} was built from (sha256 differs); "
                              "pass --model with the base's source")  # fmt: skip
    with reporter.step("engine", "loading the base bundle and the staged adapter (device engine)"):
        engine = api.Engine.from_bundle(req.base, req.base_trust, api.EngineOptions(threads=req.threads))
    try:
        adapter = engine.load_adapter(stage, None)  # unsigned yet: the staged file is what gets signed
        ids = engine.encode(text, add_special_tokens=False)[: engine.context_length]
        if len(ids) < 32:
            raise ExportError(f"the eval text {text_path} has {len(ids)} tokens; at least 32 are needed",
                              reason="eval_text")  # fmt: skip
        with reporter.step("reference", "torch + peft on the base's source checkpoint (fp32)"):
            ref = torch_scores(src, req.adapter, ids)
        with reporter.step("gate", "base + adapter (engine) vs torch + peft, and vs the base alone"):
            return judge_adapter(engine, adapter, ref, ids, hashlib.sha256(text.encode()).hexdigest(),
                                 limits_for(base), req.min_effect_kl)  # fmt: skip
    finally:
        engine.close()


def _publish(stage: Path, out: Path) -> None:
    """Rename the finished adapter into place; with --force the old one moves aside first, then goes."""
    old: Path | None = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, old)
    os.rename(stage, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["AdapterRequest", "AdapterResult", "AdapterSourceError", "BaseBundleError", "run_export_adapter"]
