"""`nanofleet eval`: the perplexity of bundles on a text, through the device engine (no torch needed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from manifests import ManifestError, TrustStore, read_manifest_unverified

from .errors import EvalTextError, ExportError
from .gate import DEFAULT_EVAL_TEXT, engine_api


class EvalError(ExportError):
    reason = "eval_failed"


def evaluate_bundles(
    bundles: list[Path],
    text_path: Path | None,
    pubkeys: list[Path] | None,
    *,
    threads: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    api = engine_api()
    text_path = text_path or DEFAULT_EVAL_TEXT
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"cannot read the text {text_path}: {exc}") from exc
    try:
        trust = TrustStore.from_paths(list(pubkeys)) if pubkeys else None
    except ManifestError as exc:
        raise EvalError(exc.message) from exc
    rows: list[dict[str, Any]] = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(bundles))
        for b in bundles:
            t0 = time.perf_counter()
            try:
                manifest = read_manifest_unverified(b)
                engine = api.Engine.from_bundle(b, trust, api.EngineOptions(threads=threads))
            except ManifestError as exc:
                raise EvalError(f"{b}: {exc.message}") from exc
            except api.EngineError as exc:
                raise EvalError(f"{b}: {exc}") from exc
            try:
                if engine.tokenizer is None:
                    raise EvalError(f"{b} has no tokenizer.json")
                ids = engine.tokenizer.encode(text, add_special_tokens=False).ids[
                    : manifest.arch.context_length
                ]
                if len(ids) < 2:
                    raise EvalTextError(f"{text_path} has fewer than 2 tokens")
                ppl = engine.perplexity(ids)
            finally:
                engine.close()
            model_bytes = sum(f.size for f in manifest.files if f.role in ("model", "model_data"))
            rows.append(
                {
                    "bundle": str(b),
                    "name": manifest.name,
                    "version": manifest.version,
                    "recipe": manifest.recipe.precision
                    + ("/" + manifest.recipe.method if manifest.recipe.method != "none" else ""),
                    "model_bytes": model_bytes,
                    "tokens": len(ids),
                    "perplexity": round(ppl, 4),
                    "text": str(text_path),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            bar.advance(task)
    first = rows[0]["perplexity"] if rows else 1.0
    for r in rows:
        r["vs_first_pct"] = round((r["perplexity"] / first - 1) * 100, 3)
    return rows
