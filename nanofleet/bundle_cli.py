"""`nanofleet keygen` and `nanofleet bundle verify|inspect`: contract-level commands (no torch)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from manifests import (
    ManifestError,
    TrustStore,
    VerificationError,
    read_manifest_unverified,
    verify_bundle,
    write_keypair,
)
from manifests.cli_output import emit_json, fail, out

bundle_app = typer.Typer(help="Inspect and verify signed model bundles.", no_args_is_help=True)


def keygen(
    out_dir: Path = typer.Option(..., "--out", help="Folder for nanofleet.key (mode 0600) and nanofleet.pub."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Make an ed25519 signing key pair. Refuses to overwrite an existing key."""
    try:
        priv, pub = write_keypair(out_dir)
    except ManifestError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    from manifests import load_public_key
    from manifests.signing import key_id_of

    kid = key_id_of(load_public_key(pub))
    if as_json:
        emit_json({"ok": True, "private_key": str(priv), "public_key": str(pub), "key_id": kid})
    else:
        out.print(f"private key: {priv} (mode 0600)\npublic key:  {pub}\nkey id:      {kid}")


@bundle_app.command("verify")
def verify(
    bundle: Path = typer.Argument(..., help="Bundle folder (holds manifest.yaml)."),
    pubkey: list[Path] = typer.Option(..., "--pubkey", help="Trusted public key(s); repeat to trust several."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (errors as JSON too)."),
) -> None:
    """Check the signature, format version, expiry and every file's size and sha256."""
    try:
        trust = TrustStore.from_paths(list(pubkey))
        manifest = verify_bundle(bundle, trust)
    except VerificationError as exc:
        fail(f"verification failed ({exc.reason}): {exc.message}", as_json=as_json, reason=exc.reason)
    except ManifestError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json({"ok": True, "name": manifest.name, "version": manifest.version, "files": len(manifest.files)})
    else:
        out.print(f"[green]OK[/] {manifest.ref}: signature, format, expiry and {len(manifest.files)} files verified")


@bundle_app.command("inspect")
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (errors as JSON too)."),
) -> None:
    """Show a bundle's manifest (without verifying it; use `verify` for that)."""
    try:
        m = read_manifest_unverified(bundle)
    except ManifestError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json(m.model_dump(mode="json"))
        return
    t = Table(title=f"{m.ref}", show_header=False)
    t.add_row("created / expires", f"{m.created_at} / {m.expires_at or 'never'}")
    a = m.arch
    t.add_row(
        "architecture",
        f"{a.architecture}: {a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} heads, "
        f"{a.num_kv_heads} KV heads, head dim {a.head_dim}, vocab {a.vocab_size}, context {a.context_length}",
    )
    t.add_row("target", f"{m.runtime.target}, onnxruntime >= {m.runtime.min_onnxruntime}")
    t.add_row("recipe", m.recipe.model_dump_json(exclude_defaults=True))
    t.add_row("graph", f"{m.graph.kind} ({m.graph.model_file})")
    t.add_row("operators", ", ".join(m.runtime.operators))
    if m.quality:
        q = m.quality
        t.add_row(
            "quality",
            f"ppl {q.ppl_reference:.2f} → {q.ppl_quantized:.2f} ({q.ppl_increase_pct:+.2f}%), "
            f"greedy agreement {q.greedy_agreement:.1%}, {'passed' if q.passed else 'FAILED'}",
        )
        for tv in q.target_verifications:
            t.add_row(f"verified on {tv.cpu}", f"ort {tv.onnxruntime}: ppl {tv.perplexity:.2f}, "
                      f"agreement {tv.greedy_agreement:.1%}, {'passed' if tv.passed else 'FAILED'}")
    t.add_row("provenance", f"{m.provenance.source} ({m.provenance.source_kind})")
    for f in m.files:
        t.add_row(f"file {f.role}", f"{f.path}  {f.size:,} B  {f.sha256[:16]}…")
    t.add_row("total size", f"{m.total_size:,} B")
    out.print(t)


@bundle_app.command("resign")
def resign(
    bundle: Path = typer.Argument(..., help="The bundle folder whose files the new version reuses."),
    key: Path = typer.Option(..., "--key", help="Private signing key (PEM, from `nanofleet keygen`)."),
    version: int = typer.Option(..., "--version", min=1, help="The new version number."),
    out_dir: Path = typer.Option(..., "--out", help="New folder for the signed bundle (must not exist)."),
    expires: str = typer.Option(
        "keep", "--expires", help="never, keep (the source's), a duration (90d, 12h, 2w) or a date (2027-06-30)."
    ),
    pubkey: list[Path] = typer.Option(
        [], "--pubkey", help="Also check the source's signature against these keys; repeatable."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    """Sign the same files again as a new version (a re-release, a new expiry): no re-export. The files
    are checked against the source manifest first; --out appears whole, or not at all."""
    from manifests import KeyFormatError, SigningKey

    from .resign import parse_expiry, resign_bundle

    try:
        signing_key = SigningKey.load(key)
        trust = TrustStore.from_paths(list(pubkey)) if pubkey else None
        m = resign_bundle(
            bundle, out_dir, signing_key, version=version, expires_at=parse_expiry(expires), trust=trust
        )
    except KeyFormatError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    except VerificationError as exc:
        fail(f"{bundle}: {exc.message} (nothing was signed)", as_json=as_json, reason=exc.reason)
    except ManifestError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json(
            {
                "ok": True,
                "bundle": str(out_dir),
                "name": m.name,
                "version": m.version,
                "expires_at": m.expires_at.isoformat() if m.expires_at else None,
                "key_id": signing_key.key_id,
            }
        )
    else:
        out.print(
            f"[green]signed[/] {m.ref} into {out_dir} (key {signing_key.key_id}, "
            f"expires {m.expires_at.isoformat() if m.expires_at else 'never'})"
        )
