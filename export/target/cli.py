"""`nanofleet verify-target`: run a bundle on an emulated board CPU with the device engine, compare it
with the build machine, exit non-zero on a regression."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import typer

from manifests.cli_output import console, emit_json, fail

from .verify import DEFAULT_MAX_KL, DEFAULT_MAX_PPL_DRIFT_PCT, DEFAULT_MIN_TOP_MATCH

# Exit codes (also in docs/target-verification.md).
EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_ENVIRONMENT = 4


def verify_target_cmd(
    bundle: Path | None = typer.Argument(
        None, help="Bundle folder (manifest.yaml + model). Optional with --prepare.", show_default=False
    ),
    cpu: str = typer.Option(
        "cortex-a76",
        "--cpu",
        help="Board CPU to emulate: cortex-a72 (Pi 4), cortex-a76 (Pi 5), neoverse-n1 (Orin).",
    ),
    text: Path | None = typer.Option(
        None,
        "--text",
        help="Eval text, scored teacher-forced on both sides (any English text of a few hundred tokens). "
        "Default: the export gate's text (so the signed report's fp32 reference applies too).",
        show_default=False,
    ),
    max_text_tokens: int | None = typer.Option(
        None,
        "--max-text-tokens",
        min=2,
        help="Score only the first N tokens of the text (emulation is slow).",
    ),
    onnxruntime: str | None = typer.Option(
        None,
        "--onnxruntime",
        help="onnxruntime version the boards run. Default: this machine's (the build's).",
    ),
    trust: list[Path] = typer.Option(
        [],
        "--trust",
        help="Trusted public key (repeatable): check the signature and files on the target too.",
    ),
    max_ppl_drift: float = typer.Option(
        DEFAULT_MAX_PPL_DRIFT_PCT,
        "--max-ppl-drift",
        min=0.0,
        help="Largest allowed perplexity difference target vs build, in percent (widened on short texts).",
    ),
    max_kl: float = typer.Option(
        DEFAULT_MAX_KL,
        "--max-kl",
        min=0.0,
        help="Largest allowed mean KL divergence of the target's next-token distributions from the build's, "
        "teacher-forced over the text, in nats (widened on short texts).",
    ),
    min_top_match: float = typer.Option(
        DEFAULT_MIN_TOP_MATCH,
        "--min-top-match",
        min=0.0,
        max=1.0,
        help="Smallest allowed fraction of the text's positions where the target's top token equals the "
        "build's (widened on short texts).",
    ),
    no_golden: bool = typer.Option(False, "--no-golden", help="Do not require the manifest's golden tokens."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="onnxruntime threads (both runs)."),
    timeout: float = typer.Option(3600, "--timeout", min=1, help="Seconds allowed for each run."),
    no_cache: bool = typer.Option(
        False,
        "--no-cache",
        help="Emulate again even when these exact files were measured before with the same text, CPU, "
        "onnxruntime and code (the results cache; $NANOFLEET_VERIFY_CACHE=off disables it). The signature and "
        "runtime checks run on the target either way.",
    ),
    prepare: bool = typer.Option(
        False, "--prepare", help="Only build/refresh the cached arm64 root, wheels and qemu, then exit."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (perplexity, agreement, ...)."),
) -> None:
    """Prove a bundle on the boards' own CPU: the device engine under qemu-aarch64, on a Debian arm64 userland with aarch64 onnxruntime, numpy and tokenizers wheels, compared with the same run on this machine.

    Checks, in order: can the target onnxruntime run the bundle at all (version, operators); the eval text teacher-forced on both sides: mean KL divergence, same top token and perplexity of the target against this machine (and, on the gate's own text, perplexity against the signed fp32 reference); the manifest's golden check (the agent's activation test).

    Exit codes: 0 passed, 1 regression (named), 2 bad input, 3 bundle refused, 4 environment (qemu, debootstrap or downloads missing). The first run builds the cache (~/.cache/nanofleet/target, a few minutes). A measurement of the same files, text, CPU, onnxruntime and code is reused from the results cache (the export's --verify-target fills it).
    """  # noqa: E501
    if prepare:
        _prepare(cpu, onnxruntime, as_json)
        return
    if bundle is None:
        fail("give a BUNDLE folder (or --prepare)", code=EXIT_BAD_INPUT, as_json=as_json, reason="bad_input")
    from .verify import Thresholds

    thresholds = Thresholds(max_ppl_drift, max_kl, min_top_match, not no_golden)
    run = dict(max_text_tokens=max_text_tokens, onnxruntime=onnxruntime, trusted_keys=trust or None,
               thresholds=thresholds, threads=threads, timeout=timeout, cache=not no_cache)  # fmt: skip
    _verify(bundle, cpu, text, run, as_json)


def _progress(as_json: bool) -> Callable[[str], None]:
    def progress(msg: str) -> None:
        if not as_json:
            console.print(f"[dim]verify-target:[/] {msg}")

    return progress


@contextlib.contextmanager
def _exit_codes(as_json: bool) -> Iterator[None]:
    """The target's errors as the command's exit codes (docs/target-verification.md)."""
    from .errors import BadInputError, TargetError, TargetRefusedError, UnsupportedCpuError

    try:
        yield
    except TargetRefusedError as exc:
        fail(exc.message, code=EXIT_REFUSED, as_json=as_json, reason=exc.reason, problems=exc.problems)
    except (BadInputError, UnsupportedCpuError) as exc:
        fail(exc.message, code=EXIT_BAD_INPUT, as_json=as_json, reason=exc.reason)
    except TargetError as exc:
        fail(exc.message, code=EXIT_ENVIRONMENT, as_json=as_json, reason=exc.reason)


def _prepare(cpu: str, onnxruntime: str | None, as_json: bool) -> None:
    """--prepare: build (or check) the cached arm64 root, wheels and qemu, and say where they are."""
    from .runner import prepare_target
    from .wheels import host_onnxruntime_version

    with _exit_codes(as_json):
        version = onnxruntime or host_onnxruntime_version()
        with _status("building the target userland", as_json):
            env = prepare_target(cpu, version, _progress(as_json))
    info = {
        "ok": True,
        "cpu": cpu,
        "onnxruntime": version,
        "qemu": env.emulator.path,
        "qemu_version": env.emulator.version_text,
        "rootfs": str(env.rootfs),
        "site": str(env.site),
    }
    if as_json:
        emit_json(info)
    else:
        console.print(f"[green]ready:[/] qemu {info['qemu_version']}, root {info['rootfs']}, "
                      f"wheels {info['site']}")  # fmt: skip


def _verify(bundle: Path, cpu: str, text: Path | None, run: dict[str, Any], as_json: bool) -> None:
    """The verification itself; ``run``: run_verification's keyword arguments from the options."""
    from .verify import run_verification

    with _exit_codes(as_json), _status(f"verifying on emulated {cpu}", as_json):
        outcome = run_verification(bundle, cpu, text, progress=_progress(as_json), **run)
    data: dict[str, Any] = outcome.to_dict()
    if as_json:
        emit_json(data)
    else:
        _print_human(data)
    if not outcome.passed:
        raise typer.Exit(EXIT_REGRESSION)


def _status(message: str, quiet: bool) -> AbstractContextManager[Any]:
    """A spinner for people; nothing on stderr's terminal controls when the output is --json."""
    return contextlib.nullcontext() if quiet else console.status(message)


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _print_human(d: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{d['bundle']} on {d['cpu']}", show_header=True)
    table.add_column("")
    table.add_column(f"target (aarch64, onnxruntime {d['onnxruntime']})")
    table.add_column(f"build (onnxruntime {d['host_onnxruntime']})")
    table.add_row("perplexity", _fmt(d["perplexity"], ".3f"), _fmt(d["host_perplexity"], ".3f"))
    table.add_row("eval tokens", str(d["eval_tokens"]), str(d["eval_tokens"]))
    if d["teacher_forced"]:
        m = d["teacher_forced"]
        table.add_row("mean KL to the build", f"{m['kl_mean']:.5f} (limit {m['limits']['kl_mean_limit']:.4f})", "0")
        table.add_row(
            "same top token", f"{m['top_token_match']:.1%} (floor {m['limits']['top_token_match_limit']:.1%})", "100%"
        )
    if d["golden_match"] is not None:
        table.add_row("golden check", "match" if d["golden_match"] else "DIFFERENT", "")
    table.add_row("seconds", str(d["seconds"]["target"]), str(d["seconds"]["host"]))
    console.print(table)
    for w in d["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    if d["passed"]:
        drift = _fmt(d["ppl_drift_pct"], "+.2f")
        console.print(f"[bold green]passed[/] on {d['cpu']} (perplexity drift {drift}%)")
    else:
        for r in d["regressions"]:
            console.print(f"[bold red]regression {r['name']}:[/] {r['message']}")


def register(app: typer.Typer) -> None:
    app.command("verify-target")(verify_target_cmd)
