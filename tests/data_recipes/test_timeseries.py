"""`titans prepare timeseries` recipe: ETT borders and window counts, train-only scaler, every validation error."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data_recipes import timeseries as ts
from tests.fixtures.timeseries import ETTH1, ett_lines, write_ett_slice
from titans_cli.engine.errors import DataError, UsageError


@pytest.fixture(scope="module")
def etth1_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("etth1")
    return out, ts.prepare(ETTH1, out, split="ett-hourly")


def test_ett_hourly_borders_and_window_counts_match_the_protocol(etth1_prepared):
    out, manifest = etth1_prepared
    split = manifest["split"]
    assert split["borders"] == {"train": [0, 8640], "val": [8640, 11520], "test": [11520, 14400]}
    assert split["unused_rows"] == 17420 - 14400
    assert split["windows"] == {"lookback": 96, "horizon": 96, "train": 8449, "val": 2785, "test": 2785}
    assert split["dates"]["val"] == ["2017-06-26 00:00:00", "2017-10-23 23:00:00"]
    assert manifest["freq"] == "1h"
    assert manifest["columns"] == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert manifest["target"] == "OT"
    assert manifest["input"]["sha256"].startswith("f18de3ad269cef59")
    # The written splits are disjoint and hold exactly the bordered rows, values unchanged.
    val = pl.read_parquet(out / "val.parquet")
    assert val.height == 2880
    raw = pl.read_csv(ETTH1)
    assert val["OT"][0] == raw["OT"][8640] and str(val["date"][0]) == "2017-06-26 00:00:00"
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_window_counts_follow_the_lookback_and_horizon():
    borders = ts.split_borders(14400, "ett-hourly")
    assert ts.window_counts(borders, 96, 720) == {"train": 8640 - 96 - 720 + 1, "val": 2161, "test": 2161}
    assert ts.ETT_MINUTE_BORDERS == (34560, 46080, 57600)
    assert ts.window_counts(ts.split_borders(69680, "ett-minute"), 96, 96) == {
        "train": 34465 - 96,
        "val": 11521 - 96,
        "test": 11521 - 96,
    }


def test_ratio_split_sizes_follow_tslib():
    assert ts.split_borders(100, "ratio:0.7,0.1,0.2") == {"train": [0, 70], "val": [70, 80], "test": [80, 100]}
    # int(0.7 N) train, int(0.2 N) test, validation takes the rest (Weather: 52,696 rows).
    b = ts.split_borders(52696, "ratio:0.7,0.1,0.2")
    assert (b["train"][1], b["val"][1] - b["val"][0], b["test"][1] - b["test"][0]) == (36887, 5270, 10539)
    for bad in ("ratio:0.7,0.3", "ratio:0.5,0.5,0.5", "ratio:a,b,c", "weekly"):
        with pytest.raises(UsageError, match="--split"):
            ts.split_borders(100, bad)


def test_scaler_is_fit_on_training_rows_only(etth1_prepared, tmp_path):
    _, manifest = etth1_prepared
    raw = pl.read_csv(ETTH1)["OT"].to_numpy()[:8640]
    assert manifest["scaler"]["fit_rows"] == [0, 8640]
    assert manifest["scaler"]["mean"]["OT"] == pytest.approx(raw.mean(), rel=1e-12)
    assert manifest["scaler"]["std"]["OT"] == pytest.approx(raw.std(ddof=0), rel=1e-12)
    # Change every test row: the statistics stay identical, the input hash does not.
    lines = ETTH1.read_text().splitlines()
    changed = lines[: 1 + 11520] + [",".join([r.split(",")[0]] + ["999.0"] * 7) for r in lines[1 + 11520 :]]
    path = tmp_path / "changed.csv"
    path.write_text("\n".join(changed) + "\n")
    other = ts.prepare(path, tmp_path / "out", split="ett-hourly")
    assert other["scaler"] == manifest["scaler"]
    assert other["input"]["sha256"] != manifest["input"]["sha256"]


def test_constant_training_channel_gets_unit_std(tmp_path):
    path = tmp_path / "c.csv"
    rows = [f"2020-01-01 {h:02d}:00:00,{h},5.0" for h in range(24)]
    path.write_text("date,a,b\n" + "\n".join(rows) + "\n")
    manifest = ts.prepare(path, tmp_path / "out", lookback=4, horizon=2)
    assert manifest["scaler"]["std"]["b"] == 1.0 and manifest["scaler"]["constant"] == ["b"]


def test_features_select_inputs_and_targets(tmp_path):
    src = write_ett_slice(tmp_path / "s.csv", 400)
    s = ts.prepare(src, tmp_path / "S", features="S", lookback=24, horizon=12)
    assert (s["input_columns"], s["target_columns"]) == (["OT"], ["OT"])
    assert pl.read_parquet(tmp_path / "S" / "train.parquet").columns == ["date", "OT"]
    ms = ts.prepare(src, tmp_path / "MS", features="MS", target="HUFL", lookback=24, horizon=12)
    assert ms["target_columns"] == ["HUFL"] and len(ms["input_columns"]) == 7
    with pytest.raises(DataError, match="--target 'XX'"):
        ts.prepare(src, tmp_path / "bad", target="XX", lookback=24, horizon=12)


def test_long_format_pivots_to_the_same_series(tmp_path):
    src = write_ett_slice(tmp_path / "w.csv", 300)
    wide = pl.read_csv(src)
    long = wide.unpivot(index="date", variable_name="unique_id", value_name="y").rename({"date": "ds"})
    long.write_csv(tmp_path / "long.csv")
    a = ts.read_series(src)
    b = ts.read_series(tmp_path / "long.csv", fmt="long")
    assert b.channels == a.channels and b.freq == "1h"
    assert b.frame.rename({"ds": "date"}).equals(a.frame)
    dup = pl.concat([long.head(2), long.slice(1, 1), long.slice(2)])  # series HUFL repeats its 2nd timestamp
    dup.write_csv(tmp_path / "dup.csv")
    with pytest.raises(DataError, match=r"dup.csv: column 'ds', row 3 \(line 4\): duplicate timestamp"):
        ts.read_series(tmp_path / "dup.csv", fmt="long")


def test_parquet_input_with_native_datetimes(tmp_path):
    src = write_ett_slice(tmp_path / "w.csv", 200)
    frame = pl.read_csv(src, try_parse_dates=True)
    frame.write_parquet(tmp_path / "w.parquet")
    series = ts.read_series(tmp_path / "w.parquet")
    assert series.freq == "1h" and series.frame.height == 200


def _csv(tmp_path: Path, rows: list[str], name: str = "bad.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.__setitem__(5, "not-a-date" + r[5][19:]), r"column 'date', row 5 \(line 6\): unparsable date"),
        (lambda r: r.__setitem__(5, r[4]), r"row 5 \(line 6\): duplicate timestamp"),
        (lambda r: r.__setitem__(5, r[3]), r"row 5 \(line 6\): timestamp goes backwards"),
        (lambda r: r.pop(6), r"row 6 \(line 7\): irregular frequency: .* 2:00:00 after the previous row"),
        (lambda r: r.__setitem__(7, r[7].replace(r[7].split(",")[3], "n/a")), r"column 'MUFL', row 7 .*'n/a'"),
        (lambda r: r.__setitem__(8, r[8].replace(r[8].split(",")[7], "")), r"column 'OT', row 8 .*missing value"),
    ],
)
def test_validation_errors_name_file_column_and_first_bad_row(tmp_path, edit, message):
    lines = ett_lines(60)
    edit(lines)
    with pytest.raises(DataError, match=message):
        ts.prepare(_csv(tmp_path, lines), tmp_path / "out", lookback=8, horizon=4)


def test_missing_values_fill_forward_and_interpolate(tmp_path):
    rows = ["date,a"] + [f"2020-01-01 {h:02d}:00:00,{v}" for h, v in enumerate(["1", "", "3", "NaN", "5", "6"])]
    path = _csv(tmp_path, rows, "m.csv")
    assert ts.read_series(path, fill="forward").frame["a"].to_list() == [1, 1, 3, 3, 5, 6]
    interp = ts.read_series(path, fill="interpolate")
    assert interp.frame["a"].to_list() == [1, 2, 3, 4, 5, 6] and interp.filled == {"a": 2}
    with pytest.raises(DataError, match=r"column 'a', row 2 \(line 3\): missing value \(2 in the column\)"):
        ts.read_series(path)
    lead = _csv(tmp_path, ["date,a", "2020-01-01 00:00:00,", "2020-01-01 01:00:00,2"], "lead.csv")
    with pytest.raises(DataError, match="row 1 .*at the start cannot be filled with --fill forward"):
        ts.read_series(lead, fill="forward")


def test_too_few_rows_and_other_input_errors(tmp_path):
    src = write_ett_slice(tmp_path / "s.csv", 100)
    with pytest.raises(DataError, match="too few rows for the splits: val has 10 rows"):
        ts.prepare(src, tmp_path / "o", lookback=24, horizon=12)
    with pytest.raises(DataError, match="--split ett-hourly needs 14400 rows, the file has 100"):
        ts.prepare(src, tmp_path / "o", split="ett-hourly")
    with pytest.raises(DataError, match="no date column 'time'"):
        ts.read_series(src, date_col="time")
    with pytest.raises(DataError, match="file not found"):
        ts.read_series(tmp_path / "nope.csv")
    ts.prepare(src, tmp_path / "ok", lookback=4, horizon=2)
    with pytest.raises(UsageError, match="already holds prepared data; pass --overwrite"):
        ts.prepare(src, tmp_path / "ok", lookback=4, horizon=2)
    with pytest.raises(DataError, match="manifest.json: missing; prepare the data with `titans prepare timeseries"):
        ts.read_manifest(tmp_path)


def test_future_dates_continue_the_inferred_frequency(tmp_path):
    assert ts.future_dates(datetime(2018, 6, 26, 19), "1h", 3) == [
        datetime(2018, 6, 26, 20),
        datetime(2018, 6, 26, 21),
        datetime(2018, 6, 26, 22),
    ]
    assert ts.future_dates(datetime(2018, 12, 31, 23, 45), "15m", 2) == [
        datetime(2019, 1, 1, 0, 0),
        datetime(2019, 1, 1, 0, 15),
    ]
    assert ts.future_dates(datetime(2020, 1, 1), "1mo", 2) == [datetime(2020, 2, 1), datetime(2020, 3, 1)]
    months = _csv(tmp_path, ["date,a"] + [f"2020-{m:02d}-01,{m}" for m in range(1, 13)], "months.csv")
    assert ts.read_series(months).freq == "1mo"
    daily = _csv(tmp_path, ["date,a"] + [f"2020-01-{d:02d},{d}" for d in range(1, 10)], "daily.csv")
    assert ts.read_series(daily).freq == "1d"
    assert np.isclose(ts.read_series(daily).frame["a"].sum(), 45)
