"""Task `forecast`: multivariate long-horizon forecasting on prepared time series (docs/design.md §6, Table 3).

Windows slide with stride 1 over the splits of `titans prepare timeseries`; validation and test inputs borrow
their first `lookback` rows from the preceding split; values are z-scored with the training statistics stored
in the manifest and the checkpoint (never refitted). Loss: `task.loss` (MSE by default) on the z-scored scale; early
stopping and reports always use MSE. Every validation and test
window counts once (sums and counts; `titans_cli.metrics`). `--horizon 96,192,336,720` trains one model per
horizon (`sub_runs`) and `summarize` averages them (Table 3). `forecast_file` forecasts past the end of a file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from data_recipes import timeseries as ts
from tasks.forecast_models import build_forecaster
from tasks.forecast_stream import StreamWindows, stream_forecast, whole_past_errors
from titans_cli.engine.config import check_fields
from titans_cli.engine.errors import DataError, TitansError, UsageError
from titans_cli.engine.metrics import ErrorSums, mase_scale, naive_forecast, seasonal_naive_forecast
from titans_cli.engine.task import Batch, TaskData


@dataclass(frozen=True)
class ForecastConfig:
    """The `[task]` section of a forecast run."""

    # titans, or a peer through the same splits, scaler, windows, early stopping and metrics (forecast_models)
    model: Literal["titans", "dlinear", "rlinear", "patchtst"] = "titans"
    lookback: int = 96  # L (docs/design.md §6.2)
    horizon: tuple[int, ...] = (96,)  # H; several values train one model each plus their average (Table 3)
    # Titans defaults chosen on the validation average over ETTh1, ETTm1 and ILI (docs/forecasting.md): variate
    # tokens (the memory reads the channels, iTransformer-style), RevIN on, MAE loss.
    layout: Literal["patch", "time", "variate"] = "variate"  # Titans forecaster's token layout (docs/design.md A12)
    patch_len: int = 16  # PatchTST's patch geometry (Titans layout "patch" and PatchTST)
    patch_stride: int = 8
    revin: bool = True  # Titans: reversible instance normalisation (the peers are built as published)
    head_dropout: float = 0.0
    skip: bool = False  # Titans: a linear lookback -> horizon map added to the head (docs/forecasting.md)
    # Training loss; early stopping and reports use MSE regardless. auto: MAE for Titans, MSE for the peers (as
    # their authors train them).
    loss: Literal["auto", "mse", "mae", "huber"] = "auto"
    moving_avg: int = 25  # DLinear's trend kernel
    # Rows of history before each window that the Titans memory reads first (training and evaluation; the
    # first `context` training rows then only serve as history). 0: the window alone.
    context: int = 0
    # How training reads the series (Titans, variate layout; docs/forecasting.md "Long histories"). "window":
    # windows in shuffled batches, each read alone (after `context` rows). "stream": each batch row walks the
    # training split block by block (block = lookback rows) with the memory state carried from step to step and
    # detached (truncated backpropagation), the loss the forecast after its newest block, so the model learns
    # to forecast from a state that has read the whole past, as `--context all` does; validation and test then
    # read every earlier row too (tasks/forecast_stream.py).
    # "both": each step the stream loss and, with equal weight, a shuffled batch of windows read alone.
    context_train: Literal["window", "stream", "both"] = "window"
    # Streams: 0 reads each one whole from the start of the split (batches then hold windows within one block of
    # rows of each other); K > 0 cuts them into segments of K blocks that first read the K blocks before them
    # without gradients, so that a batch mixes segments from all over the split.
    stream_segment: int = 0
    # Titans with a context longer than the lookback (`--context all`, whole-past validation): forecast the mean
    # of the whole-past reading and the window-alone reading ("both" trains the two).
    history_blend: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("lookback", self.lookback >= 1, "must be >= 1"),
            ("horizon", len(self.horizon) >= 1 and min(self.horizon) >= 1, "must be positive integers"),
            ("horizon", len(set(self.horizon)) == len(self.horizon), "lists a horizon twice"),
            ("patch_len", 1 <= self.patch_len <= self.lookback, "must be between 1 and the lookback"),
            ("patch_stride", self.patch_stride >= 1, "must be >= 1"),
            ("head_dropout", 0 <= self.head_dropout < 1, "must be in [0, 1)"),
            ("moving_avg", self.moving_avg >= 1, "must be >= 1"),
            ("context", self.context >= 0, "must be >= 0 (0: the window alone)"),
            ("stream_segment", self.stream_segment >= 0, "must be >= 0 blocks (0: whole streams)"),
        ]
        if self.context_train != "window":
            # Streams read the whole past themselves, in variate blocks (the only layout whose history is
            # read as whole lookback blocks, so that a step of a stream equals reading its prefix in one call).
            checks.append(("context_train", self.model == "titans", "streams train the titans model only"))
            checks.append(("context_train", self.layout == "variate", "streams need task.layout = 'variate'"))
            checks.append(("context_train", self.context == 0, "streams read the whole past; set task.context=0"))
        if self.layout == "patch" and self.model == "titans":
            ok = (self.lookback - self.patch_len) % max(1, self.patch_stride) == 0
            checks.append(("patch_stride", ok, f"must divide lookback - patch_len = {self.lookback - self.patch_len}"))
        check_fields("task", self, checks)

    @property
    def pred_len(self) -> int:
        """The horizon of one model (a multi-horizon config is split by `sub_runs` first)."""
        if len(self.horizon) != 1:
            raise UsageError(f"task.horizon {self.horizon}: one model per horizon; use sub_runs()")
        return self.horizon[0]


# Training losses on the z-scored scale. Huber with delta 1: quadratic for small errors, linear beyond one
# standard deviation, so rare spikes pull less than under MSE.
LOSSES = {
    "mse": nn.functional.mse_loss,
    "mae": nn.functional.l1_loss,
    "huber": nn.functional.huber_loss,
}


class WindowDataset(Dataset):
    """Sliding windows over one z-scored array: x = rows [s - context, s+L), y = target rows [s+L, s+L+H).

    Args:
        values: [N, C] z-scored float32 array of the input channels.
        starts: the window starts s (each window counted once); s >= context.
        target_idx: columns of `values` the model is scored on.
        context: rows of history before the window included in x (inputs only, never a target).
    """

    def __init__(
        self, values: Tensor, starts: range, lookback: int, horizon: int, target_idx: list[int], context: int = 0
    ):
        self.values, self.starts, self.lookback, self.horizon = values, starts, lookback, horizon
        self.target_idx, self.context = torch.tensor(target_idx), context

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Batch:
        s = self.starts[i]
        x = self.values[s - self.context : s + self.lookback]
        y = self.values[s + self.lookback : s + self.lookback + self.horizon].index_select(1, self.target_idx)
        return {"x": x, "y": y, "index": torch.tensor(i)}


def scaler_tensors(scaler: dict[str, Any], columns: list[str]) -> tuple[Tensor, Tensor]:
    """Mean and std (float64, [C]) of `columns`, looked up by name (docs/conventions.md pitfall 7)."""
    mean = torch.tensor([scaler["mean"][c] for c in columns], dtype=torch.float64)
    std = torch.tensor([scaler["std"][c] for c in columns], dtype=torch.float64)
    return mean, std


def _normalize(frame: pl.DataFrame, columns: list[str], scaler: dict[str, Any]) -> Tensor:
    mean, std = scaler_tensors(scaler, columns)
    raw = torch.from_numpy(frame.select(columns).to_numpy().astype("float64"))
    return ((raw - mean) / std).to(torch.float32)


def window_datasets(
    data_dir: Path, lookback: int, horizon: int, scaler: dict[str, Any] | None = None, context: int = 0
) -> tuple[dict[str, WindowDataset], dict[str, Any], Tensor]:
    """Window datasets for train/val/test, the manifest, and the z-scored training rows [N_train, C].

    `scaler` (from a checkpoint) overrides the manifest's statistics: evaluation never refits them. With
    `context`, each x starts `context` rows earlier; training windows then start at row `context`.
    """
    manifest = ts.read_manifest(data_dir)
    frames = ts.load_splits(data_dir, manifest)
    inputs, targets = manifest["input_columns"], manifest["target_columns"]
    target_idx = [inputs.index(c) for c in targets]
    values = _normalize(pl.concat([frames[n] for n in ts.SPLITS]), inputs, scaler or manifest["scaler"])
    borders = manifest["split"]["borders"]
    counts = ts.window_counts(borders, lookback, horizon)
    counts["train"] -= context  # the first `context` training rows are history only
    datasets = {}
    for name in ts.SPLITS:
        if counts[name] < 1:
            rows = borders[name][1] - borders[name][0]
            raise DataError(
                f"{data_dir}: split {name!r} has {rows} rows: no window of lookback {lookback} + horizon {horizon} "
                f"(+ context {context}) fits; use a smaller --lookback/--horizon or another split "
                "(`titans prepare timeseries --split ...`)"
            )
        first = borders[name][0] + context if name == "train" else borders[name][0] - lookback
        if first - context < 0:
            raise DataError(f"{data_dir}: split {name!r} starts at row {first}: no room for {context} context rows")
        windows = range(first, first + counts[name])
        datasets[name] = WindowDataset(values, windows, lookback, horizon, target_idx, context)
    return datasets, manifest, values[: borders["train"][1]]


class ForecastTask:
    """`forecast`: see the module docstring. Primary metric `mse_norm` (lower is better)."""

    name = "forecast"
    config_cls = ForecastConfig
    primary_metric = "mse_norm"
    higher_is_better = False

    def load(self, cfg: Any, data_dir: Path) -> TaskData:
        """Windows of the prepared folder; `meta` keeps columns, scaler, frequency and window counts."""
        t = cfg.task
        datasets, manifest, _ = window_datasets(Path(data_dir), t.lookback, t.pred_len, context=t.context)
        meta = {
            "task": "forecast",
            "date_col": manifest["date_col"],
            "freq": manifest["freq"],
            "features": manifest["features"],
            "target": manifest["target"],
            "input_columns": manifest["input_columns"],
            "target_columns": manifest["target_columns"],
            "fill": manifest["fill"],
            "scaler": manifest["scaler"],
            "input_sha256": manifest["input"]["sha256"],
            "format": manifest["input"]["format"],  # `titans forecast` reads its input the same way
            "id_col": manifest["input"].get("id_col") or "unique_id",
            "lookback": t.lookback,
            "horizon": t.pred_len,
            "splits": {
                "rule": manifest["split"]["rule"],
                "borders": manifest["split"]["borders"],
                "windows": {n: len(d) for n, d in datasets.items()},
            },
        }
        train = datasets["train"]
        if t.context_train != "window":
            train = StreamWindows(train, companions=t.context_train == "both", segment=t.stream_segment)
        return TaskData(train, datasets["val"], datasets["test"], meta)

    def build_model(self, cfg: Any, meta: dict[str, Any]) -> nn.Module:
        model = build_forecaster(cfg.model, cfg.task, len(meta["input_columns"]))
        # Which output channels are scored (MS: only the target); a buffer, so it follows .to(device).
        idx = [meta["input_columns"].index(c) for c in meta["target_columns"]]
        model.register_buffer("target_idx", torch.tensor(idx), persistent=False)
        loss = cfg.task.loss
        model.loss_name = ("mae" if cfg.task.model == "titans" else "mse") if loss == "auto" else loss
        return model

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        # A stream batch (task.context_train "stream" or "both") continues the memory state of the previous one.
        pred = stream_forecast(model, batch) if "block" in batch else model(batch["x"])
        loss = LOSSES[model.loss_name](pred.index_select(2, model.target_idx).float(), batch["y"])
        if "x_window" in batch:  # "both": the same weight on a shuffled batch forecast from the window alone
            alone = model(batch["x_window"]).index_select(2, model.target_idx)
            loss = (loss + LOSSES[model.loss_name](alone.float(), batch["y_window"])) / 2
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """Overall MSE/MAE (z-scored and original units) over every window of `loader` once.

        A stream-trained model (history_norm "block") is scored as it is meant to be used, each window forecast
        after reading every earlier row of the series (`--context all`); its window-alone metrics come beside,
        as `window_mse_norm` and the like.
        """
        sums = _collect(model, loader, len(meta["target_columns"]), meta["horizon"])["model"]
        _, std = scaler_tensors(meta["scaler"], meta["target_columns"])
        keys = ("mse_norm", "mae_norm", "mse", "mae", "windows")
        window = {k: v for k, v in sums.summary(std=std).items() if k in keys}
        if getattr(model, "history_norm", "window") != "block":
            return window
        whole = whole_past_errors(model, loader.dataset).summary(std=std)
        return {**{k: whole[k] for k in keys}, **{f"window_{k}": window[k] for k in keys[:4]}}

    def sub_runs(self, cfg: Any) -> list[tuple[str, Any]]:
        """One run per horizon when `task.horizon` lists several: [("h96", cfg), ...]; else []."""
        horizons = cfg.task.horizon
        if len(horizons) <= 1:
            return []
        return [(f"h{h}", dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, horizon=(h,)))) for h in horizons]

    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Per-horizon metrics and their unweighted average (Table 3 cells are four-horizon means).

        `results` are sub-run results keyed by name: training's flat metrics.json (with its `val` entry) or
        `eval_report` outputs (the model's metrics under "model", the references beside it).
        """
        groups: dict[str, dict[str, dict[str, Any]]] = {}
        for name, result in sorted(results.items(), key=lambda item: _horizon_key(item[0])):
            if "model" in result:  # an eval report
                for ref in ("model", "naive", "seasonal_naive"):
                    if ref in result:
                        groups.setdefault(ref, {})[name] = result[ref]
            else:
                groups.setdefault("model", {})[name] = result
                if isinstance(result.get("val"), dict):
                    groups.setdefault("val", {})[name] = result["val"]
        out: dict[str, Any] = {}
        for group, by_name in groups.items():
            keys = [k for k in ("mse_norm", "mae_norm", "mse", "mae") if all(k in r for r in by_name.values())]
            out[group] = {
                "horizons": {n: {k: r[k] for k in keys} for n, r in by_name.items()},
                "average": {k: sum(float(r[k]) for r in by_name.values()) / len(by_name) for k in keys},
            }
        return out

    @torch.no_grad()
    def eval_report(
        self,
        loaded: Any,
        split: str = "test",
        data_dir: Path | None = None,
        season_length: int | str | None = None,
        batch_size: int | str = 256,
        **unknown: Any,
    ) -> dict[str, Any]:
        """Full report on a split: the model, naive and seasonal-naive forecasts; overall, per step, per channel.

        Scaler statistics come from the checkpoint, so another prepared folder (`--data`) is scored in the
        training frame. MASE (with `season_length`) scales by the seasonal-naive MAE on the training rows.
        Options may arrive as text (`titans eval --opt season_length=24`).
        """
        if unknown:
            raise UsageError(f"--opt {next(iter(unknown))}: unknown for forecast; known: season_length, batch_size")
        season_length = _int_option(season_length, "season_length")
        batch_size = _int_option(batch_size, "batch_size") or 256
        meta, t = loaded.meta, loaded.cfg.task
        if split not in ts.SPLITS:
            raise UsageError(f"--split {split!r}: choose train, val or test")
        data_dir = Path(data_dir or loaded.cfg.run.data)
        datasets, manifest, train_rows = window_datasets(
            data_dir, t.lookback, t.pred_len, scaler=meta["scaler"], context=t.context
        )
        if manifest["input_columns"] != meta["input_columns"] or manifest["target_columns"] != meta["target_columns"]:
            raise DataError(
                f"{data_dir}: columns {manifest['input_columns']} -> {manifest['target_columns']} differ from the "
                f"run's {meta['input_columns']} -> {meta['target_columns']}; prepare the data with the same columns"
            )
        if season_length is not None and not 1 <= season_length <= t.lookback:
            raise UsageError(f"--season-length {season_length}: must be between 1 and the lookback {t.lookback}")
        loader = DataLoader(datasets[split], batch_size=batch_size, shuffle=False)
        sums = _collect(loaded.model, loader, len(meta["target_columns"]), t.pred_len, True, season_length)
        _, std = scaler_tensors(meta["scaler"], meta["target_columns"])
        target_idx = [meta["input_columns"].index(c) for c in meta["target_columns"]]
        scale = mase_scale(train_rows[:, target_idx], season_length) if season_length else None
        report: dict[str, Any] = {
            "task": "forecast",
            "split": split,
            "data": str(data_dir),
            "lookback": t.lookback,
            "horizon": t.pred_len,
            "season_length": season_length,
        }
        for name, acc in sums.items():
            report[name] = acc.summary(std=std, channel_names=meta["target_columns"], mase_scale=scale)
        return report


def _horizon_key(name: str) -> tuple[int, str]:
    """Sort sub-runs "h96" < "h192" < "h336" by their horizon, other names after them."""
    digits = name[1:] if name.startswith("h") else ""
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)


def _int_option(value: int | str | None, name: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--opt {name}={value!r}: expected an integer") from None


def _collect(
    model: nn.Module,
    loader: Any,
    channels: int,
    horizon: int,
    references: bool = False,
    season_length: int | None = None,
) -> dict[str, ErrorSums]:
    """Error sums of the model over every window once; with `references` also the naive forecast, and the
    seasonal-naive one when `season_length` is given."""
    model.eval()
    device = next(model.parameters()).device
    sums = {"model": ErrorSums(horizon, channels)}
    if references:
        sums["naive"] = ErrorSums(horizon, channels)
        if season_length is not None:
            sums["seasonal_naive"] = ErrorSums(horizon, channels)
    for batch in loader:
        x, y = batch["x"].to(device), batch["y"]
        sums["model"].update(model(x).index_select(2, model.target_idx).cpu(), y)
        if references:
            xt = batch["x"].index_select(2, loader.dataset.target_idx)  # the scored channels' history
            sums["naive"].update(naive_forecast(xt, horizon), y)
            if season_length is not None:
                sums["seasonal_naive"].update(seasonal_naive_forecast(xt, horizon, season_length), y)
    return sums


def forecast_file(
    loaded: Any, input_path: Path, context: Literal["window", "all"] = "window"
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Forecast `horizon` steps past the last row of `input_path`, in original units.

    Args:
        loaded: a `LoadedRun` of a forecast run (model, meta with scaler, columns, frequency).
        input_path: CSV/Parquet in the training data's layout (wide, or long for runs prepared from long data).
        context: "window" reads the last `lookback` rows; "all" reads the whole file through the memory first.

    Returns:
        (forecast, history): forecast in long format `series, cutoff, ds, h, y_pred`; history is the file's
        validated frame (date column and input columns, original units) for plotting.
    """
    meta = loaded.meta
    if meta.get("task") != "forecast":
        raise UsageError(f"{loaded.run_dir}: a {meta.get('task')!r} run; use the command for that task")
    series = ts.read_series(
        input_path,
        fmt=meta.get("format", "wide"),
        date_col=meta["date_col"],
        id_col=meta.get("id_col", "unique_id"),
        columns=meta["input_columns"],
        fill=meta["fill"],
    )
    if series.freq != meta["freq"]:
        raise DataError(
            f"{input_path}: column {meta['date_col']!r}: step {series.freq} differs from the training data's "
            f"{meta['freq']}; resample the file"
        )
    lookback, horizon = meta["lookback"], meta["horizon"]
    rows = series.frame.height
    if rows < lookback:
        raise DataError(f"{input_path}: {rows} rows, the model needs at least the lookback ({lookback})")
    x = _normalize(series.frame, meta["input_columns"], meta["scaler"])
    if context == "window":
        x = x[-lookback:]
    elif context != "all":
        raise UsageError(f"--context {context!r}: choose window or all")
    model = loaded.model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        y = model(x.unsqueeze(0).to(device)).index_select(2, model.target_idx)[0].cpu().to(torch.float64)
    mean, std = scaler_tensors(meta["scaler"], meta["target_columns"])
    y = y * std + mean  # [H, C_target], original units
    if not torch.isfinite(y).all():
        if context == "all":
            # Mini-batch memory updates (chunk size b) can diverge over contexts far longer than training saw.
            raise TitansError(
                f"{input_path}: the memory diverged over the {rows}-row context (non-finite forecast); use "
                f"--context window, or train with a smaller model.chunk_size (now {loaded.cfg.model.chunk_size})"
            )
        raise DataError(f"{input_path}: the forecast is not finite; check the input values")
    last = series.frame[meta["date_col"]][-1]
    dates = ts.future_dates(last, meta["freq"], horizon)
    out = pl.DataFrame(
        {
            "series": [c for c in meta["target_columns"] for _ in range(horizon)],
            "cutoff": [last] * (horizon * len(meta["target_columns"])),
            "ds": dates * len(meta["target_columns"]),
            "h": list(range(1, horizon + 1)) * len(meta["target_columns"]),
            "y_pred": y.T.reshape(-1).tolist(),
        }
    )
    return out, series.frame


TASK = ForecastTask()
