"""`titans prepare timeseries`: a wide or long CSV/Parquet file → validated Parquet splits plus manifest.json.

Wiring only; the pipeline is `data_recipes/timeseries.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, choice, emit_result, log


def timeseries(
    input_path: Annotated[Path, typer.Option("--input", help="Wide or long CSV/Parquet file with a date column.")],
    out: Annotated[Path, typer.Option(help="Output directory for the Parquet splits and manifest.json.")],
    fmt: Annotated[str, typer.Option("--format", help="wide (date + one column per channel) or long.")] = "wide",
    date_col: Annotated[
        str | None, typer.Option(help="Date column (default: date for wide files, ds for long files).")
    ] = None,
    id_col: Annotated[str, typer.Option(help="Series id column of the long format (values in y).")] = "unique_id",
    features: Annotated[str, typer.Option(help="M (all → all), S (target → target), MS (all → target).")] = "M",
    target: Annotated[str | None, typer.Option(help="Target column for S / MS (default: the last column).")] = None,
    split: Annotated[
        str, typer.Option(help="ett-hourly, ett-minute (12/4/4 months) or ratio:TRAIN,VAL,TEST.")
    ] = "ratio:0.7,0.1,0.2",
    fill: Annotated[str, typer.Option(help="Missing values: error, forward or interpolate.")] = "error",
    lookback: Annotated[int, typer.Option(help="Only checks that every split holds a window.")] = 96,
    horizon: Annotated[int, typer.Option(help="Only checks that every split holds a window.")] = 96,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace prepared data in --out.")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Validate a time-series file, split it chronologically and fit the scaler on the training rows only.

    Example: titans prepare timeseries --input data/ETTh1/ETTh1.csv --split ett-hourly --out prepared/etth1
    """
    from data_recipes.output import staged_dir
    from data_recipes.timeseries import prepare

    fmt = choice(fmt, ("wide", "long"), "--format")
    features = choice(features, ("M", "S", "MS"), "--features")
    fill = choice(fill, ("error", "forward", "interpolate"), "--fill")
    with staged_dir(out, overwrite) as stage:
        manifest = prepare(
            input_path, stage, fmt=fmt, date_col=date_col, id_col=id_col, features=features, target=target,  # type: ignore[arg-type]
            split=split, fill=fill, lookback=lookback, horizon=horizon,  # type: ignore[arg-type]
        )  # fmt: skip
    filled = sum(manifest["filled"].values())
    if filled:
        log(f"filled {filled} missing values with --fill {fill}", quiet)
    if manifest["scaler"]["constant"]:
        log(f"constant in the training rows (std set to 1): {manifest['scaler']['constant']}", quiet)
    emit_result(_result(out, manifest), json_out, _human)


def _result(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    borders = manifest["split"]["borders"]
    return {
        "out": str(out),
        "rows": {name: end - start for name, (start, end) in borders.items()},
        "unused_rows": manifest["split"]["unused_rows"],
        "windows": manifest["split"]["windows"],
        "freq": manifest["freq"],
        "features": manifest["features"],
        "input_columns": manifest["input_columns"],
        "target_columns": manifest["target_columns"],
        "sha256": manifest["input"]["sha256"],
    }


def _human(r: dict[str, Any]) -> str:
    w = r["windows"]
    return "\n".join(
        [
            f"prepared {r['out']}  (freq {r['freq']}, features {r['features']})",
            f"rows     train {r['rows']['train']}  val {r['rows']['val']}  test {r['rows']['test']}"
            f"  unused {r['unused_rows']}",
            f"windows  train {w['train']}  val {w['val']}  test {w['test']}"
            f"  (lookback {w['lookback']}, horizon {w['horizon']})",
            f"inputs   {', '.join(r['input_columns'])}",
            f"targets  {', '.join(r['target_columns'])}",
        ]
    )
