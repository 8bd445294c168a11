"""Release commands: record a release (several bundles of one model, each with the rules a board must meet;
manifests/variants.py). Releases are immutable: the same document again changes nothing, another document
under a taken name@version is refused (make the next version)."""

from __future__ import annotations

from manifests import CPU_PROVIDER, BundleManifest, ManifestError, Release

from .. import registry
from .. import schemas as S
from ..audit import audit
from ..db import ReleaseRecord
from ..errors import ConflictError, InvalidManifestError, NotFoundError
from ..rollout.planning import MAX_VERSION
from ..rollout.variants import release_record
from ..views import release_out
from .base import CommandContext, CommandResult


def _bundle_manifest(ctx: CommandContext, release: Release, i: int) -> BundleManifest:
    v = release.spec.variants[i]
    path = f"spec.variants.{i}.bundle"
    if v.bundle.version > MAX_VERSION:
        msg = f"variant {v.name}: bundle version {v.bundle.version} is over the maximum {MAX_VERSION}"
        raise InvalidManifestError(msg, [{"path": f"{path}.version", "msg": msg}])
    try:
        rec = registry.get_bundle(ctx.session, v.bundle.name, v.bundle.version)
    except NotFoundError as exc:
        raise InvalidManifestError(f"variant {v.name}: {exc.message}", [{"path": path, "msg": exc.message}]) from exc
    try:
        return BundleManifest.from_yaml(rec.manifest_yaml)
    except ManifestError as exc:
        msg = f"variant {v.name}: {v.bundle.name}@{v.bundle.version} is not a model bundle ({exc.message})"
        raise InvalidManifestError(msg, [{"path": path, "msg": msg}]) from exc


def with_bundle_rules(ctx: CommandContext, release: Release) -> Release:
    """The release with each variant's rules completed from its bundle: a bundle that declares execution
    providers without the CPU fallback (an fp16 CUDA variant) needs one of them on the board, so the fleet
    never sends a board a bundle its engine would refuse (device/engine/providers.py)."""
    variants = []
    for i, v in enumerate(release.spec.variants):
        wants = _bundle_manifest(ctx, release, i).runtime.execution_providers
        if wants and CPU_PROVIDER not in wants and not v.rules.execution_providers:
            v = v.model_copy(update={"rules": v.rules.model_copy(update={"execution_providers": list(wants)})})
        variants.append(v)
    return release.model_copy(update={"spec": release.spec.model_copy(update={"variants": variants})})


def create_release(ctx: CommandContext, release: Release, *, actor: str) -> CommandResult[S.CreateReleaseResult]:
    """Record a release whose every variant names a model bundle in the registry."""
    release = with_bundle_rules(ctx, release)
    doc = release.to_obj()
    name, version = release.metadata.name, release.metadata.version
    try:
        old = release_record(ctx.session, name, version)
    except NotFoundError:
        old = None
    if old is not None:
        if old.document == doc:
            return CommandResult(S.CreateReleaseResult(result="unchanged", release=release_out(old)))
        msg = f"release {name}@{version} exists with other content; releases are immutable: make {name}@{version + 1}"
        raise ConflictError(msg)
    rec = ReleaseRecord(name=name, version=version, document=doc, created_at=ctx.now)
    ctx.session.add(rec)
    ctx.session.flush()
    variants = {v.name: f"{v.bundle.name}@{v.bundle.version}" for v in release.spec.variants}
    audit(ctx.session, actor, "release_created", ts=ctx.now, release=release.ref, variants=variants)
    return CommandResult(S.CreateReleaseResult(result="created", release=release_out(rec)))
