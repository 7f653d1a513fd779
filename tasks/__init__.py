"""Task plugins and their lazy registry.

`TASKS` maps a task name (the `--task` value) to "module:ATTRIBUTE" of a `titans_cli.engine.task.Task` object.
Entries are imported only when asked for, so `titans --help` never imports torch-heavy task modules. `get_task` is
the lookup that the engine receives (`load_run(..., get_task=get_task)`): the engine never imports this package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from titans_cli.engine.errors import UsageError
from titans_cli.engine.task import Task

# One line per task. Add yours here.
TASKS: dict[str, str] = {
    # "name": "tasks.<module>:<ATTRIBUTE>",
    "recall": "tasks.recall:TASK",
    "forecast": "tasks.forecast:TASK",
    "dna": "tasks.dna:TASK",
    "dna-lm": "tasks.dna_lm:TASK",
}


# Tasks whose `titans eval` report reads better as tables than as key: value lines: "module:FUNCTION" of a
# function from the report (as `evaluate_run` returns it) to text.
REPORT_FORMATS: dict[str, str] = {
    "forecast": "tasks.forecast_output:format_report",
}


def get_task(name: str) -> Task:
    """Return the task registered as `name`; a `UsageError` lists the known names otherwise."""
    if name not in TASKS:
        known = ", ".join(sorted(TASKS)) or "(none registered)"
        raise UsageError(f"unknown task {name!r}: choose one of {known}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def report_format(name: str) -> Callable[[dict[str, Any]], str] | None:
    """The human-readable form of task `name`'s eval report, or None for the default key: value lines."""
    if name not in REPORT_FORMATS:
        return None
    module, attr = REPORT_FORMATS[name].split(":")
    return getattr(importlib.import_module(module), attr)
