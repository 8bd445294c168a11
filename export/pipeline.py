"""The export pipeline: source → fp32 ONNX (validated against torch) → recipe → gate → signed bundle.

Everything is built inside one work folder created beside ``--out`` (same filesystem, so the final
``os.rename`` is atomic); the work folder is removed on success, failure and Ctrl-C alike. A bundle folder
therefore either appears whole, signed and gated, or not at all.
"""

from __future__ import annotations

import datetime as dt
import errno
import gc
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from manifests import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    REPORT_NAME,
    TOKENIZER_FILE,
    ArchConfig,
    BundleFile,
    BundleManifest,
    GoldenCheck,
    GraphSpec,
    Provenance,
    QualityReport,
    Runtime,
    SigningKey,
    atomic_write_text,
    describe_file,
    fsync_dir,
    write_signed_manifest,
)

from . import gate as gate_mod
from .archs import GRAPH_KIND, ArchSpec, spec_for
from .errors import (
    CorruptSourceError,
    ExportError,
    ExportInterruptedError,
    OutOfSpaceError,
    OutputExistsError,
    QualityGateError,
)
from .fuse_gqa import DEFAULT_LORA_SITES
from .onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, export_onnx, validate_against_torch
from .progress import Reporter
from .quantize import DEFAULT_RECIPES, RECIPES, QuantRecipe, min_onnxruntime, operators, quantize
from .sources import ResolvedSource, load_config, load_model, load_tokenizer, resolve_source

Target = Literal["arm64", "x86_64"]
Precision = Literal["int8", "int4", "fp32"]
# The golden check runs on the board at activation; boards are 5-30x slower than this machine.
GOLDEN_BUDGET_FACTOR = 30.0
GOLDEN_BUDGET_MIN_MS = 5000.0
WORK_PREFIX = ".nanofleet-export-"


@dataclass(frozen=True)
class ExportRequest:
    model: str | None = None
    target: Target = "arm64"
    precision: Precision = "int8"
    recipe: str | None = None  # None: DEFAULT_RECIPES[precision], first to pass the gate wins
    key: SigningKey | None = None
    version: int | None = None
    name: str | None = None
    out: Path | None = None
    eval_text: Path | None = None
    prompts: Path | None = None
    thresholds: gate_mod.GateThresholds = field(default_factory=gate_mod.GateThresholds)
    expires_days: int | None = 365
    force: bool = False
    threads: int | None = None
    work_dir: Path | None = None  # where the temp work folder goes; default beside --out
    verify_targets: tuple[str, ...] = ()  # emulated board CPUs to prove the bundle on (export/target)
    # "auto": the fused "gqa" graph (export/fuse_gqa.py, ~2x faster decode) where the architecture allows it,
    # else optimum's "optimum-kv" graph. "gqa" forced fails when it cannot be built.
    graph: Literal["auto", "optimum-kv", "gqa"] = "auto"
    # "auto": the direct builder (export/direct.py: from the checkpoint's tensors, one layer at a time) where the
    # family has one and the graph is gqa; else optimum's tracer. "traced" forces the tracer (the reference the
    # direct builder is validated against); "direct" fails where it cannot be used.
    builder: Literal["auto", "direct", "traced"] = "auto"
    # LoRA adapter slots in the gqa graph (export/fuse_gqa.py LORA_SITES; () for none); optimum-kv graphs have none
    lora_sites: tuple[str, ...] = DEFAULT_LORA_SITES


@dataclass
class ExportResult:
    bundle_dir: Path | None
    manifest: BundleManifest | None
    report: QualityReport
    report_path: Path
    recipe: str
    attempts: list[dict[str, Any]]
    timings: dict[str, float]
    sizes: dict[str, float]
    validation: dict[str, Any]
    passed: bool
    messages: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.passed,
            "bundle": str(self.bundle_dir) if self.bundle_dir else None,
            "report": str(self.report_path),
            "name": self.manifest.name if self.manifest else None,
            "version": self.manifest.version if self.manifest else None,
            "recipe": self.recipe,
            "sizes": self.sizes,
            "ppl_reference": self.report.ppl_reference,
            "ppl_quantized": self.report.ppl_quantized,
            "ppl_increase_pct": self.report.ppl_increase_pct,
            "greedy_agreement": self.report.greedy_agreement,
            "teacher_forced": tf.model_dump(mode="json") if (tf := self.report.teacher_forced) else None,
            "gate_passed": self.report.passed,
            "messages": self.messages,
            "attempts": self.attempts,
            "validation": self.validation,
            "timings": self.timings,
        }


def default_name(src: ResolvedSource, precision: str) -> str:
    if src.gguf_file:
        base = Path(src.gguf_file).stem.split(".")[0]
    elif src.kind == "hub":
        base = src.spec.split("/")[-1]
    else:
        base = src.folder.name
    base = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._") or "model"
    return f"{base}-{precision}"[:120]


def is_enospc(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def run_export(req: ExportRequest, reporter: Reporter | None = None) -> ExportResult:
    """Run the whole pipeline; raises an ``ExportError`` (QualityGateError after writing the report)."""
    reporter = reporter or Reporter(enabled=False)
    if req.key is None:
        raise ExportError("a signing key is required")
    src = resolve_source(req.model)
    precision = req.precision
    recipe_names = [req.recipe] if req.recipe else DEFAULT_RECIPES[precision]
    for r in recipe_names:
        if r not in RECIPES:
            raise ExportError(f"unknown recipe {r!r}; known: {', '.join(sorted(RECIPES))}")
    name = req.name or default_name(src, precision)
    out = (req.out or Path("bundles") / name).resolve()
    if out.exists() and not req.force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose another --out")
    parent = (req.work_dir or out.parent).resolve()
    parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent))
    try:
        return _run(req, src, recipe_names, name, out, work, reporter)
    except KeyboardInterrupt as exc:
        raise ExportInterruptedError("export interrupted; temporary files removed, no bundle written") from exc
    except OutOfSpaceError:
        raise
    except Exception as exc:  # ENOSPC can surface wrapped by any library (onnx, optimum, torch)
        if is_enospc(exc):
            raise OutOfSpaceError(
                f"no space left on the device while exporting into {parent}; free space or pass "
                f"--work-dir/--out on a larger disk ({exc})"
            ) from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Loaded:
    """What every builder needs before it starts: the config and its spec, assets, the eval set."""

    config: Any
    spec: ArchSpec
    arch: ArchConfig
    assets: Path
    evalset: gate_mod.EvalSet
    generation: dict[str, Any]


# One recipe's build: (recipe, its output folder) -> the quantized graph's outcome.
Build = Callable[[QuantRecipe, Path], Any]


def _run(
    req: ExportRequest,
    src: ResolvedSource,
    recipe_names: list[str],
    name: str,
    out: Path,
    work: Path,
    reporter: Reporter,
) -> ExportResult:
    if req.graph not in ("auto", "optimum-kv", "gqa"):
        raise ExportError(f"unknown graph kind {req.graph!r}: auto, optimum-kv or gqa")
    if req.builder not in ("auto", "direct", "traced"):
        raise ExportError(f"unknown builder {req.builder!r}: auto, direct or traced")
    with reporter.step("load", f"loading {src.kind} {Path(src.spec).name}"):
        config = load_config(src)
        spec = spec_for(config)  # unsupported architectures fail here, before any weight is read
        why_not = _direct_refusal(req, spec, config, recipe_names)
        if req.builder == "direct" and why_not:
            raise ExportError(f"--builder direct cannot build this export: {why_not}")
        if why_not is None:
            model, generation = None, _generation_dict_from_source(src, config)
        else:
            model = load_model(src)
            generation = _generation_dict(model)
        assets = work / "assets"
        assets.mkdir()
        _write_assets(assets, load_tokenizer(src), generation)
        arch = spec.arch_config(config, generation)
    loaded = _Loaded(config, spec, arch, assets, gate_mod.EvalSet.load(_tk(assets), req.eval_text, req.prompts),
                     generation)  # fmt: skip
    if why_not is None:
        return _run_direct(req, src, recipe_names, name, out, work, reporter, loaded)
    if req.builder == "auto" and spec.direct is not None and req.graph != "optimum-kv":
        reporter.note(f"builder: traced ({why_not})")
    return _run_traced(req, src, recipe_names, name, out, work, reporter, loaded, model)


def _direct_refusal(req: ExportRequest, spec: ArchSpec, config: Any, recipe_names: list[str]) -> str | None:
    """Why this export goes through optimum's tracer instead of the direct builder (None: it does not)."""
    if req.builder == "traced":
        return "--builder traced"
    if req.graph == "optimum-kv":
        return "--graph optimum-kv is optimum's own graph"
    if "dynamic-int8" in recipe_names:
        return "the dynamic-int8 recipe quantizes optimum's graph"
    return spec.direct_unsupported(config)


def _run_direct(
    req: ExportRequest,
    src: ResolvedSource,
    recipe_names: list[str],
    name: str,
    out: Path,
    work: Path,
    reporter: Reporter,
    loaded: _Loaded,
) -> ExportResult:
    """The fused graph written from the checkpoint's tensors one layer at a time (export/direct.py); the gate's
    fp32 reference streams along with the first build (export/reference.py). No torch model is loaded."""
    from .checkpoint import open_checkpoint
    from .direct import build_direct
    from .fuse_gqa import gqa_graph_spec, lora_slots
    from .reference import StreamedReference

    config, arch = loaded.config, loaded.arch
    assert loaded.spec.direct is not None
    checkpoint = open_checkpoint(src.folder, src.gguf_file, config)
    config_dict = config.to_dict()
    params = _parameter_count(config_dict)
    _check_space_for(work, params * max(_bytes_per_weight(RECIPES[r]) for r in recipe_names))
    ids = loaded.evalset.token_ids[: arch.context_length]
    tied = bool(config_dict.get("tie_word_embeddings")) or not checkpoint.has(loaded.spec.direct.names.lm_head)
    state: dict[str, Any] = {}
    validation: dict[str, Any] = {"builder": "direct", "reference": "transformers layers, streamed"}

    def build(recipe: QuantRecipe, qdir: Path) -> Any:
        observer = None
        if "reference" not in state:  # the first build carries the fp32 reference along
            observer = StreamedReference(config, loaded.spec.direct, ids, tied)  # type: ignore[arg-type]
        with reporter.step(f"build:{recipe.name}", f"writing the {recipe.name} graph layer by layer",
                           total=arch.num_layers) as tick:  # fmt: skip
            done = build_direct(config_dict, checkpoint.get, checkpoint.has, qdir, recipe, arch.context_length,
                                observer=observer, on_layer_done=lambda _i: tick(),
                                lora_sites=req.lora_sites)  # fmt: skip
        release_free_heap()  # the build's freed layers, before the gate loads the bundle
        if observer is not None:
            ref = gate_mod.ModelScore(observer.perplexity, observer.seconds)
            ref.targets, ref.log_probs = observer.targets, observer.log_probs
            state["reference"] = ref
            validation["reference_seconds"] = round(observer.seconds, 2)
        return done.outcome

    def reference() -> gate_mod.ModelScore:
        return state["reference"]

    try:
        return _gate_and_publish(req, src, recipe_names, name, out, work, reporter, loaded,
                                 gqa_graph_spec(arch.num_layers, lora=lora_slots(config_dict, req.lora_sites)), build,
                                 reference, params * 4, validation)  # fmt: skip
    finally:
        checkpoint.close()


def _run_traced(
    req: ExportRequest,
    src: ResolvedSource,
    recipe_names: list[str],
    name: str,
    out: Path,
    work: Path,
    reporter: Reporter,
    loaded: _Loaded,
    model: Any,
) -> ExportResult:
    """optimum's traced export (validated against torch), optionally fused into the gqa graph and proven equal
    to it; then each recipe quantizes the saved graph. The reference that validates the direct builder, and the
    path for families without one."""
    arch, evalset = loaded.arch, loaded.evalset
    _check_space(work, model)
    fp32_dir = work / "fp32"
    with reporter.step("export", "exporting ONNX (fp32, KV cache)"):
        onnx_path = export_onnx(model, fp32_dir)
    with reporter.step("validate", "validating ONNX against torch"):
        validation = validate_against_torch(model, onnx_path, arch, evalset.token_ids, threads=req.threads)
    graph = _graph_spec(onnx_path)
    from .fuse_gqa import FuseGqaError, fuse_for_export, unsupported_reason

    want_gqa = req.graph == "gqa"
    if req.graph == "auto":
        why_not = unsupported_reason(model.config.to_dict())
        if "dynamic-int8" in recipe_names:  # optimum's arm64 recipe is defined on optimum's graph
            why_not = "the dynamic-int8 recipe quantizes optimum's graph"
        want_gqa = why_not is None
        if why_not:
            reporter.note(f"graph: optimum-kv ({why_not})")
    if want_gqa:  # fused attention + shared KV buffer, proven equal to the validated graph
        try:
            with reporter.step("fuse", "building the fused GroupQueryAttention graph"):
                gqa_path, gqa_graph = fuse_for_export(
                    model, work / "gqa", fp32_dir, arch, evalset.token_ids, req.threads, lora_sites=req.lora_sites
                )
        except FuseGqaError as exc:
            if req.graph == "gqa":
                raise
            # auto: the fused graph did not reproduce the validated one; ship the validated one instead
            reporter.note(f"graph: optimum-kv (the fused graph was refused: {exc})")
            shutil.rmtree(work / "gqa", ignore_errors=True)
        else:
            onnx_path, graph = gqa_path, gqa_graph
            fp32_dir = onnx_path.parent
    del model
    gc.collect()
    fp32_size = _model_bytes(fp32_dir)
    with reporter.step("reference", "scoring the fp32 reference", total=1) as tick:
        ref_score = gate_mod.score_model(
            fp32_dir, arch, graph, evalset, req.thresholds.greedy_tokens, threads=req.threads, tick=tick
        )

    def build(recipe: QuantRecipe, qdir: Path) -> Any:
        with reporter.step(f"quantize:{recipe.name}", f"quantizing ({recipe.name})"):
            return quantize(onnx_path, qdir, recipe)

    return _gate_and_publish(req, src, recipe_names, name, out, work, reporter, loaded, graph, build,
                             lambda: ref_score, fp32_size, {"builder": "traced", **validation.as_dict()})  # fmt: skip


def _gate_and_publish(
    req: ExportRequest,
    src: ResolvedSource,
    recipe_names: list[str],
    name: str,
    out: Path,
    work: Path,
    reporter: Reporter,
    loaded: _Loaded,
    graph: GraphSpec,
    build: Build,
    reference: Callable[[], gate_mod.ModelScore],
    fp32_size: int,
    validation: dict[str, Any],
) -> ExportResult:
    """Each recipe in turn: build, gate against the fp32 reference; the first that passes is signed and published.
    A failed gate writes ``<out>.quality_report.json`` and raises QualityGateError."""
    arch, evalset = loaded.arch, loaded.evalset
    eval_tokens = min(len(evalset.token_ids), arch.context_length)
    attempts: list[dict[str, Any]] = []
    chosen: tuple[QuantRecipe, Path, Any, gate_mod.GateResult] | None = None
    last: gate_mod.GateResult | None = None
    for rname in recipe_names:
        recipe = RECIPES[rname]
        qdir = work / f"q-{rname}"
        outcome = build(recipe, qdir)
        for f in (TOKENIZER_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE):
            if (loaded.assets / f).exists():
                shutil.copyfile(loaded.assets / f, qdir / f)
        # (the fp32 recipe too: its self-comparison checks the copy, and it needs its golden check)
        with reporter.step(f"gate:{rname}", f"quality gate ({rname})", total=2) as tick:
            candidate = gate_mod.score_model(
                qdir, arch, graph, evalset, req.thresholds.greedy_tokens, reference=reference(),
                threads=req.threads, tick=tick,
            )  # fmt: skip
        result = gate_mod.judge(reference(), candidate, evalset, req.thresholds, eval_tokens=eval_tokens)
        last = result
        m = result.report.teacher_forced
        attempts.append({"recipe": rname, "size": _model_bytes(qdir), "ppl": result.report.ppl_quantized,
                         "ppl_increase_pct": result.report.ppl_increase_pct,
                         "kl_mean": m.kl_mean if m else None, "top_token_match": m.top_token_match if m else None,
                         "passed": result.passed, "messages": result.messages})  # fmt: skip
        if result.passed:
            chosen = (recipe, qdir, outcome, result)
            break
        shutil.rmtree(qdir, ignore_errors=True)
    assert last is not None
    report_doc = {"report": last.report.model_dump(mode="json"), "attempts": attempts, "validation": validation,
                  "source": src.spec, "fp32_model_bytes": fp32_size}  # fmt: skip
    if chosen is None:
        report_path = out.with_name(out.name + "." + REPORT_NAME)
        atomic_write_text(report_path, json.dumps(report_doc, indent=2) + "\n")
        tried = "; ".join(f"{a['recipe']}: {' and '.join(a['messages'])}" for a in attempts)
        raise QualityGateError(
            f"quality gate failed, no bundle published ({tried}); report written to {report_path}",
            report_path=str(report_path),
        )
    recipe, qdir, outcome, result = chosen
    with reporter.step("bundle", "signing and writing the bundle"):
        manifest = _assemble(req, src, name, arch, graph, recipe, qdir, outcome, result, loaded.assets, work, out,
                             report_doc, evalset.golden_prompts + evalset.prompts)  # fmt: skip
    model_bytes = _model_bytes(out)
    sizes: dict[str, float] = {
        "fp32_model_bytes": fp32_size,
        "model_bytes": model_bytes,
        "bundle_bytes": manifest.total_size,
        "model_size_ratio": round(model_bytes / fp32_size, 4) if fp32_size else 0.0,
    }
    return ExportResult(bundle_dir=out, manifest=manifest, report=result.report, report_path=out / REPORT_NAME,
                        recipe=recipe.name, attempts=attempts, timings=dict(reporter.timings), sizes=sizes,
                        validation=validation, passed=True, messages=[])  # fmt: skip


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and they would add to the gate's peak)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _parameter_count(config: dict[str, Any]) -> int:
    """Weights of a Llama-family checkpoint from its config (for the disk check and the fp32 size)."""
    h, layers, inter, vocab = (int(config[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                        "vocab_size"))  # fmt: skip
    nq = int(config["num_attention_heads"])
    nkv = int(config.get("num_key_value_heads") or nq)
    hd = int(config.get("head_dim") or h // nq)
    per_layer = h * (nq + 2 * nkv) * hd + nq * hd * h + 3 * h * inter + 2 * h
    head = 0 if config.get("tie_word_embeddings") else vocab * h
    return vocab * h + head + layers * per_layer + h


def _bytes_per_weight(recipe: QuantRecipe) -> float:
    if recipe.method != "matmulnbits" or not recipe.bits:
        return 4.0
    return recipe.bits / 8 + 4 / (recipe.block_size or 32) + 1.0  # + 1: the 8-bit head/table, generously


def _check_space_for(work: Path, need_bytes: float) -> None:
    need = int(need_bytes * 1.2) + 64 * 1024**2
    free = shutil.disk_usage(work).free
    if free < need:
        raise OutOfSpaceError(
            f"exporting this model needs about {need / 2**30:.2f} GiB free in {work.parent}, only "
            f"{free / 2**30:.2f} GiB are; free space or pass --out/--work-dir on a larger disk"
        )


def _tk(assets: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(assets / TOKENIZER_FILE))


def _check_space(work: Path, model: Any) -> None:
    """Fail early (before minutes of work) when the disk cannot hold fp32 + quantized + bundle."""
    _check_space_for(work, model.num_parameters() * 4 * 2.2 / 1.2)


def _generation_dict(model: Any) -> dict[str, Any]:
    return _generation_diff(getattr(model, "generation_config", None))


def _generation_dict_from_source(src: ResolvedSource, config: Any) -> dict[str, Any]:
    """What transformers would give the loaded model as its generation config, without loading the model: the
    folder's generation_config.json, else one derived from the config (as from_pretrained does for a GGUF)."""
    from transformers import GenerationConfig

    if not src.gguf_file and (src.folder / GENERATION_CONFIG_FILE).is_file():
        try:
            return _generation_diff(GenerationConfig.from_pretrained(src.folder))
        except Exception as exc:  # a malformed file: the traced path would fail on it too
            raise CorruptSourceError(f"cannot read {src.folder / GENERATION_CONFIG_FILE}: {exc}") from exc
    return _generation_diff(GenerationConfig.from_model_config(config))


def _generation_diff(gc_: Any) -> dict[str, Any]:
    if gc_ is None:
        return {}
    d = gc_.to_diff_dict() if hasattr(gc_, "to_diff_dict") else {}
    d.pop("transformers_version", None)
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool | list) or v is None}


def _write_assets(assets: Path, tokenizer: Any, generation: dict[str, Any]) -> None:
    tokenizer.backend_tokenizer.save(str(assets / TOKENIZER_FILE))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the device uses the default one
        template = template.get("default") or next(iter(template.values()), None)
    if template:
        (assets / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    (assets / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def _graph_spec(onnx_path: Path) -> GraphSpec:
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    kv = next((i for i in g.input if i.name.startswith("past_key_values.")), None)
    kv_dtype = "float16" if kv is not None and kv.type.tensor_type.elem_type == 10 else "float32"
    return GraphSpec(
        kind=GRAPH_KIND,
        model_file=MODEL_FILE,
        input_names=[i.name for i in g.input],
        output_names=[o.name for o in g.output],
        kv_dtype=kv_dtype,
    )


def _model_bytes(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in (MODEL_FILE, EXTERNAL_DATA_FILE) if (folder / f).exists())


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tools = {}
    for dist in (
        "nanofleet",
        "torch",
        "transformers",
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime",
        "gguf",
    ):
        try:
            tools[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return tools


def _assemble(
    req: ExportRequest,
    src: ResolvedSource,
    name: str,
    arch: ArchConfig,
    graph: GraphSpec,
    recipe: QuantRecipe,
    qdir: Path,
    outcome: Any,
    result: gate_mod.GateResult,
    assets: Path,
    work: Path,
    out: Path,
    report_doc: dict[str, Any],
    golden_prompts: list[list[int]],
) -> BundleManifest:
    import onnxruntime

    # The stage sits beside --out (same filesystem) so that publishing is one atomic rename.
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        return _assemble_into(
            stage,
            req,
            src,
            name,
            arch,
            graph,
            recipe,
            qdir,
            outcome,
            result,
            assets,
            work,
            out,
            report_doc,
            golden_prompts,
            onnxruntime.__version__,
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _assemble_into(
    stage: Path,
    req: ExportRequest,
    src: ResolvedSource,
    name: str,
    arch: ArchConfig,
    graph: GraphSpec,
    recipe: QuantRecipe,
    qdir: Path,
    outcome: Any,
    result: gate_mod.GateResult,
    assets: Path,
    work: Path,
    out: Path,
    report_doc: dict[str, Any],
    golden_prompts: list[list[int]],
    ort_version: str,
) -> BundleManifest:
    files: list[BundleFile] = []
    for fname, role in ((MODEL_FILE, "model"), (EXTERNAL_DATA_FILE, "model_data")):
        if (qdir / fname).exists():
            shutil.move(str(qdir / fname), str(stage / fname))
            files.append(describe_file(stage, fname, role))
    for fname, role in (
        (TOKENIZER_FILE, "tokenizer"),
        (CHAT_TEMPLATE_FILE, "chat_template"),
        (GENERATION_CONFIG_FILE, "generation_config"),
    ):
        if (assets / fname).exists():
            shutil.copyfile(assets / fname, stage / fname)
            files.append(describe_file(stage, fname, role))
    cand = result.candidate
    # candidates: the golden prompts (confident sequences) first, then as many of the gate's prompts as needed
    cand_tokens = cand.golden_greedy
    g_index, g_count, g_margin = gate_mod.robust_golden(
        cand.golden_margins, gate_mod.GOLDEN_MIN_MARGIN, gate_mod.GOLDEN_MIN_TOKENS
    )
    report_doc = {
        **report_doc,
        "golden": {
            "prompt_index": g_index,
            "tokens": g_count,
            "smallest_margin": round(g_margin, 3),
            "min_margin": gate_mod.GOLDEN_MIN_MARGIN,
            "note": None
            if g_count >= gate_mod.GOLDEN_MIN_TOKENS
            else f"no golden prompt has {gate_mod.GOLDEN_MIN_TOKENS} greedy tokens clear of near-ties; kept {g_count}",
        },
    }
    atomic_write_text(stage / REPORT_NAME, json.dumps(report_doc, indent=2) + "\n")
    files.append(describe_file(stage, REPORT_NAME, "report"))
    ops = operators(stage / MODEL_FILE)
    host = "x86_64" if platform.machine().lower() in ("x86_64", "amd64") else "arm64"
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    expires = created + dt.timedelta(days=req.expires_days) if req.expires_days else None
    golden = GoldenCheck(
        prompt_token_ids=list(golden_prompts[g_index]),
        expected_token_ids=list(cand_tokens[g_index][:g_count]),
        latency_budget_ms=round(max(GOLDEN_BUDGET_MIN_MS, cand.greedy_ms_first_prompt * GOLDEN_BUDGET_FACTOR), 1),
    )
    runtime = Runtime(
        target=req.target,
        min_onnxruntime=min_onnxruntime(ops, recipe),
        operators=ops,
        verified_onnxruntime=[ort_version] if host == req.target else [],
    )
    embeddings_8bit = any(n.startswith("embedding-8bit") for n in outcome.notes)
    manifest_recipe = outcome.manifest_recipe(recipe, embeddings_8bit)
    quality = result.report
    if req.verify_targets:  # `--verify-target CPU`: prove the staged bundle on emulated boards first
        from .target.gate import verify_on_targets

        quality, runtime = verify_on_targets(
            stage, req.verify_targets, req.eval_text, arch, graph, runtime, manifest_recipe, quality, golden,
            threads=req.threads,
        )  # fmt: skip
    manifest = BundleManifest(
        name=name,
        version=req.version or int(created.timestamp()),
        created_at=created,
        expires_at=expires,
        arch=arch,
        graph=graph,
        runtime=runtime,
        recipe=manifest_recipe,
        files=files,
        quality=quality,
        golden=golden,
        provenance=Provenance(
            source=src.spec,
            source_kind=src.kind,
            source_sha256=src.fingerprint(),
            source_revision=src.revision,
            tools=_tool_versions(),
            built_on=f"{platform.system()} {platform.machine()} python {platform.python_version()}",
        ),
        generation=(
            json.loads((assets / GENERATION_CONFIG_FILE).read_text())
            if (assets / GENERATION_CONFIG_FILE).exists()
            else {}
        ),
    )
    assert req.key is not None
    write_signed_manifest(stage, manifest, req.key)
    for f in stage.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(stage)
    _publish(stage, out, work)
    return manifest


def _publish(stage: Path, out: Path, work: Path) -> None:
    """Rename the finished bundle into place; with --force the old one moves aside first, then goes."""
    old: Path | None = None
    if out.exists():
        old = work / "replaced"
        os.rename(out, old)
    os.rename(stage, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
