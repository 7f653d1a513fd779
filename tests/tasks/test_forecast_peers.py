"""Forecasting peers and Titans options: RevIN round trip, the peers' shapes and causality, the
variate-token layout, the training losses, and a multi-dataset smoke run of `bench/forecast.py --quick`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_recipes import timeseries as ts
from tasks.forecast import LOSSES, ForecastConfig, window_datasets
from tasks.forecast_models import DLinear, PatchTST, RevIN, RLinear, TitansForecaster, build_forecaster
from tests.fixtures.timeseries import write_ett_slice
from titans_cli.backbone.model import Titans
from titans_cli.engine.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
TINY = ModelConfig(dim=16, n_layers=1, heads=2, memory_expansion=2, chunk_size=4, ffn_mult=2, n_persistent=2)


def test_revin_normalise_then_denormalise_is_the_identity():
    torch.manual_seed(0)
    revin = RevIN(3)
    with torch.no_grad():  # a non-trivial affine map, so the inverse of the weight and bias is exercised too
        revin.weight.copy_(torch.tensor([0.5, 2.0, -1.5]))
        revin.bias.copy_(torch.tensor([0.3, -1.0, 2.0]))
    x = torch.randn(4, 40, 3) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([5.0, -3.0, 100.0])
    z, stats = revin.normalize(x, lookback=24)
    # The statistics come from the last 24 rows; the normalised window has mean b and std |w| per channel.
    window = (z[:, -24:] - revin.bias) / revin.weight
    assert torch.allclose(window.mean(1), torch.zeros(4, 3), atol=1e-4)
    assert torch.allclose(window.std(1, unbiased=False), torch.ones(4, 3), atol=1e-3)
    assert torch.allclose(revin.denormalize(z, stats), x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["rlinear", "patchtst", "dlinear"])
def test_peers_forecast_from_the_window_alone_and_each_sample_alone(name):
    torch.manual_seed(0)
    task = ForecastConfig(model=name, lookback=24, horizon=(12,), patch_len=8, patch_stride=4)
    model = build_forecaster(TINY, task, 5).eval()
    x = torch.randn(6, 40, 5)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (6, 12, 5)
        assert torch.equal(model(x[:, -24:]), y)  # rows before the lookback are never read
        later = x.clone()
        later[3] += 100.0  # another sample changes: no other forecast may move (no batch statistics at eval)
        moved = (model(later) - y).abs().amax(dim=(1, 2))
    assert moved[3] > 0 and torch.all(moved[[0, 1, 2, 4, 5]] == 0)


def test_peer_classes_are_the_ones_built():
    task = ForecastConfig(lookback=24, horizon=(12,), patch_len=8, patch_stride=4)
    for name, cls in (("rlinear", RLinear), ("patchtst", PatchTST), ("dlinear", DLinear)):
        model = build_forecaster(TINY, ForecastConfig(**{**task.__dict__, "model": name}), 3)
        assert type(model) is cls
    assert PatchTST(24, 12, 3, 8, 4).n_patches == 6  # (L - P) / S + 1 plus the one padded patch


def test_variate_tokens_are_read_causally_across_channels():
    # Layout "variate": one token per channel, read in channel order by the causal memory, so a channel's
    # forecast depends on its own and earlier channels' inputs only.
    torch.manual_seed(0)
    model = TitansForecaster(Titans(TINY), 16, 4, 24, 6, layout="variate", revin=True, skip=True).eval()
    x = torch.randn(2, 24, 4)
    with torch.no_grad():
        y = model(x)
        later = x.clone()
        later[:, :, 2] += torch.randn(2, 24)
        moved = (model(later) - y).abs().amax(dim=(0, 1))
    assert y.shape == (2, 6, 4)
    assert torch.all(moved[:2] == 0) and torch.all(moved[2:] > 0)


def test_context_windows_carry_history_before_the_window(tmp_path):
    src = write_ett_slice(tmp_path / "s.csv", 400)
    ts.prepare(src, tmp_path / "p", lookback=24, horizon=12)  # ratio split: 280 / 40 / 80 rows
    plain, _, _ = window_datasets(tmp_path / "p", 24, 12)
    longer, _, _ = window_datasets(tmp_path / "p", 24, 12, context=48)
    assert len(longer["train"]) == len(plain["train"]) - 48  # the first 48 training rows are history only
    assert longer["train"].starts[0] == 48 and len(longer["test"]) == len(plain["test"])
    for split, i in (("train", 0), ("val", 0), ("test", len(plain["test"]) - 1)):
        a = longer[split][i]
        b = plain[split][i + 48 if split == "train" else i]
        assert a["x"].shape == (72, 7) and torch.equal(a["x"][-24:], b["x"]) and torch.equal(a["y"], b["y"])


def test_skip_adds_a_linear_forecast_beside_the_head():
    torch.manual_seed(0)
    model = TitansForecaster(Titans(TINY), 16, 3, 24, 6, "patch", 8, 4, revin=False, skip=True).eval()
    x = torch.randn(2, 24, 3)
    with torch.no_grad():
        with_skip = model(x)
        model.skip.weight.zero_()
        model.skip.bias.zero_()
        without = model(x)
        linear = torch.einsum("btc,ht->bhc", x, torch.ones(6, 24))
        model.skip.weight.fill_(1.0)
        assert torch.allclose(model(x) - without, linear, atol=1e-4)
    assert not torch.allclose(with_skip, without)


def test_losses_are_the_named_ones():
    pred, y = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 0.0]])
    assert LOSSES["mse"](pred, y).item() == pytest.approx(5.0)
    assert LOSSES["mae"](pred, y).item() == pytest.approx(2.0)
    assert LOSSES["huber"](pred, y).item() == pytest.approx((0.5 + 2.5) / 2)  # 0.5 e² below 1, |e| − 0.5 above


def test_bench_quick_runs_every_dataset_and_model(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(REPO / "bench" / "forecast.py"), "--quick", "--threads", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    averages = [r for r in rows if "average" in r]
    assert {(r["dataset"], r["model"]) for r in averages} == {
        (d, m) for d in ("ETTh1", "ETTm1", "ILI") for m in ("titans", "patchtst", "rlinear", "dlinear")
    }
    assert all(r["split"] == "test" and 0 < r["average"][0] < float("inf") for r in averages)
    for dataset in ("ETTh1", "ETTm1", "ILI"):  # one table per dataset, one row per model
        assert f"| {dataset} (test MSE / MAE) |" in res.stdout
    assert res.stdout.count("| titans |") == 3


def test_bench_val_only_never_scores_the_test_split(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(REPO / "bench" / "forecast.py"), "--quick", "--val-only", "--datasets", "ILI",
           "--models", "rlinear", "--threads", "1", "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "ILI" / "rlinear" / "h24" / "metrics.json").read_text())
    assert metrics["split"] == "val"
    assert "| ILI (val MSE / MAE) |" in res.stdout


def test_bench_jobs_give_the_same_results_as_one_process(tmp_path):
    """`--jobs 2` trains the cases in two worker processes: same numbers per case, same table order."""
    tables = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        cmd = [sys.executable, str(REPO / "bench" / "forecast.py"), "--quick", "--datasets", "ILI,ETTh1",
               "--models", "titans,rlinear", "--threads", str(jobs), "--jobs", str(jobs),
               "--out", str(out)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        per_case = {(r["dataset"], r["model"], r["horizon"]): (r["mse"], r["mae"]) for r in rows if "horizon" in r}
        assert len(per_case) == 4
        tables[jobs] = (per_case, [line.split("|")[1] for line in res.stdout.splitlines() if line.startswith("| ")])
    assert tables[1] == tables[2]
