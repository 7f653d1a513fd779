"""Forecast outputs: the forecast table writer, the history + forecast plot, and `titans eval` tables.

Everything here is in original units or names the scale it shows (`_norm` = z-scored with training statistics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from titans_cli.engine.errors import UsageError


def plot_forecast(history: pl.DataFrame, forecast: pl.DataFrame, meta: dict[str, Any], path: Path) -> Path:
    """One panel per forecast channel: the last rows of history and the forecast, in original units (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("--plot needs matplotlib: pip install 'titans-cli[plot]'") from err
    date_col, channels = meta["date_col"], meta["target_columns"]
    shown = history.tail(max(meta["lookback"], 2 * meta["horizon"]))
    fig, axes = plt.subplots(len(channels), 1, figsize=(10, 2.2 * len(channels) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], channels, strict=True):
        part = forecast.filter(pl.col("series") == name)
        ax.plot(shown[date_col].to_list(), shown[name].to_list(), color="0.3", lw=1, label="history")
        ax.plot(part["ds"].to_list(), part["y_pred"].to_list(), color="tab:red", lw=1.2, label="forecast")
        ax.axvline(shown[date_col][-1], color="0.6", ls="--", lw=0.8)
        ax.set_ylabel(f"{name}\n(original units)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[0, 0].set_title(f"{meta['horizon']}-step forecast after {shown[date_col][-1]} (step {meta['freq']})")
    axes[-1, 0].set_xlabel(date_col)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_table(frame: pl.DataFrame, path: Path) -> Path:
    """Write a forecast table as CSV/TSV (dates as `YYYY-MM-DD HH:MM:SS`) or Parquet by suffix, atomically."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".parquet", ".pq"):
        raise UsageError(f"--out {path}: use a .csv, .tsv or .parquet file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if suffix in (".parquet", ".pq"):
        frame.write_parquet(tmp)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        frame.write_csv(tmp, separator=sep, datetime_format="%Y-%m-%d %H:%M:%S")
    tmp.replace(path)
    return path


_COLUMNS = ("mse_norm", "mae_norm", "mse", "mae", "mase")


def _row(label: str, metrics: dict[str, Any], keys: tuple[str, ...], width: int = 16) -> str:
    cells = [f"{metrics[k]:>10.4f}" if isinstance(metrics.get(k), int | float) else f"{'-':>10}" for k in keys]
    return f"{label:<{width}}" + "".join(cells)


def format_report(result: dict[str, Any]) -> str:
    """Readable tables for `titans eval` on a forecast run (one run, or sub-runs with their average)."""
    if "sub_runs" in result:
        summary = result.get("summary", {})
        lines = [f"{result.get('split', 'test')} split of {result.get('run')}: one model per horizon (normalized)"]
        groups = [g for g in ("model", "naive", "seasonal_naive") if g in summary]
        lines.append(f"{'horizon':<10}" + "".join(f"{g + ' ' + k:>20}" for g in groups for k in ("mse", "mae")))
        names = list(summary["model"]["horizons"]) + ["average"]
        for name in names:
            cells = []
            for g in groups:
                m = summary[g]["average"] if name == "average" else summary[g]["horizons"][name]
                cells += [f"{m['mse_norm']:>20.4f}", f"{m['mae_norm']:>20.4f}"]
            lines.append(f"{name:<10}" + "".join(cells))
        return "\n".join(lines)
    head = (
        f"{result['split']} split of {result.get('run')} ({result.get('checkpoint')}, step {result.get('step')}) · "
        f"lookback {result['lookback']} · horizon {result['horizon']} · {result['model']['windows']} windows"
    )
    keys = _COLUMNS if result.get("season_length") else _COLUMNS[:4]
    lines = [head, f"{'':<16}" + "".join(f"{k:>10}" for k in keys)]
    lines += [_row(name, result[name], keys) for name in ("model", "naive", "seasonal_naive") if name in result]
    lines += ["", "per channel (model)"]
    lines += [_row(ch, m, keys) for ch, m in result["model"]["per_channel"].items()]
    steps = result["model"]["per_step"]["mse_norm"]
    marks = sorted({1, *(h for h in (24, 48, 96, 192, 336, 720) if h <= len(steps)), len(steps)})
    lines += ["", "per horizon step (model mse_norm): " + " · ".join(f"h{h} {steps[h - 1]:.4f}" for h in marks)]
    if result.get("season_length"):
        lines.append(f"MASE scaled by the seasonal-naive MAE (m = {result['season_length']}) on the training rows")
    return "\n".join(lines)
