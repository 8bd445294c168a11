"""`nanofleet fleet release ...`: build a release (several bundles of one model, each with the rules a board
must meet; manifests/variants.py) and record it in the fleet. A deployment then names the release and every
device gets the variant its capabilities fit (docs/fleet.md, "Per-board variants").

    nanofleet fleet release create --name smollm2 --version 1 \\
        --variant 'int8=out/smollm2-int8,min_ram=4GiB,cpu_features=asimddp' \\
        --variant 'int4=out/smollm2-int4,min_ram=768MiB'
    nanofleet fleet release create release.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from manifests.cli_output import emit_json, fail, out

from .cli import JSON_HELP, _call, connection_options

releases_app = typer.Typer(help="Releases: per-board variants of one model (no sub-command: list them).")

VARIANT_HELP = (
    "NAME=BUNDLE[,RULE=VALUE...], repeatable, most demanding first. BUNDLE: a signed bundle folder (uploaded "
    "first) or name@version already in the registry. RULEs: hardware_class=pi5|pi4, arch=aarch64, min_ram=4GiB, "
    "cpu_features=asimddp+i8mm, execution_providers=CUDAExecutionProvider|TensorrtExecutionProvider, "
    "min_onnxruntime=1.22."
)
_LISTS = {"hardware_class": "|", "arch": "|", "execution_providers": "|", "cpu_features": "+"}
_SCALARS = ("min_ram", "min_onnxruntime")


class VariantSpecError(ValueError):
    pass


def parse_variant(spec: str) -> tuple[dict[str, Any], Path | None]:
    """A --variant value as a release variant document, and the bundle folder to upload first (if any)."""
    head, *rules = [p.strip() for p in spec.split(",")]
    name, sep, bundle = head.partition("=")
    if not sep or not name or not bundle:
        raise VariantSpecError(f"--variant {spec!r}: give NAME=BUNDLE first (e.g. int8=out/smollm2-int8)")
    folder: Path | None = None
    if Path(bundle).is_dir():
        from manifests import ManifestError, read_manifest_unverified

        folder = Path(bundle)
        try:
            m = read_manifest_unverified(folder)
        except ManifestError as exc:
            raise VariantSpecError(f"--variant {name}: {bundle} is not a bundle folder ({exc.message})") from exc
        ref = {"name": m.name, "version": m.version}
    else:
        bname, at, ver = bundle.rpartition("@")
        if not at or not bname or not ver.isdigit():
            raise VariantSpecError(f"--variant {name}: {bundle!r} is neither a bundle folder nor name@version")
        ref = {"name": bname, "version": int(ver)}
    doc: dict[str, Any] = {}
    for rule in rules:
        key, eq, value = rule.partition("=")
        if not eq or not value:
            raise VariantSpecError(f"--variant {name}: rule {rule!r} is not RULE=VALUE")
        if key in _LISTS:
            doc[key] = [v for v in value.split(_LISTS[key]) if v]
        elif key in _SCALARS:
            doc[key] = value
        else:
            known = ", ".join([*_LISTS, *_SCALARS])
            raise VariantSpecError(f"--variant {name}: unknown rule {key!r} (known: {known})")
    return {"name": name, "bundle": ref, "rules": doc}, folder


def build_release(name: str, version: int, variants: list[str], description: str) -> tuple[Any, list[Path]]:
    """The validated release (manifests.Release) and the bundle folders its variants name."""
    from manifests import Release

    docs, folders = [], []
    for spec in variants:
        doc, folder = parse_variant(spec)
        docs.append(doc)
        if folder is not None:
            folders.append(folder)
    release = Release.from_obj(
        {
            "apiVersion": "nanofleet/v1",
            "kind": "Release",
            "metadata": {"name": name, "version": version, "description": description},
            "spec": {"variants": docs},
        }
    )
    return release, folders


def release_table(r: dict[str, Any]) -> Table:
    t = Table(title=f"release {r['name']}@{r['version']}" + (f": {r['description']}" if r["description"] else ""))
    for col in ("variant", "bundle", "rules"):
        t.add_column(col)
    for v in r["variants"]:
        rules = ", ".join(f"{k}={'/'.join(map(str, x)) if isinstance(x, list) else x}" for k, x in v["rules"].items())
        t.add_row(v["name"], v["bundle"], rules or "any board")
    return t


@releases_app.callback(invoke_without_command=True)
@connection_options
def releases(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    if ctx.invoked_subcommand is not None:
        return
    rows = _call(ctx, lambda c: c.releases(), as_json)
    if as_json:
        emit_json(rows)
        return
    t = Table(title=f"releases ({len(rows)})")
    for col in ("release", "variants", "created"):
        t.add_column(col)
    for r in rows:
        t.add_row(f"{r['name']}@{r['version']}", ", ".join(f"{v['name']} ({v['bundle']})" for v in r["variants"]),
                  r["created_at"])  # fmt: skip
    out.print(t)


@releases_app.command("create")
@connection_options
def release_create(
    ctx: typer.Context,
    file: Path | None = typer.Argument(None, help="A release YAML (kind: Release); or build one with the options."),
    name: str | None = typer.Option(None, "--name", help="Release name (with --variant)."),
    version: int | None = typer.Option(None, "--version", help="Release version, >= 1 (with --variant)."),
    variant: list[str] = typer.Option([], "--variant", help=VARIANT_HELP),
    description: str = typer.Option("", "--description", help="One line shown with the release."),
    push: bool = typer.Option(True, "--push/--no-push", help="Upload bundle folders named by --variant first."),
    save: Path | None = typer.Option(None, "--out", help="Also write the release YAML here."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the YAML; contact no fleet."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Record a release in the fleet (idempotent; another release under a taken name@version is refused)."""
    from manifests import ManifestError, Release

    try:
        if file is not None:
            if variant or name or version:
                raise VariantSpecError("give a release file or --name/--version/--variant, not both")
            release, folders = Release.from_yaml(file.read_bytes()), []
        else:
            if not (name and version and variant):
                raise VariantSpecError("give a release file, or --name, --version and at least one --variant")
            release, folders = build_release(name, version, variant, description)
    except VariantSpecError as exc:
        fail(str(exc), as_json=as_json, reason="invalid_release")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}", as_json=as_json, reason="invalid_release")
    except ManifestError as exc:
        fail(exc.message.replace("\n", " "), as_json=as_json, reason=exc.reason)
    if save is not None:
        save.write_text(release.to_yaml())
    if dry_run:
        if as_json:
            emit_json({"ok": True, "release": release.to_obj()})
        else:
            out.print(release.to_yaml(), end="", markup=False, highlight=False)
        return
    if push:
        for folder in folders:
            _call(ctx, lambda c, f=folder: _push(c, f), as_json)
    res = _call(ctx, lambda c: c.create_release(release.to_obj()), as_json)
    if as_json:
        emit_json(res)
        return
    out.print(f"release {release.ref}: [green]{res['result']}[/]")
    out.print(release_table(res["release"]))


def _push(client: Any, folder: Path) -> None:
    """Upload a bundle folder unless the registry holds that name@version already (the fleet then checks
    the manifest is the same one)."""
    from manifests import read_manifest_unverified

    from .client import FleetAPIError

    m = read_manifest_unverified(folder)
    try:
        client.model(m.name, m.version)
        return
    except FleetAPIError as exc:
        if exc.status_code != 404:
            raise
    client.upload_bundle(folder)


@releases_app.command("show")
@connection_options
def release_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Release name."),
    version: int = typer.Argument(..., help="Release version."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """One release: its variants, in the order they are tried, with their rules."""
    res = _call(ctx, lambda c: c.release(name, version), as_json)
    if as_json:
        emit_json(res)
    else:
        out.print(release_table(res))
