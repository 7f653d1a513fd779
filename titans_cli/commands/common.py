"""Shared CLI plumbing: the error wrapper every command uses, common option types, result printing.

docs/conventions.md §4-§5: results go to stdout (`--json`: one JSON object), logs to stderr; a `TitansError` becomes
one stderr line and its exit code (1 runtime, 2 usage, 3 data); any other exception is `error: ...` with exit
1; the traceback only with `--debug`. Typer >= 0.26 vendors Click, only Typer exceptions pass through.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from titans_cli.backbone.config import ConfigError
from titans_cli.engine.errors import TitansError, UsageError
from titans_cli.engine.runs import json_safe

P = ParamSpec("P")
R = TypeVar("R")

# Option types shared by every command: `debug: Debug = False`, `json_out: JsonOut = False`, ...
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr; no logs, no progress.")]

# Set by the app callback (`titans --debug <command>`); a command's own `--debug` works too.
_GLOBAL = {"debug": False}


def set_global_debug(value: bool) -> None:
    """Record the app-level `--debug` flag (called by the Typer callback in `cli.py`)."""
    _GLOBAL["debug"] = value


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command: user errors become one stderr line and an exit code; tracebacks only with --debug.

    The wrapped function keeps its signature (`functools.wraps`), so Typer still sees its options. A keyword
    argument named `debug` (the `Debug` option) switches tracebacks on.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        debug = bool(kwargs.get("debug", False)) or _GLOBAL["debug"]
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise  # Typer's own control flow and usage errors: it prints them and picks the exit code
        except TitansError as err:
            _fail(str(err), err.exit_code, debug)
        except ConfigError as err:  # the backbone's ValueError for a [model] setting that cannot work (a usage error)
            _fail(str(err), UsageError.exit_code, debug)
        except KeyboardInterrupt:
            _fail("interrupted", 130, debug)
        except Exception as err:  # noqa: BLE001 - last resort: one line instead of a traceback
            _fail(f"{type(err).__name__}: {err}", 1, debug, hint=True)
        raise AssertionError("unreachable")  # _fail always raises

    return wrapper


def _fail(message: str, code: int, debug: bool, hint: bool = False) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    suffix = " (run with --debug for the traceback)" if hint and not debug else ""
    print(f"error: {first_line}{suffix}", file=sys.stderr)
    raise typer.Exit(code)


# A plain str option checked here, not a Literal: typer's own error for a bad Literal is a multi-line usage
# message before the command runs, and every error of titans is one line (docs/conventions.md §5).
def choice(value: str, options: tuple[str, ...], flag: str) -> str:
    """`value` if it is one of `options`, else a `UsageError` naming the flag and the choices."""
    if value not in options:
        raise UsageError(f"{flag} {value!r}: choose one of {', '.join(options)}")
    return value


# The command that serves each task's runs, for the hint when a run of another task is given.
COMMAND_FOR = {"dna": "titans classify", "forecast": "titans forecast"}  # other tasks: titans eval


def require_task(got: str, want: str, run: Path, command: str) -> None:
    """A `UsageError` unless the run's task `got` is `want`, naming the command that serves `got`."""
    if got != want:
        hint = COMMAND_FOR.get(got, "titans eval")
        raise UsageError(f"--run {run}: a {got!r} run, not a {want} run: {command} needs a {want} run (use `{hint}`)")


def log(message: str, quiet: bool = False) -> None:
    """A log line on stderr (never stdout, which carries results)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def emit_result(result: dict[str, Any], json_out: bool, human: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Print a command's result on stdout: one JSON object with `--json`, else readable `key: value` lines."""
    if json_out:
        # NaN and infinities become null: `json.dumps` would write bare NaN, which strict JSON parsers reject.
        print(json.dumps(json_safe(result), default=_json_default, allow_nan=False))
        return
    if human is not None:
        print(human(result))
        return
    for key, value in _flatten(result):
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list):
            value = json.dumps(value, default=_json_default)
        print(f"{key}: {value}")


def _flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    # Nested results (val/test metrics, sub-runs) read best as dotted keys: `test.accuracy: 0.98`.
    rows: list[tuple[str, Any]] = []
    for key, value in obj.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _json_default(value: Any) -> Any:
    # Paths and NumPy / torch scalars appear in results; anything else is a bug worth seeing.
    if hasattr(value, "item"):
        return value.item()
    return str(value)
