"""`nanofleet export-adapter`. Module-level imports stay light: torch and peft load in the command."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer

from manifests.cli_output import console, emit_json, fail, out

GATE_FAILED_EXIT, INTERRUPTED_EXIT = 3, 130


def export_adapter(
    base: Path = typer.Option(..., "--base", help="The base bundle folder the adapter was fine-tuned on."),
    adapter: Path = typer.Option(
        ..., "--adapter", help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."
    ),
    key: Path = typer.Option(
        None,
        "--key",
        help="ed25519 private key (from `nanofleet keygen`). "
        "Default: ~/.config/nanofleet/keys/nanofleet.key, created on first use.",
    ),
    version: int = typer.Option(None, "--version", min=1, help="Monotonic adapter version. Default: unix time."),
    name: str = typer.Option(
        None, "--name", help="Adapter name, served as '<base model id>:<name>'. Default: from the PEFT folder."
    ),
    out_dir: Path = typer.Option(None, "--out", help="Adapter bundle folder to create. Default: adapters/<name>."),
    eval_text: Path = typer.Option(
        None,
        "--eval-text",
        help="The adapter's own eval text (what it was tuned for): its perplexity through the device engine "
        "is compared with torch+peft's and the base's. Default: the shipped general eval text.",
    ),
    pubkey: list[Path] = typer.Option(
        None, "--pubkey", help="Verify the base bundle against these public keys first (default: read unverified)."
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="The base's source checkpoint for the torch+peft reference (hub id, folder or .gguf). Default: the "
        "source named in the base manifest (checked against its sha256).",
    ),
    min_effect_kl: float = typer.Option(
        None,
        "--min-effect-kl",
        min=0.0,
        help="Gate: the smallest mean KL divergence between base and base+adapter on the eval text, in nats "
        "(default 0.001): an adapter that changes nothing (an untrained one) is refused.",
    ),
    expires_days: int = typer.Option(365, "--expires-days", min=0, help="Adapter lifetime in days; 0: never."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter bundle at --out."),
    threads: int = typer.Option(None, "--threads", min=1, help="onnxruntime threads for the gate."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Package a PEFT LoRA fine-tune as a signed adapter bundle for one exact base bundle.

    The adapter is bound to the base by the sha256 of the base's manifest.yaml, packed into the base graph's
    LoRA slots (onnxruntime's adapter format), and gated: base+adapter through the device engine must match
    torch+peft within the base precision's limits (KL, same top token, perplexity) on the eval text, and must
    differ from the base alone. A failed gate exits 3, writes <out>.quality_report.json, publishes nothing.
    """
    from export import errors
    from export.adapters import AdapterRequest, run_export_adapter
    from export.adapters.quality import DEFAULT_MIN_EFFECT_KL
    from export.keys import load_signing_key
    from export.progress import Reporter
    from manifests import ManifestError, TrustStore

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM unwinds through the cleanup too
    try:
        signing_key, key_path, created = load_signing_key(key)
        if created:
            console.print(f"[yellow]no --key given: created a signing key at {key_path} (public key beside it)[/]")
        try:
            trust = TrustStore.from_paths(list(pubkey)) if pubkey else None
        except ManifestError as exc:
            raise errors.SigningKeyError(exc.message) from exc
        req = AdapterRequest(
            base=base,
            adapter=adapter,
            key=signing_key,
            name=name,
            version=version,
            out=out_dir,
            eval_text=eval_text,
            base_trust=trust,
            model=model,
            min_effect_kl=DEFAULT_MIN_EFFECT_KL if min_effect_kl is None else min_effect_kl,
            expires_days=expires_days or None,
            force=force,
            threads=threads,
        )
        with Reporter(enabled=not as_json) as reporter:
            result = run_export_adapter(req, reporter)
    except errors.QualityGateError as exc:
        fail(exc.message, code=GATE_FAILED_EXIT, as_json=as_json, reason=exc.reason, report=exc.report_path)
    except errors.ExportError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    except ManifestError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    except KeyboardInterrupt:
        fail("interrupted; nothing published", code=INTERRUPTED_EXIT, as_json=as_json, reason="interrupted")
    summary = result.summary()
    summary["signing_key"] = str(key_path)
    if as_json:
        emit_json(summary)
        return
    _print_summary(summary)


def _print_summary(s: dict[str, Any]) -> None:
    q, lora, ev = s["quality"], s["lora"], {e["what"]: e["perplexity"] for e in s["quality"]["evals"]}
    tf = q["vs_reference"]
    out.print(
        f"[green]adapter[/] {s['adapter']}  ({s['name']}@{s['version']} for {s['base']['name']}@"
        f"{s['base']['version']})\n"
        f"  LoRA rank {lora['rank']}, scale {lora['scale']:g}, on {', '.join(lora['target_modules'])} "
        f"({len(lora['layers'])} layers): {s['adapter_bytes'] / 2**20:.2f} MiB "
        f"({s['adapter_bytes'] / max(1, s['base_model_bytes']):.2%} of the base model)\n"
        f"  perplexity on the eval text: base {ev['engine:base']:.3f} → with adapter {ev['engine:base+adapter']:.3f} "
        f"(torch+peft {ev['torch+peft']:.3f}); KL to torch+peft {tf['kl_mean']:.4f}, same top token "
        f"{tf['top_token_match']:.1%} over {tf['tokens']} tokens: gate passed\n"
        f"  signed with {s['signing_key']}"
    )


def register(app: typer.Typer) -> None:
    app.command("export-adapter")(export_adapter)
