"""Forecast metrics: hand-computed values, batch-size invariance, references, MASE and Pearson guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from titans_cli.engine.metrics import ErrorSums, mase_scale, naive_forecast, pearson, seasonal_naive_forecast


def test_hand_computed_mse_mae_per_step_and_channel():
    pred = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # [B=1, H=2, C=2]
    true = torch.tensor([[[0.0, 0.0], [0.0, 3.0]]])
    sums = ErrorSums(2, 2)
    sums.update(pred, true)
    out = sums.summary(std=torch.tensor([2.0, 10.0]), channel_names=["a", "b"])
    assert out["mse_norm"] == pytest.approx((1 + 4 + 9) / 4)
    assert out["mae_norm"] == pytest.approx((1 + 2 + 3) / 4)
    assert out["per_step"]["mse_norm"] == pytest.approx([0.5, 6.5])
    assert out["per_channel"]["b"]["mae_norm"] == pytest.approx(1.5)
    # Original units: each channel's error times its training std.
    assert out["mse"] == pytest.approx((4 * 1 + 4 * 4 + 100 * 9) / 4)
    assert out["per_channel"]["a"]["mae"] == pytest.approx(2 * 3 / 2)
    assert out["windows"] == 1


def test_metrics_do_not_depend_on_batch_size():
    gen = torch.Generator().manual_seed(0)
    pred, true = torch.randn(37, 5, 3, generator=gen), torch.randn(37, 5, 3, generator=gen)
    results = []
    for batch in (1, 4, 10, 37):
        sums = ErrorSums(5, 3)
        for i in range(0, 37, batch):
            sums.update(pred[i : i + batch], true[i : i + batch])
        results.append(sums.summary())
    for other in results[1:]:
        assert other["mse_norm"] == pytest.approx(results[0]["mse_norm"], rel=1e-12)
        assert other["per_step"]["mae_norm"] == pytest.approx(results[0]["per_step"]["mae_norm"], rel=1e-12)
    assert results[0]["mse_norm"] == pytest.approx(float(((pred.double() - true.double()) ** 2).mean()), rel=1e-12)
    # A mean of batch means would differ when the last batch is short (docs/conventions.md pitfall 2).
    batch_means = [((pred[i : i + 10] - true[i : i + 10]) ** 2).mean() for i in range(0, 37, 10)]
    assert float(torch.stack(batch_means).mean()) != pytest.approx(results[0]["mse_norm"], rel=1e-6)


def test_merge_equals_one_accumulator():
    a, b, both = ErrorSums(2, 1), ErrorSums(2, 1), ErrorSums(2, 1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 1, generator=gen), torch.randn(6, 2, 1, generator=gen)
    a.update(x[:2], y[:2])
    b.update(x[2:], y[2:])
    both.update(x, y)
    a.merge(b)
    merged, single = a.summary(), both.summary()
    assert merged["windows"] == single["windows"] == 6
    assert merged["per_step"]["mse_norm"] == pytest.approx(single["per_step"]["mse_norm"], rel=1e-12)


def test_shape_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError, match="do not match"):
        ErrorSums(2, 1).update(torch.zeros(1, 3, 1), torch.zeros(1, 3, 1))
    with pytest.raises(ValueError, match="no windows"):
        ErrorSums(2, 1).summary()


def test_naive_and_seasonal_naive_forecasts():
    x = torch.arange(1.0, 7.0).reshape(1, 6, 1)  # 1..6
    assert naive_forecast(x, 3).flatten().tolist() == [6, 6, 6]
    assert seasonal_naive_forecast(x, 5, 2).flatten().tolist() == [5, 6, 5, 6, 5]
    assert seasonal_naive_forecast(x, 2, 3).flatten().tolist() == [4, 5]
    with pytest.raises(ValueError, match="season length 7"):
        seasonal_naive_forecast(x, 2, 7)


def test_mase_scale_and_constant_series_guard():
    train = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0], [5.0, 2.0]])
    scale = mase_scale(train, 1)
    assert scale.tolist() == pytest.approx([(2 + 1 + 3) / 3, 0.0])
    sums = ErrorSums(1, 2)
    sums.update(torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[0.0, 0.0]]]))
    with pytest.warns(UserWarning, match="MASE undefined for channel 'b'"):
        out = sums.summary(channel_names=["a", "b"], mase_scale=scale)
    assert out["per_channel"]["a"]["mase"] == pytest.approx(1 / 2)
    assert out["per_channel"]["b"]["mase"] is None
    assert out["mase"] == pytest.approx(0.5)  # mean over channels where it is defined


def test_pearson_matches_numpy_and_guards_constant_input():
    gen = np.random.default_rng(0)
    a, b = gen.normal(size=50), gen.normal(size=50)
    assert pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-12)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert pearson(torch.ones(4), torch.arange(4.0)) is None
