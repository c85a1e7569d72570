"""The `locaudit` command: one sub-command per step of the data's way.

Each sub-command lives in its own module (cli/<name>.py) exposing `register(app)`.
"""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(
    name="locaudit",
    help=(
        "How much evidence does an edit give that a behaviour is localized in an LLM?\n\n"
        "Typical flow: collect head activations -> probe them -> edit at head sets (ITI or optimal) -> "
        "evaluate -> run a whole study and read its report.\n\n"
        "Example: locaudit run studies/quickstart.yaml --out runs/quickstart"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = ("collect", "probe", "localize_cmd", "iti", "edit", "evaluate_cmd", "judge", "run", "report", "pack", "export", "hase",
            "data")


def _register_all() -> None:
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"locaudit.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"locaudit.cli.{name}":
                continue
            raise
        module.register(app)


_register_all()


def _version(show: bool) -> None:
    if show:
        import platform

        import locaudit

        typer.echo(f"locaudit {locaudit.__version__} (Python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print locaudit's version and exit.")) -> None:
    """How much evidence does an edit give that a behaviour is localized in an LLM?"""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from locaudit.errors import LocauditError

    try:
        app()
    except LocauditError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2)
    except OSError as e:  # a read-only folder, a file where a folder is expected, a full disk: one line
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{e.strerror or e}", err=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
