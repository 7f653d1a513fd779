"""`titans eval`: metrics of a run's best checkpoint on a split (every sub-run plus their summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, emit_result
from titans_cli.engine.errors import UsageError


def eval_command(
    run: Annotated[Path, typer.Option(help="Run directory written by `titans train` (or a .pt checkpoint).")],
    data: Annotated[Path | None, typer.Option(help="Prepared data directory (default: the run's run.data).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate: test or val.")] = "test",
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size (0: the run's).")] = 0,
    opt: Annotated[
        list[str] | None, typer.Option(help="Task-specific option key=value for the task's eval report.")
    ] = None,
    season_length: Annotated[
        int | None, typer.Option(help="forecast: season length m for MASE and the seasonal-naive reference.")
    ] = None,  # forecast: same as --opt season_length=M
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Evaluate a trained run on its test (or val) split and print the metrics.

    Example: titans eval --run runs/recall-mac --json
    """
    from tasks import get_task, report_format
    from titans_cli.engine.evaluate import evaluate_run

    opts: dict[str, str] = {}
    for item in opt or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--opt {item!r}: expected key=value")
        opts[key.strip()] = value.strip()
    if season_length is not None:  # forecast
        opts["season_length"] = str(season_length)
    result = evaluate_run(
        run, split=split, data_dir=data, which=checkpoint, device=device, batch_size=batch_size, opts=opts,
        get_task=get_task,
    )
    first = next(iter(result.get("sub_runs", {}).values()), result)
    emit_result(result, json_out, report_format(str(first.get("task", ""))))
