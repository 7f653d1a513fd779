"""`titans forecast`: forecast `horizon` steps past the end of a file with a trained forecast run.

Wiring only; the work is `tasks.forecast.forecast_file` (dated rows, original units from the stored scaler,
the memory read over the whole file with `--context all`) and `plot_forecast`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, choice, emit_result, log, require_task
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.runs import check_output_file, removed_on_failure

# What matplotlib's savefig writes by file name (the formats of its Agg backend used here).
PLOT_SUFFIXES = (".png", ".pdf", ".svg")

def forecast(
    run: Annotated[Path, typer.Option(help="A forecast run directory (or one of its .pt checkpoints).")],
    input_path: Annotated[
        Path, typer.Option("--input", help="CSV/Parquet laid out as the training data (wide or long), same columns.")
    ],
    out: Annotated[Path, typer.Option(help="Forecast table: .csv, .tsv or .parquet (series, cutoff, ds, h, y_pred).")],
    context: Annotated[
        str, typer.Option(help="window: the last lookback rows; all: read the whole file through the memory first.")
    ] = "window",
    plot: Annotated[Path | None, typer.Option(help="Also draw history and forecast per channel to this PNG.")] = None,
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Forecast past the last row of --input, with real future timestamps, in original units.

    Example: titans forecast --run runs/etth1/h96 --input data/ETTh1/ETTh1.csv --out forecast.csv --context all
    """
    from tasks import get_task
    from tasks.forecast import forecast_file
    from tasks.forecast_output import plot_forecast, write_table
    from titans_cli.engine.checkpoint import load_run
    from titans_cli.engine.runtime import resolve_device

    context = choice(context, ("window", "all"), "--context")
    choice(checkpoint, ("best", "last"), "--checkpoint")
    if out.suffix.lower() not in (".csv", ".tsv", ".parquet", ".pq"):
        raise UsageError(f"--out {out}: use a .csv, .tsv or .parquet file name")
    check_output_file(out, "--out", inputs={"--input": input_path})
    if plot is not None:
        if plot.suffix.lower() not in PLOT_SUFFIXES:
            raise UsageError(f"--plot {plot}: use a {', '.join(PLOT_SUFFIXES)} file name")
        check_output_file(plot, "--plot", inputs={"--input": input_path, "--out": out})
    if not input_path.is_file():
        raise DataError(f"--input {input_path}: file not found")
    loaded = load_run(run, which=checkpoint, device=resolve_device(device), get_task=get_task)
    require_task(loaded.task.name, "forecast", run, "forecast")
    table, history = forecast_file(loaded, input_path, context)  # type: ignore[arg-type]
    # Both files or neither: the plot is drawn to a staged name first, the table written, then the plot renamed.
    staged = plot.with_name(f".{plot.stem}.staged{plot.suffix}") if plot is not None else None
    with removed_on_failure(out.parent), removed_on_failure(plot.parent if plot else out.parent):
        try:
            if staged is not None:
                plot_forecast(history, table, loaded.meta, staged)
            write_table(table, out)
            if staged is not None:
                staged.replace(plot)  # type: ignore[arg-type]
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
    result = {
        "out": str(out),
        "rows": table.height,
        "series": loaded.meta["target_columns"],
        "horizon": loaded.meta["horizon"],
        "cutoff": str(table["cutoff"][0]),
        "first_ds": str(table["ds"][0]),
        "last_ds": str(table["ds"][-1]),
        "context_rows": history.height if context == "all" else loaded.meta["lookback"],
    }
    if plot is not None:
        result["plot"] = str(plot)
    log(f"read {result['context_rows']} rows of {input_path} (--context {context})", quiet)
    emit_result(result, json_out, _human)


def _human(r: dict) -> str:
    lines = [
        f"wrote {r['rows']} rows to {r['out']}: {len(r['series'])} series × {r['horizon']} steps",
        f"from {r['first_ds']} to {r['last_ds']} (cutoff {r['cutoff']}, context {r['context_rows']} rows)",
    ]
    if "plot" in r:
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)
