"""Task `forecast`: window borders, scaling round trip, batch-size invariance, long context through the memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl
import pytest
import torch
from torch.utils.data import DataLoader

from data_recipes import timeseries as ts
from tasks.forecast import TASK, ForecastConfig, _normalize, scaler_tensors
from tasks.forecast_models import DLinear, TitansForecaster
from tests.fixtures.timeseries import write_ett_slice
from titans_cli.backbone.model import Titans
from titans_cli.engine.config import ModelConfig, RunConfig, RunSection
from titans_cli.engine.errors import UsageError

TINY = ModelConfig(dim=16, n_layers=1, heads=2, memory_expansion=2, chunk_size=4, ffn_mult=2, n_persistent=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fc")
    src = write_ett_slice(root / "slice.csv", 400)
    ts.prepare(src, root / "prep", lookback=24, horizon=12)  # ratio split: 280 / 40 / 80 rows
    return root / "prep"


def _cfg(data: Path, **task: object) -> RunConfig:
    t = ForecastConfig(lookback=24, horizon=(12,), patch_len=8, patch_stride=4, **task)
    return RunConfig(run=RunSection(task="forecast", data=str(data)), model=TINY, task=t)


def test_windows_start_at_their_border_and_never_cross_it(prepared):
    data = TASK.load(_cfg(prepared), prepared)
    assert [len(d) for d in (data.train, data.val, data.test)] == [280 - 36 + 1, 40 - 12 + 1, 80 - 12 + 1]
    values = data.train.values
    first_val, last_test = data.val[0], data.test[len(data.test) - 1]
    assert torch.equal(first_val["y"], values[280:292])  # the first val target row is the val border
    assert torch.equal(first_val["x"], values[256:280])  # its inputs are the last 24 training rows
    assert torch.equal(last_test["y"], values[388:400])  # the last test window ends at the last row
    train_end = data.train.starts[-1] + 24 + 12
    assert train_end == 280  # no training target reaches into validation
    assert data.meta["splits"]["windows"] == {"train": 245, "val": 29, "test": 69}


def test_inverse_transform_round_trips_by_column_name(prepared):
    manifest = ts.read_manifest(prepared)
    frame = pl.read_parquet(prepared / "test.parquet")
    cols = list(reversed(manifest["columns"]))  # any order: statistics are looked up by name
    z = _normalize(frame, cols, manifest["scaler"]).double()
    mean, std = scaler_tensors(manifest["scaler"], cols)
    back = z * std + mean
    assert torch.allclose(back, torch.from_numpy(frame.select(cols).to_numpy()), rtol=1e-6, atol=1e-5)


def test_evaluation_does_not_depend_on_batch_size(prepared):
    cfg = _cfg(prepared, model="dlinear")
    data = TASK.load(cfg, prepared)
    torch.manual_seed(0)
    model = TASK.build_model(cfg, data.meta)
    results = [TASK.evaluate(model, DataLoader(data.test, batch_size=bs), data.meta) for bs in (4, 7, 1000)]
    for other in results[1:]:
        assert other["windows"] == results[0]["windows"] == 69
        assert other["mse_norm"] == pytest.approx(results[0]["mse_norm"], rel=1e-9)
        assert other["mae"] == pytest.approx(results[0]["mae"], rel=1e-9)


def test_titans_predictions_do_not_depend_on_batch_size_or_order(prepared):
    cfg = _cfg(prepared)
    data = TASK.load(cfg, prepared)
    torch.manual_seed(0)
    model = TASK.build_model(cfg, data.meta).eval()
    x = torch.stack([data.test[i]["x"] for i in range(6)])
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
        reversed_ = model(x.flip(0)).flip(0)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together, reversed_, atol=1e-5)


@pytest.mark.parametrize("layout", ["patch", "time", "variate"])
def test_long_context_is_read_through_the_memory_in_pieces(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 100, 3)

    def build(piece: int) -> TitansForecaster:
        torch.manual_seed(1)
        return TitansForecaster(Titans(TINY), 16, 3, 24, 6, layout, 8, 4, piece=piece).eval()

    with torch.no_grad():
        whole, pieces = build(1000)(x), build(5)(x)
        window_only = build(1000)(x[:, -24:])
    assert whole.shape == (2, 6, 3)
    assert torch.allclose(whole, pieces, atol=1e-5)  # feeding the state piece by piece equals one call
    assert not torch.allclose(whole, window_only, atol=1e-4)  # the earlier rows reach the forecast


def test_dlinear_reads_only_the_last_lookback_rows():
    torch.manual_seed(0)
    model = DLinear(24, 6, 5)
    x = torch.randn(2, 50, 3)
    assert torch.equal(model(x), model(x[:, -24:]))


def test_ms_features_score_only_the_target(tmp_path):
    src = write_ett_slice(tmp_path / "s.csv", 400)
    ts.prepare(src, tmp_path / "ms", features="MS", target="OT", lookback=24, horizon=12)
    cfg = _cfg(tmp_path / "ms")
    data = TASK.load(cfg, tmp_path / "ms")
    model = TASK.build_model(cfg, data.meta)
    assert data.train[0]["x"].shape == (24, 7) and data.train[0]["y"].shape == (12, 1)
    assert model.target_idx.tolist() == [6]
    assert torch.isfinite(TASK.loss(model, next(iter(DataLoader(data.train, batch_size=4)))))


def test_multi_horizon_sub_runs_and_summary(prepared):
    cfg = dataclasses.replace(_cfg(prepared), task=ForecastConfig(horizon=(96, 192)))
    subs = TASK.sub_runs(cfg)
    assert [(n, c.task.horizon) for n, c in subs] == [("h96", (96,)), ("h192", (192,))]
    assert TASK.sub_runs(_cfg(prepared)) == []
    summary = TASK.summarize(
        {
            "h96": {"mse_norm": 0.4, "mae_norm": 0.4, "val": {"mse_norm": 0.6, "mae_norm": 0.5}},
            "h192": {"mse_norm": 0.5, "mae_norm": 0.45, "val": {"mse_norm": 0.8, "mae_norm": 0.6}},
        }
    )
    assert summary["model"]["average"] == pytest.approx({"mse_norm": 0.45, "mae_norm": 0.425})
    assert summary["val"]["average"]["mse_norm"] == pytest.approx(0.7)
    with pytest.raises(UsageError, match="one model per horizon"):
        _ = ForecastConfig(horizon=(96, 192)).pred_len


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"layout": "patch", "patch_len": 16, "patch_stride": 7},
            "task.patch_stride: must divide lookback - patch_len = 80",
        ),
        ({"horizon": (96, 96)}, "task.horizon: lists a horizon twice"),
        ({"horizon": (0,)}, "task.horizon: must be positive integers"),
        ({"lookback": 8}, "task.patch_len: must be between 1 and the lookback"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ForecastConfig(**kwargs)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "attn"])
def test_every_variant_forecasts_and_streams_context_exactly(variant):
    cfg = dataclasses.replace(TINY, variant=variant, window=8, segment_len=8)
    x = torch.randn(2, 60, 3, generator=torch.Generator().manual_seed(0))

    def build(piece: int) -> TitansForecaster:
        torch.manual_seed(1)
        return TitansForecaster(Titans(cfg), 16, 3, 24, 6, "patch", 8, 4, piece=piece).eval()

    with torch.no_grad():
        whole, pieces = build(1000)(x), build(5)(x)
    assert torch.isfinite(whole).all()
    assert torch.allclose(whole, pieces, atol=1e-5)
