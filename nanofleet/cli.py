"""The one `nanofleet` command. Each part owns its sub-commands; this module only mounts them.

Imports stay light at module level: a board has no torch, and `nanofleet device run` must start
without the build side installed.
"""

from __future__ import annotations

import typer

from . import __version__
from .bundle_cli import bundle_app, keygen


def _plain_option_types() -> None:
    """typer's rich help prints a type beside every option: `<bool>` on each flag (which takes no value)
    and `<list[str]>` on repeatable ones. Flags get none; repeatable options the item type (their help
    says they repeat)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        if self.is_flag:
            return None
        label = shown(self, ctx)  # type: ignore[arg-type]
        return label.replace("<list[", "<").replace("]>", ">") if label else label

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_plain_option_types()

app = typer.Typer(
    name="nanofleet",
    help="Small language models on fleets of single-board computers: export, serve, update, roll out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


app.command("keygen")(keygen)
app.add_typer(bundle_app, name="bundle")


def _mount() -> None:
    # Each part's CLI module imports only typer/rich at module level; heavy imports happen inside commands.
    try:
        from export.cli import register as register_export
    except ImportError:  # pragma: no cover - export/ is always in the distribution
        register_export = None
    if register_export:
        register_export(app)
    try:
        from device.cli import register as register_device
    except ImportError:  # pragma: no cover
        register_device = None
    if register_device:
        register_device(app)
    try:
        from fleet.cli import register as register_fleet
    except ImportError:  # pragma: no cover
        register_fleet = None
    if register_fleet:
        register_fleet(app)
    from .demo_cli import register as register_demo

    register_demo(app)


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
