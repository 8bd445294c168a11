"""`nanofleet fleet ...`: run the service and drive it. Module-level imports stay light (typer, rich);
the service's own imports (FastAPI, SQLAlchemy, amqtt) load inside the commands that need them."""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from manifests.cli_output import console, emit_json, fail, out

fleet_app = typer.Typer(
    help="The fleet service: registry, artifact serving, staged rollouts, telemetry.", no_args_is_help=True
)
models_app = typer.Typer(help="Signed model bundles in the registry (no sub-command: list them).")
deployments_app = typer.Typer(help="Deployments and their rollouts (no sub-command: list them).")


class Conn:
    """Where the fleet is and the admin token: options, else the environment, else a service config (its
    service.json and admin.token), else the default data folder of `fleet serve` in this directory."""

    def __init__(self, url: str | None, token: str | None, config: Path | None) -> None:
        self._url, self._token, self._config = url, token, config

    def merged(self, url: str | None, token: str | None, config: Path | None) -> Conn:
        """Options given after the sub-command win over those given before it."""
        return Conn(url or self._url, token or self._token, config or self._config)

    def resolve(self) -> tuple[str, str | None]:
        url = self._url or os.environ.get("NANOFLEET_FLEET_URL")
        token = self._token or os.environ.get("NANOFLEET_FLEET_TOKEN")
        cfg = self._service_config() if url is None or token is None else None
        if cfg is not None:
            info = cfg.data_dir / "service.json"
            if url is None:
                if info.is_file():
                    url = json.loads(info.read_text())["url"]
                else:
                    url = cfg.public_url or f"http://{cfg.host}:{cfg.port}"
            if token is None:
                token = cfg.admin_token
                tok_file = cfg.data_dir / "admin.token"
                if token is None and tok_file.is_file():
                    token = tok_file.read_text().strip()
        return url or "http://127.0.0.1:8600", token

    def _service_config(self) -> Any:
        """--config's service config; else the default one when `fleet serve` runs from this folder
        (its data in ./.nanofleet-fleet); else None."""
        from .config import FleetConfig

        if self._config is not None:
            return FleetConfig.load(self._config)
        default = FleetConfig()
        return default if (default.data_dir / "service.json").is_file() else None

    def client(self) -> Any:
        from .client import FleetClient

        url, token = self.resolve()
        return FleetClient(url, token)


JSON_HELP = "Print JSON for scripts (errors as JSON too)."
URL_HELP = "Fleet service URL (env NANOFLEET_FLEET_URL)."
TOKEN_HELP = "Admin token (env NANOFLEET_FLEET_TOKEN; `fleet serve` writes it to <data_dir>/admin.token)."
CONFIG_HELP = "The service's config file: URL and admin token from its data folder."


@fleet_app.callback()
def _fleet(
    ctx: typer.Context,
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    token: str | None = typer.Option(None, "--token", help=TOKEN_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    ctx.obj = Conn(url, token, config)


def connection_options(fn: Any) -> Any:
    """Give a command --url, --token and --config of its own, so they work after the sub-command too
    (`nanofleet fleet status --config fleet.yaml`) and not only before it."""
    sig = inspect.signature(fn)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, default, annotation in (
            ("conn_url", typer.Option(None, "--url", help=URL_HELP), str | None),
            ("conn_token", typer.Option(None, "--token", help=TOKEN_HELP), str | None),
            ("conn_config", typer.Option(None, "--config", "-c", help=CONFIG_HELP), Path | None),
        )
    ]

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        conn_url: str | None = None,
        conn_token: str | None = None,
        conn_config: Path | None = None,
        **kwargs: Any,
    ) -> Any:
        ctx = sig.bind_partial(*args, **kwargs).arguments["ctx"]  # every such command takes ctx
        base = ctx.obj if isinstance(ctx.obj, Conn) else Conn(None, None, None)
        ctx.obj = base.merged(conn_url, conn_token, conn_config)
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    return wrapper


def _call(ctx: typer.Context, fn: Any, as_json: bool) -> Any:
    from .client import FleetAPIError
    from .errors import FleetError

    try:
        with ctx.obj.client() as c:
            return fn(c)
    except FleetAPIError as exc:
        if exc.status_code == 401:
            url, token = ctx.obj.resolve()
            hint = (
                "no admin token given: pass --token, set NANOFLEET_FLEET_TOKEN or --config FLEET.yaml"
                if not token
                else "it refused the admin token given"
            )
            fail(f"{url} answered 401 (unauthorised): {hint}", as_json=as_json, reason="unauthorised")
        body = exc.body
        extra = {"errors": body.get("errors")} if isinstance(body, dict) and body.get("errors") else {}
        fail(exc.message, as_json=as_json, reason=exc.reason, **extra)
    except FleetError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)


# --- serve ------------------------------------------------------------------------------------------


@fleet_app.command("serve")
def serve(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config (manifests/examples/fleet.yaml, docs/fleet.md)."
    ),
    port: int | None = typer.Option(None, "--port", help="Override the HTTP port (0: a free one)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show the libraries' logs (migrations, broker, HTTP server)."
    ),
) -> None:
    """Run the fleet service: REST API, artifact server, embedded MQTT broker, rollout engine, dashboard."""
    import logging

    from .config import FleetConfig
    from .errors import FleetError
    from .server import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Migration steps, broker and HTTP-server chatter are the libraries' business: only with --verbose.
    if not verbose:
        for noisy in ("alembic", "amqtt", "transitions", "httpx", "uvicorn", "uvicorn.error"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = FleetConfig.load(config) if config else FleetConfig()
        if port is not None:
            cfg.port = port
        preflight(cfg)
        run(cfg, log_level=log_level if verbose else "warning")
    except FleetError as exc:
        fail(exc.message, reason=exc.reason)


def preflight(cfg: Any) -> None:
    """What would make the service fail at start, checked before it creates anything (data folder,
    database, admin token): the trusted keys, the signing key, the data folder and the port."""
    import socket

    from manifests import KeyFormatError, TrustStore

    from .errors import ConfigError

    try:
        TrustStore.from_paths(list(cfg.trusted_keys))
    except KeyFormatError as exc:
        raise ConfigError(f"trusted_keys: {exc.message}") from exc
    if cfg.signing_key is not None and not cfg.signing_key.is_file():
        raise ConfigError(f"signing_key {cfg.signing_key} does not exist")
    existing = cfg.data_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"data_dir {cfg.data_dir}: {existing} is not writable by this user")
    ports = [("HTTP", cfg.host, cfg.port)]
    if cfg.broker.embedded:
        ports.append(("MQTT", cfg.broker.host, cfg.broker.port))
    for what, host, port in ports:
        if not port:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves bind
            try:
                s.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from exc


# --- apply ------------------------------------------------------------------------------------------


@fleet_app.command("apply")
@connection_options
def apply(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Deployment manifest YAML (see manifests/examples/)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    watch: bool = typer.Option(False, "--watch", help="Follow the rollout live until it finishes."),
) -> None:
    """Make a deployment manifest true. Idempotent, like `kubectl apply`."""
    import yaml

    from . import safe_yaml

    try:
        # Bounded: no aliases ("billion laughs"), at most 64 levels deep, 1 MiB (fleet/safe_yaml.py).
        doc = safe_yaml.load_file(file)
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read {file}: " + " ".join(str(exc).split()), as_json=as_json, reason="input")
    res = _call(ctx, lambda c: c.apply(doc), as_json)
    dep = res["deployment"]
    if as_json:
        emit_json(res)
    else:
        out.print(
            f"deployment.nanofleet/{dep['name']} [bold]{res['result']}[/] "
            f"({dep['bundle']}, {dep['strategy']}, {dep['counts']['total']} devices, {dep['waves']} waves)"
        )
    if watch and not as_json:
        _watch_deployment(ctx, dep["name"])


# --- tables -----------------------------------------------------------------------------------------


def _ago(ts: str | None) -> str:
    if not ts:
        return "-"
    import datetime as dt

    secs = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(ts)).total_seconds()
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}m ago" if secs < 7200 else f"{secs / 3600:.0f}h ago"


def devices_table(devs: list[dict[str, Any]]) -> Table:
    t = Table(title=f"devices ({len(devs)})")
    for col in (
        "id",
        "online",
        "model",
        "update",
        "hw",
        "tags / groups",
        "decode tok/s",
        "TTFT p95",
        "last seen",
    ):
        t.add_column(col)
    for d in devs:
        tel = d.get("telemetry") or {}
        tags = ",".join(f"{k}={v}" for k, v in (d.get("tags") or {}).items())
        groups = ",".join(d.get("groups") or [])
        t.add_row(
            d["id"],
            "[green]yes[/]" if d["online"] else "[red]no[/]",
            d.get("model") or "-",
            d.get("update_state") or "-",
            d.get("hardware_class") or "-",
            " ".join(x for x in (tags, groups) if x),
            f"{tel['decode_tok_s']:.1f}" if tel.get("decode_tok_s") else "-",
            f"{tel['ttft_p95_ms']:.0f} ms" if tel.get("ttft_p95_ms") else "-",
            _ago(d.get("last_seen")),
        )
    return t


def deployments_table(deps: list[dict[str, Any]]) -> Table:
    t = Table(title=f"deployments ({len(deps)})")
    for col in ("name", "bundle", "strategy", "status", "wave", "progress", "reason"):
        t.add_column(col)
    for d in deps:
        c = d["counts"]
        prog = " ".join(f"{k}={v}" for k, v in sorted(c.items()) if k != "total")
        t.add_row(
            d["name"],
            d["bundle"],
            d["strategy"],
            _status_style(d["status"]),
            f"{min(d['wave'] + 1, d['waves'])}/{d['waves']}",
            f"{prog} (of {c['total']})",
            d.get("abort_reason") or "",
        )
    return t


def _status_style(s: str) -> str:
    color = {
        "completed": "green",
        "planning": "blue",  # recorded by the apply; the engine's next tick selects its devices
        "in_progress": "cyan",
        "paused": "yellow",
        "rolling_back": "magenta",
        "rolled_back": "magenta",
        "aborted": "red",
    }.get(s, "white")
    return f"[{color}]{s}[/]"


def deployment_detail(d: dict[str, Any]) -> Group:
    head = Table(show_header=False, title=f"deployment {d['name']} (generation {d['generation']})")
    if d.get("release"):
        head.add_row("release", d["release"])
    else:
        head.add_row("bundle", d["bundle"])
    head.add_row("strategy", d["strategy"])
    head.add_row("status", _status_style(d["status"]))
    head.add_row("wave", f"{min(d['wave'] + 1, d['waves'])} of {d['waves']}")
    if d.get("abort_reason"):
        head.add_row("abort reason", d["abort_reason"])
    t = Table(title="devices")
    for col in ("device", "wave", "state", "variant", "previous", "health", "error"):
        t.add_column(col)
    for x in d["targets"]:
        health = ", ".join(f"{k}={v}" for k, v in (x.get("health") or {}).items())
        variant = f"{x['variant']} ({x['bundle']})" if x.get("variant") else (x.get("bundle") or "-")
        t.add_row(
            x["device_id"],
            str(x["wave"] + 1),
            x["state"],
            variant,
            x.get("previous") or "-",
            health,
            x.get("error") or "",
        )
    return Group(head, t)


@fleet_app.command("devices")
@connection_options
def devices(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    watch: bool = typer.Option(False, "--watch", help="Refresh every second (Ctrl-C to stop)."),
) -> None:
    """Enrolled devices: online, model, update state, latest telemetry."""
    if as_json:
        emit_json(_call(ctx, lambda c: c.devices(), True))
        return
    _live(ctx, lambda c: devices_table(c.devices()), watch)


@fleet_app.command("status")
@connection_options
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    watch: bool = typer.Option(False, "--watch", help="Refresh every second (Ctrl-C to stop)."),
) -> None:
    """Fleet summary: devices online, models, deployments by status, broker connection."""
    if as_json:
        emit_json(_call(ctx, lambda c: c.status(), True))
        return

    def render(c: Any) -> Group:
        s = c.status()
        t = Table(show_header=False, title="fleet")
        t.add_row("devices", f"{s['devices']} ({s['online']} online)")
        t.add_row("models", str(s["models"]))
        t.add_row("deployments", ", ".join(f"{k}={v}" for k, v in s["deployments"].items()) or "none")
        t.add_row("MQTT", f"{s['mqtt_url']} ({'connected' if s['mqtt_connected'] else 'DISCONNECTED'})")
        t.add_row("URL", s["public_url"])
        return Group(t, deployments_table(c.deployments()))

    _live(ctx, render, watch)


@fleet_app.command("enroll-token")
@connection_options
def enroll_token(
    ctx: typer.Context,
    uses: int = typer.Option(1, "--uses", help="How many devices may enrol with it."),
    ttl_s: float = typer.Option(86400, "--ttl", help="Seconds it stays valid."),
    tag: list[str] = typer.Option([], "--tag", help="key=value given to each enrolled device; repeatable."),
    group: list[str] = typer.Option([], "--group", help="Group for each enrolled device; repeatable."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Make a one-time enrolment token (a device exchanges it for its own credentials)."""
    tags = {}
    for kv in tag:
        if "=" not in kv:
            fail(f"--tag wants key=value, got {kv!r}", as_json=as_json, reason="input")
        k, v = kv.split("=", 1)
        tags[k] = v
    res = _call(ctx, lambda c: c.enrollment_token(uses=uses, ttl_s=ttl_s, tags=tags, groups=group), as_json)
    if as_json:
        emit_json(res)
    else:
        out.print(f"enrolment token (shown once, {uses} use(s), expires {res['expires_at']}):\n{res['token']}")


@fleet_app.command("audit")
@connection_options
def audit(
    ctx: typer.Context,
    deployment: str | None = typer.Option(None, "--deployment", "-d", help="Only this deployment's entries."),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many entries, newest first."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """The audit log: every apply, wave, device result, abort and rollback."""
    rows = _call(ctx, lambda c: c.audit(deployment, limit), as_json)
    if as_json:
        emit_json(rows)
        return
    t = Table(title="audit log (newest first)")
    for col in ("time", "actor", "action", "deployment", "device", "details"):
        t.add_column(col)
    for a in rows:
        t.add_row(
            a["ts"][:19],
            a["actor"],
            a["action"],
            a.get("deployment") or "",
            a.get("device_id") or "",
            json.dumps(a["details"])[:80],
        )
    out.print(t)


def _live(ctx: typer.Context, render: Any, watch: bool, done: Any = None) -> None:
    if not watch:
        out.print(_call(ctx, render, False))
        return
    try:
        with Live(_call(ctx, render, False), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(1.0)
                renderable = _call(ctx, render, False)
                live.update(renderable)
                if done is not None and _call(ctx, done, False):
                    # It may have finished after the frame above was fetched: show the final state.
                    live.update(_call(ctx, render, False))
                    break
    except KeyboardInterrupt:
        pass


# --- models -----------------------------------------------------------------------------------------


@models_app.callback(invoke_without_command=True)
@connection_options
def models(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    if ctx.invoked_subcommand is not None:
        return
    rows = _call(ctx, lambda c: c.models(), as_json)
    if as_json:
        emit_json(rows)
        return
    t = Table(title=f"models ({len(rows)})")
    for col in ("bundle", "size", "recipe", "quality", "key", "in use"):
        t.add_column(col)
    for m in rows:
        q = (m["summary"] or {}).get("quality") or {}
        recipe = (m["summary"] or {}).get("recipe") or {}
        t.add_row(
            f"{m['name']}@{m['version']}",
            f"{m['total_size'] / 2**20:.1f} MiB",
            f"{recipe.get('precision', '?')} {recipe.get('method', '')}",
            f"ppl {q['ppl_increase_pct']:+.1f}%, agree {q['greedy_agreement']:.0%}" if q else "-",
            m["key_id"],
            "; ".join(m["in_use_by"]) or "-",
        )
    out.print(t)


@models_app.command("push")
@connection_options
def models_push(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="Signed bundle folder."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Upload a signed bundle; the fleet checks its signature before storing it."""
    from manifests import ManifestError

    try:
        with console.status(f"uploading {bundle} ..."):
            res = _call(ctx, lambda c: c.upload_bundle(bundle), as_json)
    except ManifestError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json(res)
    else:
        out.print(
            f"[green]stored[/] {res['name']}@{res['version']} ({res['total_size']:,} B, "
            f"{len(res['files'])} files, signed by {res['key_id']})"
        )


@models_app.command("inspect")
@connection_options
def models_inspect(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Bundle name."),
    version: int = typer.Argument(..., help="Bundle version."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """A stored bundle's manifest and files."""
    res = _call(ctx, lambda c: c.model(name, version), as_json)
    if as_json:
        emit_json(res)
        return
    t = Table(show_header=False, title=f"{name}@{version}")
    t.add_row("manifest sha256", res["manifest_sha256"])
    t.add_row("signed by", res["key_id"])
    t.add_row("base URL", res["base_url"])
    t.add_row("in use by", "; ".join(res["in_use_by"]) or "-")
    for f in res["files"]:
        t.add_row(f"file {f['role']}", f"{f['path']}  {f['size']:,} B  {f['sha256'][:16]}…")
    out.print(t)


@models_app.command("delete")
@connection_options
def models_delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Bundle name."),
    version: int = typer.Argument(..., help="Bundle version."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Delete a bundle (refused while it is in use)."""
    _call(ctx, lambda c: c.delete_model(name, version), as_json)
    if as_json:
        emit_json({"ok": True, "deleted": f"{name}@{version}"})
    else:
        out.print(f"deleted {name}@{version}")


# --- deployments ------------------------------------------------------------------------------------


@deployments_app.callback(invoke_without_command=True)
@connection_options
def deployments(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    watch: bool = typer.Option(False, "--watch", help="Refresh every second (Ctrl-C to stop)."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if as_json:
        emit_json(_call(ctx, lambda c: c.deployments(), True))
        return
    _live(ctx, lambda c: deployments_table(c.deployments()), watch)


def _watch_deployment(ctx: typer.Context, name: str) -> None:
    from .rollout.states import DeploymentStatus as D  # here: the rest of the CLI stays light to import

    resting = {D.COMPLETED, D.ABORTED, D.ROLLED_BACK, D.PAUSED}  # nothing moves until someone acts
    _live(
        ctx,
        lambda c: deployment_detail(c.deployment(name)),
        True,
        done=lambda c: c.deployment(name)["status"] in resting,
    )


@deployments_app.command("show")
@connection_options
def deployments_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Deployment name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    watch: bool = typer.Option(False, "--watch", help="Follow until the rollout finishes."),
) -> None:
    """One deployment with progress per device."""
    if as_json:
        emit_json(_call(ctx, lambda c: c.deployment(name), True))
        return
    if watch:
        _watch_deployment(ctx, name)
    else:
        out.print(_call(ctx, lambda c: deployment_detail(c.deployment(name)), False))


def _control_cmd(action: str, doc: str) -> None:
    def cmd(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="Deployment name."),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        res = _call(ctx, lambda c: c.control(name, action), as_json)
        if as_json:
            emit_json(res)
        else:
            out.print(f"deployment {name}: {_status_style(res['status'])}")

    cmd.__doc__ = doc
    deployments_app.command(action)(connection_options(cmd))


_control_cmd("pause", "Stop starting devices; those in flight finish.")
_control_cmd("resume", "Continue a paused deployment; failed devices are tried again.")
_control_cmd("abort", "Stop for good; devices keep what they have.")
_control_cmd("rollback", "Send every device the deployment touched back to its previous model (signed).")

fleet_app.add_typer(models_app, name="models")
fleet_app.add_typer(deployments_app, name="deployments")


def register(app: typer.Typer) -> None:
    from .offline.cli import register as register_offline
    from .release_cli import releases_app

    register_offline(fleet_app)
    fleet_app.add_typer(releases_app, name="release")  # fleet/release_cli.py: per-board variants
    app.add_typer(fleet_app, name="fleet")
