"""The `titans` Typer app: registers every command; each command's wiring lives in `titans_cli/commands/`.

Commands: prepare <recipe>, train, eval, forecast, classify (docs/conventions.md §1). Heavy imports (torch, polars)
happen inside the commands, so `titans --help` stays fast.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated

import typer

from titans_cli import __version__
from titans_cli.commands.common import handle_errors, set_global_debug
from titans_cli.commands.prepare import prepare_app

app = typer.Typer(
    name="titans",
    help="Train and evaluate Titans (neural long-term memory) models on genomics and time series.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # errors are one line (commands.common.handle_errors); --debug for more
    epilog="Example: titans prepare recall --out data/recall && titans train --task recall --data data/recall "
    "--out runs/recall --preset recall_tiny && titans eval --run runs/recall --json",
)


def _version(value: bool) -> None:
    if value:
        print(f"titans {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for every command.")] = False,
) -> None:
    """Titans toolkit: prepare data, train, evaluate, forecast, classify."""
    set_global_debug(debug)


def _register(target: typer.Typer, name: str, spec: str) -> None:
    """Register `module:function` as subcommand `name` of `target`, wrapped in `handle_errors`.

    The wrapper turns `TitansError` into one stderr line and its exit code even if the command forgot to use
    it (wrapping twice is harmless).
    """
    module, attr = spec.split(":")
    fn = getattr(importlib.import_module(module), attr)
    help_text, example = _split_example(fn.__doc__ or "")
    target.command(name, help=help_text, epilog=example)(handle_errors(fn))


def _split_example(doc: str) -> tuple[str, str | None]:
    """Move the docstring's `Example: ...` paragraph to the epilog, so every `--help` ends with it."""
    text = inspect.cleandoc(doc)
    head, sep, example = text.partition("Example:")
    return (head.strip(), "Example: " + " ".join(example.split())) if sep else (text, None)


# ---- command registrations: one line per command; add yours here ---------------------------------------
_register(app, "train", "titans_cli.commands.train:train")
_register(app, "eval", "titans_cli.commands.eval:eval_command")
_register(app, "forecast", "titans_cli.commands.forecast:forecast")
_register(app, "classify", "titans_cli.commands.classify:classify")

# ---- `titans prepare <recipe>` registrations: one line per recipe; add yours here -----------------------
_register(prepare_app, "recall", "titans_cli.commands.prepare_recall:recall")
_register(prepare_app, "timeseries", "titans_cli.commands.prepare_timeseries:timeseries")
_register(prepare_app, "dna", "titans_cli.commands.prepare_dna:prepare_dna")

app.add_typer(prepare_app, name="prepare")
