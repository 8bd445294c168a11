"""`nanofleet device serve|chat` and the top-level `nanofleet bench` (owned by the engine work).

Heavy imports (onnxruntime, uvicorn) happen inside the commands so `nanofleet --help` stays instant."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import typer
from rich.console import Console

_err = Console(stderr=True)


def _trust(pubkeys: list[Path] | None):  # noqa: ANN202 - manifests.TrustStore | None
    from manifests import TrustStore

    return TrustStore.from_paths(list(pubkeys)) if pubkeys else None


def _options(threads: int | None, weights_cache: Path | None, no_weights_cache: bool):  # noqa: ANN202
    from device.engine import EngineOptions
    from device.engine.weights_cache import default_cache_dir

    cache = None if no_weights_cache else str(weights_cache or default_cache_dir())
    return EngineOptions(threads=threads, weights_cache=cache)


_CACHE_HELP = (
    "Prepacked-weights cache folder (default: $NANOFLEET_WEIGHTS_CACHE or ~/.cache/nanofleet/weights). "
    "The first load of a model on this machine builds an entry (~2.3x the model on disk); later loads map "
    "the packed weights instead of packing them in memory: lower peak RSS, faster load."
)
_NO_CACHE_HELP = "Pack the weights in this process's memory at every load (no cache on disk)."


def _fail(message: str, code: int = 1) -> None:
    _err.print(f"[red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(code)


def serve(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Bundle folder (or a plain optimum export folder)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default keeps the API on this board only."),
    port: int = typer.Option(8080, help="TCP port."),
    threads: int = typer.Option(None, help="onnxruntime intra-op threads (default: one per physical core)."),
    pubkey: list[Path] = typer.Option(None, "--pubkey", help="Verify the bundle against these public keys."),
    api_key: str = typer.Option(
        None, "--api-key", envvar="NANOFLEET_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*."
    ),
    max_concurrency: int = typer.Option(1, help="Generations running at once."),
    max_queue: int = typer.Option(8, help="Requests waiting for a slot; beyond it: 429."),
    weights_cache: Path = typer.Option(None, "--weights-cache", help=_CACHE_HELP),
    no_weights_cache: bool = typer.Option(False, "--no-weights-cache", help=_NO_CACHE_HELP),
    adapter: list[Path] = typer.Option(
        None,
        "--adapter",
        help="A LoRA adapter bundle for this base (from `nanofleet export-adapter`; repeatable). Each is served as "
        "'<base model id>:<adapter name>' beside the base itself; with --pubkey it is verified like the bundle, "
        "and an adapter built for another base is refused.",
    ),
) -> None:
    """Serve a bundle with the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models,
    /healthz, /readyz, /metrics)."""
    import uvicorn

    from device.api import ApiSettings, ModelHolder, create_app
    from device.engine import EngineError
    from device.engine.bench import load_for_bench

    trust = _trust(pubkey)
    # Take the port first: a busy one fails in one line, before a model is loaded or "serving" is said.
    sock = _listen(host, port)
    try:
        engine = load_for_bench(bundle, trust, _options(threads, weights_cache, no_weights_cache))
    except EngineError as exc:
        sock.close()
        _fail(str(exc))
    for path in adapter or []:
        try:
            loaded = engine.load_adapter(path, trust, replace=False)
        except EngineError as exc:
            engine.close()
            sock.close()
            _fail(f"{exc} ({exc.reason})")
        _err.print(f"adapter [bold]{engine.name}:{loaded.name}[/] ({loaded.ref}, {loaded.nbytes / 2**20:.1f} MiB)")
    settings = ApiSettings(host=host, port=port, api_key=api_key, max_concurrency=max_concurrency, max_queue=max_queue)
    _err.print(f"serving [bold]{engine.name}[/] on http://{host}:{port}/v1")
    app = create_app(ModelHolder(engine), settings)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """The bound listening socket uvicorn then serves on (no window for another process to take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror} (another server there? pick one with --port)")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def chat(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Bundle folder (or a plain optimum export folder)."),
    system: str = typer.Option(None, help="System message."),
    max_tokens: int = typer.Option(512, help="Most tokens per answer."),
    temperature: float = typer.Option(0.7, help="0 = greedy."),
    threads: int = typer.Option(None, help="onnxruntime intra-op threads."),
    pubkey: list[Path] = typer.Option(None, "--pubkey", help="Verify the bundle against these public keys."),
    weights_cache: Path = typer.Option(None, "--weights-cache", help=_CACHE_HELP),
    no_weights_cache: bool = typer.Option(False, "--no-weights-cache", help=_NO_CACHE_HELP),
    json_schema: Path = typer.Option(
        None,
        "--json-schema",
        help="Constrain every answer to JSON that validates against this JSON schema file (the same "
        "grammar as response_format json_schema in the API; unsupported schema features are named).",
    ),
) -> None:
    """Interactive streaming chat in the terminal (empty line or Ctrl-D to quit)."""
    from device.engine import EngineError, SamplingParams
    from device.engine.bench import load_for_bench

    out = Console()
    grammar = _schema_grammar(json_schema) if json_schema is not None else None
    try:
        engine = load_for_bench(bundle, _trust(pubkey), _options(threads, weights_cache, no_weights_cache))
    except EngineError as exc:
        _fail(str(exc))
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    out.print(f"[dim]{engine.name}: type a message; empty line to quit[/]")
    while True:
        try:
            line = out.input("[bold green]> [/]")
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            prompt = engine.encode_chat(messages)
            room = engine.context_length - len(prompt)
            params = SamplingParams(max_new_tokens=max(0, min(max_tokens, room)), temperature=temperature)
            answer = []
            constraint = None
            if grammar is not None:
                from device.engine.constraints import GrammarConstraint

                constraint = GrammarConstraint(engine, grammar)
            for ev in engine.stream_text(prompt, params, constraint=constraint):
                answer.append(ev.text)
                out.print(ev.text, end="", markup=False, highlight=False, soft_wrap=True)
            out.print()
        except EngineError as exc:
            out.print(f"[red]{exc}[/]")
            messages.pop()
            continue
        except KeyboardInterrupt:
            out.print("[dim](stopped)[/]")
        messages.append({"role": "assistant", "content": "".join(answer)})
    engine.close()


def _schema_grammar(path: Path):  # noqa: ANN202 - device.engine.constraints.Grammar
    """The grammar of a JSON schema file, or a one-line error naming what is wrong with it."""
    from device.engine import EngineError
    from device.engine.constraints import Grammar

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}")
    except ValueError as exc:
        _fail(f"{path} is not JSON: {exc}")
    try:
        return Grammar.json_schema(schema)
    except EngineError as exc:
        _fail(f"{path}: {exc}")


def bench(
    bundle: Path = typer.Argument(..., help="Bundle folder (or a plain optimum export folder)."),
    prompt_tokens: int = typer.Option(128, help="Prompt length in tokens."),
    new_tokens: int = typer.Option(128, help="Tokens to generate (greedy, EOS ignored)."),
    threads: int = typer.Option(None, help="onnxruntime intra-op threads (default: one per physical core)."),
    runs: int = typer.Option(3, help="Repetitions; the median is reported."),
    pubkey: list[Path] = typer.Option(None, "--pubkey", help="Verify the bundle against these public keys."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (top-level decode_tok_s)."),
    weights_cache: Path = typer.Option(None, "--weights-cache", help=_CACHE_HELP),
    no_weights_cache: bool = typer.Option(False, "--no-weights-cache", help=_NO_CACHE_HELP),
    adapter: list[Path] = typer.Option(
        None,
        "--adapter",
        help="Also load this LoRA adapter bundle over the base (repeatable) and report its load time, bytes, the "
        "memory it adds, its TTFT and decode speed, and the per-request switch latency between adapters.",
    ),
) -> None:
    """Measure TTFT, prefill tok/s, decode tok/s and peak RSS of a bundle on this machine."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from device.engine import EngineError
    from device.engine.bench import run_bench

    opts = _options(threads, weights_cache, no_weights_cache)
    try:
        if as_json:
            result = run_bench(bundle, prompt_tokens, new_tokens, threads, runs, _trust(pubkey), opts, adapter)
        else:
            cols = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            with Progress(*cols, console=_err, transient=True) as progress:
                progress.add_task(f"benchmarking {bundle.name} ({runs} runs)", total=None)
                result = run_bench(bundle, prompt_tokens, new_tokens, threads, runs, _trust(pubkey), opts, adapter)
    except EngineError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    table = Table(title=f"{result.model} ({result.onnxruntime}, {result.cpu}, threads={threads or 'auto'})")
    for col in ("prompt", "new", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MiB", "model MiB", "weights"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result.prompt_tokens),
        str(result.new_tokens),
        f"{result.ttft_ms:.1f}",
        f"{result.prefill_tok_s:.0f}",
        f"{result.decode_tok_s:.1f}",
        f"{result.peak_rss_mb:.0f}",
        f"{result.model_mb:.0f}",
        result.weights,
    )
    Console().print(table)
    if result.adapters:
        at = Table(title=f"LoRA adapters over {result.model} (switch between requests: {result.switch_ms} ms)")
        for col in ("adapter", "load ms", "MiB", "RSS added MiB", "TTFT ms", "decode tok/s", "vs base"):
            at.add_column(col, justify="right")
        for row in result.adapters:
            ratio = row["decode_tok_s"] / result.decode_tok_s if result.decode_tok_s else 0.0
            at.add_row(f"{result.model}:{row['name']}", f"{row['load_ms']:.1f}", f"{row['bytes'] / 2**20:.2f}",
                       f"{row['rss_added_mb']:.1f}", f"{row['ttft_ms']:.1f}", f"{row['decode_tok_s']:.1f}",
                       f"{ratio:.2f}x")  # fmt: skip
        Console().print(at)


def register(app: typer.Typer, device_app: typer.Typer) -> None:
    device_app.command("serve")(serve)
    device_app.command("chat")(chat)
    app.command("bench")(bench)
