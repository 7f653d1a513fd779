"""Forecast metrics as sums and counts (docs/conventions.md §9, pitfalls 1-2, 8-9): MSE, MAE, MASE, Pearson.

Errors are accumulated per horizon step and channel in float64, so a metric is the same whatever the batch size
(no mean of batch means). Errors on the z-scored scale give the papers' `mse_norm` / `mae_norm` (docs/design.md §6.2);
multiplying by each channel's training std gives original units. `naive_forecast` and `seasonal_naive_forecast`
are the reference forecasts printed beside a model's metrics.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor


class ErrorSums:
    """Running sums of squared and absolute errors, shape [H, C], over every window seen once.

    Args:
        horizon: forecast steps H.
        channels: number of channels C.
    """

    def __init__(self, horizon: int, channels: int) -> None:
        self.sse = torch.zeros(horizon, channels, dtype=torch.float64)
        self.sae = torch.zeros(horizon, channels, dtype=torch.float64)
        self.count = 0  # windows

    def update(self, pred: Tensor, true: Tensor) -> None:
        """Add a batch of forecasts `pred` and targets `true`, both [B, H, C] (same scale)."""
        if pred.shape != true.shape or pred.shape[1:] != self.sse.shape:
            raise ValueError(f"pred {tuple(pred.shape)} / true {tuple(true.shape)} do not match [B, {self.sse.shape}]")
        err = pred.detach().to("cpu", torch.float64) - true.detach().to("cpu", torch.float64)
        self.sse += (err * err).sum(0)
        self.sae += err.abs().sum(0)
        self.count += err.shape[0]

    def merge(self, other: ErrorSums) -> None:
        """Add another accumulator's sums (e.g. from another worker)."""
        self.sse += other.sse
        self.sae += other.sae
        self.count += other.count

    def mse(self) -> float:
        return float(self.sse.sum() / max(1, self.count * self.sse.numel()))

    def mae(self) -> float:
        return float(self.sae.sum() / max(1, self.count * self.sae.numel()))

    def summary(
        self,
        std: Tensor | None = None,
        channel_names: list[str] | None = None,
        mase_scale: Tensor | None = None,
    ) -> dict[str, Any]:
        """Metrics from the sums, for errors measured on the z-scored scale.

        Args:
            std: [C] training std of each channel; adds original-unit `mse` / `mae` (error × std).
            channel_names: keys of the per-channel table (default "0", "1", ...).
            mase_scale: [C] in-sample seasonal-naive MAE on the z-scored training rows (`mase_scale`); adds
                `mase` (mean over channels of MAE / scale) and per-channel values. A zero scale gives None.

        Returns:
            `mse_norm`, `mae_norm`, `windows`, optionally `mse`, `mae`, `mase`; `per_step` (lists over h = 1..H)
            and `per_channel` (dicts by name) of the same keys.
        """
        if self.count == 0:
            raise ValueError("no windows were evaluated")
        n_h, n_c = self.sse.shape
        names = channel_names or [str(i) for i in range(n_c)]
        scales = [("mse_norm", "mae_norm", torch.ones(n_c, dtype=torch.float64))]
        if std is not None:
            scales.append(("mse", "mae", std.to(torch.float64)))
        out: dict[str, Any] = {"windows": self.count}
        per_step: dict[str, list[float]] = {}
        per_channel: dict[str, dict[str, float | None]] = {n: {} for n in names}
        for mse_key, mae_key, s in scales:
            sse, sae = self.sse * s**2, self.sae * s  # error × std per channel
            out[mse_key] = float(sse.sum() / (self.count * n_h * n_c))
            out[mae_key] = float(sae.sum() / (self.count * n_h * n_c))
            per_step[mse_key] = (sse.sum(1) / (self.count * n_c)).tolist()
            per_step[mae_key] = (sae.sum(1) / (self.count * n_c)).tolist()
            for i, name in enumerate(names):
                per_channel[name][mse_key] = float(sse[:, i].sum() / (self.count * n_h))
                per_channel[name][mae_key] = float(sae[:, i].sum() / (self.count * n_h))
        if mase_scale is not None:
            mae_c = self.sae.sum(0) / (self.count * n_h)
            values = [_safe_ratio(float(mae_c[i]), float(mase_scale[i]), names[i]) for i in range(n_c)]
            for name, value in zip(names, values, strict=True):
                per_channel[name]["mase"] = value
            finite = [v for v in values if v is not None]
            out["mase"] = sum(finite) / len(finite) if finite else None
        out["per_step"] = per_step
        out["per_channel"] = per_channel
        return out


def _safe_ratio(num: float, den: float, name: str) -> float | None:
    if not den > 0 or not math.isfinite(den):
        warnings.warn(f"MASE undefined for channel {name!r}: its training series is constant", stacklevel=3)
        return None
    return num / den


def naive_forecast(x: Tensor, horizon: int) -> Tensor:
    """Repeat the last observed value: x [B, L, C] → [B, H, C]."""
    return x[:, -1:, :].expand(-1, horizon, -1)


def seasonal_naive_forecast(x: Tensor, horizon: int, season_length: int) -> Tensor:
    """Repeat the last season: ŷ[t + h] = x[t + h − m·ceil(h/m)] for h = 1..H; x [B, L, C] with L ≥ m."""
    m = season_length
    if m < 1 or m > x.shape[1]:
        raise ValueError(f"season length {m} must be between 1 and the lookback {x.shape[1]}")
    last = x[:, -m:, :]  # [B, m, C]
    reps = -(-horizon // m)
    return last.repeat(1, reps, 1)[:, :horizon, :]


def mase_scale(train: Tensor, season_length: int) -> Tensor:
    """In-sample MAE of the seasonal-naive forecast, mean |y_t − y_{t−m}| over the training rows: [N, C] → [C]."""
    m = season_length
    if m < 1 or m >= train.shape[0]:
        raise ValueError(f"season length {m} must be between 1 and the number of training rows {train.shape[0]}")
    train = train.to(torch.float64)
    return (train[m:] - train[:-m]).abs().mean(0)


def pearson(a: Tensor, b: Tensor) -> float | None:
    """Pearson correlation of two equal-size tensors (flattened); None when either is constant.

    sum((a−ā)(b−b̄)) / sqrt(sum (a−ā)² · sum (b−b̄)²): the product of sums, not the sum of products that
    TSLib's CORR computes (docs/conventions.md pitfall 8).
    """
    a = a.detach().to(torch.float64).flatten()
    b = b.detach().to(torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"pearson: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum()) / den if den > 0 else None
