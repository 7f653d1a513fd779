"""Time-series recipe: a wide or long CSV/Parquet file → validated Parquet splits plus `manifest.json`.

Output files in `--out DIR`: `train.parquet`, `val.parquet`, `test.parquet` (the date column and one Float64
column per channel; disjoint rows, in file order) and `manifest.json` (columns, target, frequency, split
borders, scaler statistics fitted on the training rows only, input sha256). Validation and test windows borrow
their first `lookback` input rows from the preceding split (docs/design.md §6.2); the task rebuilds them from the
borders, so the splits do not depend on the lookback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl

from data_recipes import output
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.runs import atomic_write, sha256_file, write_json

Fill = Literal["error", "forward", "interpolate"]
Features = Literal["M", "S", "MS"]
Format = Literal["wide", "long"]

# ETT borders: 12/4/4 months of 30 days counted from row 0; rows after the test border are never used.
# Source: thuml/Time-Series-Library `data_provider/data_loader.py`, `Dataset_ETT_hour` (border1s/border2s)
# and `Dataset_ETT_minute` (the same borders × 4 steps per hour).
ETT_HOURLY_BORDERS = (12 * 30 * 24, (12 + 4) * 30 * 24, (12 + 4 + 4) * 30 * 24)  # 8640, 11520, 14400
ETT_MINUTE_BORDERS = tuple(4 * b for b in ETT_HOURLY_BORDERS)  # 34560, 46080, 57600
DEFAULT_RATIOS = (0.7, 0.1, 0.2)  # TSLib `Dataset_Custom`: int(0.7 N) train, int(0.2 N) test, rest val

SPLITS = ("train", "val", "test")
MANIFEST = output.MANIFEST

# Calendar steps that a fixed duration cannot express (months vary in length).
_CALENDAR_FREQS = ("1mo", "3mo", "1y")
# Duration units for a fixed step, largest first; polars offset strings.
_UNITS = (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000), ("us", 1))


@dataclass(frozen=True)
class SeriesFrame:
    """A validated, regular multivariate series: `frame` holds the date column then one Float64 column each."""

    frame: pl.DataFrame
    date_col: str
    channels: list[str]
    freq: str  # polars offset string, e.g. "1h", "15m", "1mo"
    filled: dict[str, int]  # missing values filled per channel (0 unless --fill forward|interpolate)


def _where(path: Path, row: int) -> str:
    """Name a data row so the user can find it: 1-based data row, plus the line number for CSV files."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return f"row {row + 1}"
    return f"row {row + 1} (line {row + 2})"


def _read_table(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes and suffixes[-1] in (".parquet", ".pq"):
            return pl.read_parquet(path)
        # Every CSV column is read as text so that casting below can name the first bad cell.
        return pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"{path}: cannot read the file ({str(err).splitlines()[0]})") from err


def _parse_dates(raw: pl.Series, path: Path, date_col: str) -> pl.Series:
    if raw.dtype == pl.Datetime:
        dates = raw
    elif raw.dtype == pl.Date:
        dates = raw.cast(pl.Datetime("us"))
    else:
        text = raw.cast(pl.String)
        try:
            dates = text.str.to_datetime(strict=False, time_unit="us")
        except pl.exceptions.PolarsError as err:
            first = text.drop_nulls().head(1).to_list()
            raise DataError(
                f"{path}: column {date_col!r}: cannot parse dates (first value {first[0] if first else None!r}); "
                "write them as ISO 8601, e.g. 2016-07-01 00:00:00"
            ) from err
    bad = dates.is_null()
    if bad.any():
        row = int(bad.arg_max())
        raise DataError(
            f"{path}: column {date_col!r}, {_where(path, row)}: unparsable date {raw[row]!r}; "
            "write dates as ISO 8601, e.g. 2016-07-01 00:00:00"
        )
    return dates.alias(date_col)


def _check_order(dates: pl.Series, path: Path, date_col: str, rows: list[int] | None = None) -> None:
    """Strictly increasing timestamps; `rows` maps positions back to file rows (long format)."""
    diff = dates.diff().slice(1)
    zero = diff.dt.total_microseconds() == 0
    back = diff.dt.total_microseconds() < 0
    for mask, what in ((zero, "duplicate timestamp"), (back, "timestamp goes backwards")):
        if mask.any():
            pos = int(mask.arg_max()) + 1
            row = rows[pos] if rows is not None else pos
            raise DataError(
                f"{path}: column {date_col!r}, {_where(path, row)}: {what} ({dates[pos]} after {dates[pos - 1]}); "
                "sort the file by date and remove duplicates"
            )


def infer_freq(dates: pl.Series, path: Path, date_col: str) -> str:
    """Return the series' step as a polars offset string; a `DataError` names the first irregular row."""
    if len(dates) < 2:
        raise DataError(f"{path}: column {date_col!r}: need at least 2 rows to infer the frequency")
    steps = dates.diff().slice(1).dt.total_microseconds()
    mode = int(steps.mode().sort()[0])
    if (steps == mode).all():
        for unit, size in _UNITS:
            if mode % size == 0:
                return f"{mode // size}{unit}"
    for freq in _CALENDAR_FREQS:  # monthly, quarterly, yearly data: fixed calendar offsets
        if (dates.slice(0, len(dates) - 1).dt.offset_by(freq) == dates.slice(1)).all():
            return freq
    row = int((steps != mode).arg_max()) + 1
    raise DataError(
        f"{path}: column {date_col!r}, {_where(path, row)}: irregular frequency: {dates[row]} is "
        f"{timedelta(microseconds=int(steps[row - 1]))} after the previous row, the usual step is "
        f"{timedelta(microseconds=mode)}; resample the file to a regular grid"
    )


def future_dates(last: datetime, freq: str, n: int) -> list[datetime]:
    """The `n` timestamps after `last` on the grid `freq` (a polars offset string such as "1h" or "1mo")."""
    count, unit = int("".join(c for c in freq if c.isdigit())), "".join(c for c in freq if not c.isdigit())
    offsets = [f"{count * h}{unit}" for h in range(1, n + 1)]
    base = pl.Series([last] * n)
    return pl.select(base.dt.offset_by(pl.Series(offsets))).to_series().to_list()


def _to_float(raw: pl.Series, path: Path) -> pl.Series:
    if raw.dtype.is_numeric():
        return raw.cast(pl.Float64)
    if raw.dtype != pl.String:
        raise DataError(f"{path}: column {raw.name!r} has type {raw.dtype}, expected numbers; drop or convert it")
    text = raw.str.strip_chars()
    values = text.cast(pl.Float64, strict=False)
    # Empty cells are missing values, not parse errors; any other text that does not parse is.
    bad = values.is_null() & text.is_not_null() & (text != "")
    if bad.any():
        row = int(bad.arg_max())
        raise DataError(
            f"{path}: column {raw.name!r}, {_where(path, row)}: non-numeric value {raw[row]!r}; "
            "fix the cell or drop the column"
        )
    return values


# The model computes in float32: a value beyond its range (or inf) cannot be scaled or fed to it; inf would also
# turn the scaler's mean and std into NaN, which the manifest could only store as null.
_FLOAT32_MAX = 3.4028234663852886e38


def _check_range(values: pl.Series, path: Path) -> None:
    bad = values.is_not_null() & values.is_not_nan() & (values.abs() > _FLOAT32_MAX)
    if bad.any():
        row = int(bad.arg_max())
        raise DataError(
            f"{path}: column {values.name!r}, {_where(path, row)}: value {values[row]!r} is outside the float32 "
            "range the model computes in (|x| <= 3.4e38); fix the cell or rescale the column"
        )


def _fill(values: pl.Series, path: Path, fill: Fill, fill_hint: bool = False) -> tuple[pl.Series, int]:
    _check_range(values, path)
    missing = values.is_null() | values.is_nan()
    n_missing = int(missing.sum())
    if n_missing == 0:
        return values, 0
    first = int(missing.arg_max())
    if fill == "error":
        raise DataError(
            f"{path}: column {values.name!r}, {_where(path, first)}: missing value ({n_missing} in the column); "
            + ("fix the file or pass --fill forward|interpolate" if fill_hint else "fill or drop those rows first")
        )
    clean = values.fill_nan(None)
    filled = clean.fill_null(strategy="forward") if fill == "forward" else clean.interpolate()
    left = filled.is_null()
    if left.any():
        row = int(left.arg_max())
        where = "at the start" if fill == "forward" else "at the start or end"
        raise DataError(
            f"{path}: column {values.name!r}, {_where(path, row)}: missing value {where} cannot be filled "
            f"with --fill {fill}; trim those rows"
        )
    return filled, n_missing


def _long_to_wide(table: pl.DataFrame, path: Path, date_col: str, id_col: str, value_col: str) -> pl.DataFrame:
    """Pivot `unique_id, ds, y` into one column per series, checking each series' order on the way."""
    for col in (id_col, date_col, value_col):
        if col not in table.columns:
            raise DataError(f"{path}: long format needs column {col!r}; found {table.columns}")
    table = table.with_row_index("__row").with_columns(_parse_dates(table[date_col], path, date_col))
    ids = table[id_col].cast(pl.String).unique(maintain_order=True).to_list()
    for _, part in table.group_by(id_col, maintain_order=True):
        _check_order(part[date_col], path, date_col, rows=part["__row"].to_list())
    values = _to_float(table[value_col], path).alias(value_col)
    table = table.with_columns(values, pl.col(id_col).cast(pl.String))
    wide = table.pivot(on=id_col, index=date_col, values=value_col, aggregate_function=None).sort(date_col)
    return wide.select(date_col, *ids)


def read_series(
    path: Path,
    *,
    fmt: Format = "wide",
    date_col: str | None = None,
    id_col: str = "unique_id",
    value_col: str = "y",
    columns: list[str] | None = None,
    fill: Fill = "error",
    fill_hint: bool = False,
) -> SeriesFrame:
    """Read and validate a series file: dates parse, strictly increase on a regular grid, values are numbers.

    Args:
        path: wide CSV/Parquet (a date column and one column per channel) or long `unique_id, ds, y`.
        fmt: "wide" or "long".
        date_col: the date column; default "date" (wide) or "ds" (long).
        columns: keep exactly these channels in this order (a `DataError` names a missing one); default all.
        fill: what to do with missing values: "error" (default), "forward" or "interpolate".
        fill_hint: a missing-value error suggests `--fill` (only `titans prepare timeseries` has that option).

    Returns:
        A `SeriesFrame` whose frame has the date column then one Float64 column per channel.
    """
    path = Path(path)
    date_col = date_col or ("ds" if fmt == "long" else "date")
    table = _read_table(path)
    if fmt == "long":
        table = _long_to_wide(table, path, date_col, id_col, value_col)
    elif date_col not in table.columns:
        if len(table.columns) == 1 and any(d in table.columns[0] for d in ";\t|"):
            raise DataError(
                f"{path}: one column {table.columns[0]!r}: the file is not comma-separated; "
                "titans reads comma-separated CSV, convert it (e.g. tr ';' ',')"
            )
        raise DataError(f"{path}: no date column {date_col!r} (columns: {table.columns}); pass --date-col")
    channels = [c for c in table.columns if c != date_col]
    if columns is not None:
        missing = [c for c in columns if c not in channels]
        if missing:
            raise DataError(f"{path}: column {missing[0]!r} is missing; the model was trained on {columns}")
        channels = list(columns)
    if not channels:
        raise DataError(f"{path}: no value columns besides {date_col!r}")
    if table.height == 0:
        raise DataError(f"{path}: the file has no data rows")
    dates = _parse_dates(table[date_col], path, date_col)
    if fmt == "wide":
        _check_order(dates, path, date_col)
    freq = infer_freq(dates, path, date_col)
    out, filled = [dates], {}
    for name in channels:
        values, n = _fill(_to_float(table[name], path), path, fill, fill_hint)
        out.append(values.alias(name))
        filled[name] = n
    return SeriesFrame(pl.DataFrame(out), date_col, channels, freq, filled)


def split_borders(n_rows: int, rule: str, path: Path | None = None) -> dict[str, list[int]]:
    """Row borders `[start, end)` of train/val/test for a split rule (rows after the test border are unused).

    Rules: "ett-hourly" / "ett-minute" (12/4/4 months, TSLib) and "ratio:a,b,c" (chronological; test and train
    sizes are int(c N) and int(a N), validation takes the rest, as TSLib's `Dataset_Custom`).
    """
    where = f"{path}: " if path else ""
    if rule in ("ett-hourly", "ett-minute"):
        b1, b2, b3 = ETT_HOURLY_BORDERS if rule == "ett-hourly" else ETT_MINUTE_BORDERS
        if n_rows < b3:
            raise DataError(f"{where}--split {rule} needs {b3} rows, the file has {n_rows}; use --split ratio:...")
        return {"train": [0, b1], "val": [b1, b2], "test": [b2, b3]}
    if rule.startswith("ratio:"):
        try:
            ratios = [float(x) for x in rule.removeprefix("ratio:").split(",")]
        except ValueError:
            ratios = []
        if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
            raise UsageError(f"--split {rule!r}: expected ratio:TRAIN,VAL,TEST, three positive numbers summing to 1")
        n_train, n_test = int(ratios[0] * n_rows), int(ratios[2] * n_rows)
        return {"train": [0, n_train], "val": [n_train, n_rows - n_test], "test": [n_rows - n_test, n_rows]}
    raise UsageError(f"--split {rule!r}: choose ett-hourly, ett-minute or ratio:TRAIN,VAL,TEST")


def window_counts(borders: dict[str, list[int]], lookback: int, horizon: int) -> dict[str, int]:
    """Sliding windows (stride 1) per split; val/test inputs start `lookback` rows before their border."""
    counts = {}
    for name in SPLITS:
        start, end = borders[name]
        first_input = start if name == "train" else start - lookback
        counts[name] = max(0, end - first_input - lookback - horizon + 1)
    return counts


def fit_scaler(frame: pl.DataFrame, channels: list[str], rows: list[int]) -> dict[str, Any]:
    """Per-channel mean and population std (StandardScaler, ddof 0) over `rows = [start, end)` only.

    A constant channel gets std 1 (as scikit-learn does) and is listed under `constant`.
    """
    train = frame.slice(rows[0], rows[1] - rows[0])
    mean = {c: float(train[c].mean()) for c in channels}
    std = {c: float(train[c].std(ddof=0)) for c in channels}
    for c in channels:  # squares of values near the float32 limit overflow float64 in the std
        if not (math.isfinite(mean[c]) and math.isfinite(std[c])):
            raise DataError(f"column {c!r}: mean or std over the training rows is not finite; rescale the column")
    constant = [c for c in channels if not std[c] > 0]
    for c in constant:
        std[c] = 1.0
    return {"kind": "standard", "fit_rows": list(rows), "mean": mean, "std": std, "constant": constant}


def select_features(channels: list[str], features: Features, target: str | None, path: Path) -> tuple:
    """Input and target channels for M (all → all), S (target → target) and MS (all → target)."""
    target = target or channels[-1]
    if target not in channels:
        raise DataError(f"{path}: --target {target!r} is not a column; choose one of {channels}")
    if features == "M":
        return list(channels), list(channels), target
    if features == "S":
        return [target], [target], target
    if features == "MS":
        return list(channels), [target], target
    raise UsageError(f"--features {features!r}: choose M, S or MS")


def prepare(
    input_path: Path,
    out_dir: Path,
    *,
    fmt: Format = "wide",
    date_col: str | None = None,
    id_col: str = "unique_id",
    features: Features = "M",
    target: str | None = None,
    split: str = "ratio:0.7,0.1,0.2",
    fill: Fill = "error",
    lookback: int = 96,
    horizon: int = 96,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validate `input_path`, split it chronologically and write Parquet splits plus `manifest.json`.

    `lookback` and `horizon` only check that every split holds at least one window (and are recorded with
    those counts); the task picks its own lookback and horizon at training time.

    Returns:
        The manifest (also written to `out_dir/manifest.json`, last, so a folder with a manifest is complete).
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    if lookback < 1 or horizon < 1:
        raise UsageError("--lookback and --horizon must be at least 1")
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise UsageError(f"{out_dir} already holds prepared data; pass --overwrite or choose another --out")
    series = read_series(input_path, fmt=fmt, date_col=date_col, id_col=id_col, fill=fill, fill_hint=True)
    inputs, targets, target = select_features(series.channels, features, target, input_path)
    used = list(dict.fromkeys(inputs + targets))
    n_rows = series.frame.height
    borders = split_borders(n_rows, split, input_path)
    counts = window_counts(borders, lookback, horizon)
    for name in SPLITS:
        if counts[name] < 1:
            rows = borders[name][1] - borders[name][0]
            raise DataError(
                f"{input_path}: too few rows for the splits: {name} has {rows} rows, no window of lookback "
                f"{lookback} + horizon {horizon} fits ({n_rows} rows in all); use a longer file or smaller values"
            )
    frame = series.frame.select(series.date_col, *used)
    scaler = fit_scaler(frame, used, borders["train"])
    out_dir.mkdir(parents=True, exist_ok=True)
    dates = frame[series.date_col]
    for name in SPLITS:
        start, end = borders[name]
        atomic_write(out_dir / f"{name}.parquet", frame.slice(start, end - start).write_parquet)
    manifest = {
        "recipe": "timeseries",
        "version": 1,
        "input": {
            "file": input_path.name,
            "sha256": sha256_file(input_path),
            "format": fmt,
            "id_col": id_col if fmt == "long" else None,
            "rows": n_rows,
        },
        "date_col": series.date_col,
        "freq": series.freq,
        "columns": used,
        "features": features,
        "target": target,
        "input_columns": inputs,
        "target_columns": targets,
        "fill": fill,
        "filled": {c: series.filled[c] for c in used},
        "split": {
            "rule": split,
            "borders": borders,
            "unused_rows": n_rows - borders["test"][1],
            "dates": {n: [str(dates[b[0]]), str(dates[b[1] - 1])] for n, b in borders.items()},
            "note": "val/test windows take their first lookback input rows from the preceding split",
            "windows": {"lookback": lookback, "horizon": horizon, **counts},
        },
        "scaler": scaler,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """Load `manifest.json` from a prepared folder; a `DataError` says how to create one."""
    return output.read_manifest(data_dir, "timeseries", f"titans prepare timeseries --input FILE --out {data_dir}")


def load_splits(data_dir: Path, manifest: dict[str, Any]) -> dict[str, pl.DataFrame]:
    """Read the three Parquet splits, checking that their columns and row counts match the manifest."""
    out = {}
    for name in SPLITS:
        path = Path(data_dir) / f"{name}.parquet"
        if not path.exists():
            raise DataError(f"{path}: not found; prepare the data again")
        frame = pl.read_parquet(path)
        missing = [c for c in [manifest["date_col"], *manifest["columns"]] if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: column {missing[0]!r} is missing; prepare the data again")
        start, end = manifest["split"]["borders"][name]
        if frame.height != end - start:
            raise DataError(f"{path}: {frame.height} rows, the manifest says {end - start}; prepare the data again")
        out[name] = frame
    return out
