"""CLI round trip for forecasting on a real ETTh1 slice: prepare → train → eval → forecast; exit codes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from tests.fixtures.timeseries import ett_lines, write_ett_slice
from titans_cli.cli import app

runner = CliRunner()


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_fc")
    src = write_ett_slice(root / "slice.csv", 400)
    prep = root / "prep"
    res = invoke("prepare", "timeseries", "--input", src, "--out", prep, "--lookback", 24, "--horizon", 12, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["windows"] == {"lookback": 24, "horizon": 12, "train": 245, "val": 29, "test": 69}
    run = root / "run"
    res = invoke(
        "train", "--task", "forecast", "--preset", "forecast_tiny", "--data", prep, "--out", run, "--max-steps", 2, "-q"
    )
    assert res.exit_code == 0, res.output
    return {"src": src, "prep": prep, "run": run, "root": root}


def test_eval_reports_model_and_references_in_both_units(trained):
    res = invoke("eval", "--run", trained["run"], "--opt", "season_length=24", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report) >= {"model", "naive", "seasonal_naive"}
    model = report["model"]
    assert model["windows"] == 69 and {"mse_norm", "mae_norm", "mse", "mae", "mase"} <= set(model)
    assert len(model["per_step"]["mse_norm"]) == 12 and set(model["per_channel"]) == set(ett_lines(0)[0].split(",")[1:])
    res = invoke("eval", "--run", trained["run"], "--opt", "colour=red")
    assert res.exit_code == 2 and "unknown for forecast" in res.stderr


def test_forecast_continues_the_file_in_original_units(trained):
    out, png = trained["root"] / "fc.csv", trained["root"] / "fc.png"
    res = invoke("forecast", "--run", trained["run"], "--input", trained["src"], "--out", out, "--plot", png, "--json")
    assert res.exit_code == 0, res.output
    table = pl.read_csv(out, try_parse_dates=True)
    assert table.columns == ["series", "cutoff", "ds", "h", "y_pred"]
    assert table.height == 7 * 12 and png.stat().st_size > 0
    last = datetime.fromisoformat(ett_lines(400)[-1].split(",")[0])
    ot = table.filter(pl.col("series") == "OT")
    assert ot["ds"].to_list() == [last + timedelta(hours=h) for h in range(1, 13)]
    assert ot["h"].to_list() == list(range(1, 13))
    # Original units: the oil temperature stays in its own range, not a z-score.
    assert 0 < ot["y_pred"].mean() < 60
    res = invoke("forecast", "--run", trained["run"], "--input", trained["src"], "--out", out, "--context", "all")
    assert res.exit_code == 0, res.output
    assert "read 400 rows" in res.stderr


def test_forecast_errors_are_one_line_with_exit_codes(trained, tmp_path):
    lines = ett_lines(60)
    lines.pop(30)  # a gap of two hours
    gap = tmp_path / "gap.csv"
    gap.write_text("\n".join(lines) + "\n")
    cases = [
        (["--input", gap, "--out", tmp_path / "o.csv"], 3, "irregular frequency"),
        (["--input", write_ett_slice(tmp_path / "short.csv", 10), "--out", tmp_path / "o.csv"], 3, "lookback (24)"),
        (["--input", trained["src"], "--out", tmp_path / "o.csv", "--context", "most"], 2, "--context 'most'"),
        (["--input", trained["src"], "--out", tmp_path / "o.xlsx"], 2, "use a .csv, .tsv or .parquet"),
    ]
    for args, code, message in cases:
        res = invoke("forecast", "--run", trained["run"], *args)
        assert res.exit_code == code, (args, res.output)
        assert message in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_prepare_errors_exit_3_naming_file_column_and_row(tmp_path):
    lines = ett_lines(50)
    lines[10] = lines[10].replace(lines[10].split(",")[2], "abc")
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    res = invoke("prepare", "timeseries", "--input", bad, "--out", tmp_path / "o")
    assert res.exit_code == 3
    assert "bad.csv: column 'HULL', row 10 (line 11): non-numeric value 'abc'" in res.stderr
    res = invoke("prepare", "timeseries", "--input", bad, "--out", tmp_path / "o", "--fill", "zero")
    assert res.exit_code == 2 and "--fill 'zero'" in res.stderr


def test_multi_horizon_run_trains_one_model_each_and_averages(trained, tmp_path):
    run = tmp_path / "multi"
    res = invoke(
        "train", "--task", "forecast", "--preset", "forecast_tiny", "--data", trained["prep"], "--out", run,
        "--horizon", "6,12", "--max-steps", 1, "-q", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (run / "h6" / "checkpoints" / "best.pt").is_file() and (run / "h12" / "checkpoints" / "best.pt").is_file()
    summary = json.loads((run / "summary.json").read_text())
    per = summary["model"]["horizons"]
    mean = (per["h6"]["mse_norm"] + per["h12"]["mse_norm"]) / 2
    assert summary["model"]["average"]["mse_norm"] == pytest.approx(mean)
    res = invoke("eval", "--run", run, "--json")
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["summary"]) >= {"model", "naive"}


def test_long_format_round_trip(tmp_path):
    wide = pl.read_csv(write_ett_slice(tmp_path / "w.csv", 400)).select("date", "OT", "LULL")
    long = wide.unpivot(index="date", variable_name="unique_id", value_name="y").rename({"date": "ds"})
    long.write_csv(tmp_path / "long.csv")
    res = invoke("prepare", "timeseries", "--input", tmp_path / "long.csv", "--format", "long", "--out", tmp_path / "p",
                 "--lookback", 24, "--horizon", 12, "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    res = invoke("train", "--task", "forecast", "--preset", "forecast_tiny", "--data", tmp_path / "p",
                 "--out", tmp_path / "run", "--max-steps", 1, "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "fc.parquet"
    res = invoke("forecast", "--run", tmp_path / "run", "--input", tmp_path / "long.csv", "--out", out)
    assert res.exit_code == 0, res.output
    table = pl.read_parquet(out)
    assert table["series"].unique(maintain_order=True).to_list() == ["OT", "LULL"] and table.height == 24
