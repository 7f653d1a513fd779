"""Stream training (`task.context_train = "stream"`): streams reproduce `--context all`, cover every window, train
and resume through the engine, and evaluate the whole past as one call per window would."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data_recipes import timeseries as ts
from tasks.forecast import TASK, ForecastConfig, window_datasets
from tasks.forecast_models import TitansForecaster
from tasks.forecast_stream import StreamKey, StreamWindows, stream_forecast, whole_past_errors
from tests.fixtures.timeseries import write_ett_slice
from titans_cli.backbone.model import Titans
from titans_cli.engine.config import ModelConfig, RunConfig, RunSection, TrainConfig, load_config
from titans_cli.engine.errors import UsageError
from titans_cli.engine.metrics import ErrorSums
from titans_cli.engine.train import TrainingInterrupted
from titans_cli.engine.train import run as train_run

TINY = ModelConfig(dim=16, n_layers=1, heads=2, memory_expansion=2, chunk_size=4, ffn_mult=2, n_persistent=2)
L, H = 24, 12


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fcs")
    src = write_ett_slice(root / "slice.csv", 400)
    ts.prepare(src, root / "prep", lookback=L, horizon=H)  # ratio split: 280 / 40 / 80 rows
    return root / "prep"


def _model(channels: int = 3) -> TitansForecaster:
    torch.manual_seed(1)
    return TitansForecaster(Titans(TINY), 16, channels, L, H, "variate", history_norm="block").eval()


def _cfg(data: Path, **train: object) -> RunConfig:
    t = ForecastConfig(lookback=L, horizon=(H,), context_train="stream")
    tc = TrainConfig(**{"lr": 3e-3, "batch_size": 8, "epochs": 2, "log_every": 1, **train})
    return RunConfig(run=RunSection(task="forecast", data=str(data)), model=TINY, train=tc, task=t)


def test_a_stream_step_after_blocks_0_to_k_equals_one_call_on_their_rows():
    x = torch.randn(2, 5 * L + 7, 3, generator=torch.Generator().manual_seed(0))  # a partial first block
    model = _model()
    with torch.no_grad():
        state = None
        for k in range(5):
            rows = x[:, 7 + k * L : 7 + (k + 1) * L]
            y, state = model.stream_step(rows, state)
            assert torch.allclose(y, model(x[:, : 7 + (k + 1) * L]), atol=1e-5), k
        assert not torch.allclose(y, model(x[:, -L:]), atol=1e-4)  # the past reaches the forecast


def test_history_blend_forecasts_the_mean_of_the_whole_past_and_the_window():
    x = torch.randn(2, 3 * L, 3, generator=torch.Generator().manual_seed(0))
    model = _model()
    with torch.no_grad():
        past, window = model(x), model(x[:, -L:])
        model.history_blend = True
        assert torch.allclose(model(x), (past + window) / 2) and torch.equal(model(x[:, -L:]), window)


def test_block_norm_frames_each_block_alone_and_equals_window_norm_on_one_window():
    x = torch.randn(2, 3 * L, 3, generator=torch.Generator().manual_seed(0))
    block, window = _model(), _model()
    window.history_norm = "window"
    with torch.no_grad():
        assert torch.allclose(block(x[:, -L:]), window(x[:, -L:]))  # one window: the same statistics
        shifted = x.clone()
        shifted[:, :L] = shifted[:, :L] * 5 + 3  # an earlier block in another frame
        assert torch.allclose(block(shifted), block(x), atol=1e-5)  # RevIN per block removes it
        assert not torch.allclose(window(shifted), window(x), atol=1e-3)


def test_streams_cover_every_training_window_once_per_epoch(prepared):
    data = TASK.load(_cfg(prepared), prepared)
    train = data.train
    assert isinstance(train, StreamWindows)
    for epoch in (0, 1):
        batches = train.epoch_batches(epoch, seed=0, batch_size=8)
        assert len(batches) == train.steps_per_epoch(8)
        windows = [k.window for b in batches for k in b]
        assert sorted(windows) == list(range(len(train)))  # every window start, once
        for prev, cur in zip(batches, batches[1:], strict=False):
            blocks = {k.window // L for k in cur}
            assert len(blocks) == 1 and len(cur) <= 8  # one block position per batch
            if next(iter(blocks)) > 0:  # a round goes on: the same streams (the longer ones), one block further
                assert [k.window for k in cur] == [k.window + L for k in prev][: len(cur)]
    assert train.epoch_batches(0, 0, 8) != train.epoch_batches(1, 0, 8)  # rounds drawn per epoch


def test_shorter_streams_sit_out_the_last_step_and_the_longer_ones_keep_their_state(prepared):
    train = TASK.load(_cfg(prepared), prepared).train  # 245 windows: phases 0-4 read 11 blocks, the rest 10
    batches = train.epoch_batches(0, seed=0, batch_size=8)
    end = next(i for i, b in enumerate(batches) if b[0].window // L == 10)
    assert sorted(k.window % L for k in batches[end]) == [0, 1, 2, 3, 4] and len(batches[end - 1]) == 8
    model, collate = _model(7), DataLoader(train).collate_fn
    round_ = batches[end - 10 : end + 1]
    with torch.no_grad():
        for b in round_:
            together = stream_forecast(model, collate([train[k] for k in b]))
        for b in round_:  # the same five streams without the others
            alone = stream_forecast(model, collate([train[k] for k in b[:5]]))
    assert torch.allclose(together, alone, atol=1e-5)


def test_a_resumed_round_carries_its_past_and_forecasts_as_an_uninterrupted_one(prepared):
    train = TASK.load(_cfg(prepared), prepared).train
    batches = train.epoch_batches(0, seed=0, batch_size=8)
    skip = next(i for i, b in enumerate(batches) if b[0].window // L == 3)  # block 3 of a round
    resumed = train.epoch_batches(0, seed=0, batch_size=8, skip=skip)
    assert [k.window for k in resumed[0]] == [k.window for k in batches[skip]] and resumed[0][0].past == 3
    assert not any(k.past for b in resumed[1:] for k in b)
    model, collate = _model(7), DataLoader(train).collate_fn
    with torch.no_grad():
        for b in batches[skip - 3 : skip + 1]:
            carried = stream_forecast(model, collate([train[k] for k in b]))
        del model._stream_carry
        rebuilt = stream_forecast(model, collate([train[k] for k in resumed[0]]))
        nxt = stream_forecast(model, collate([train[k] for k in resumed[1]]))  # continues the rebuilt state
    assert torch.allclose(carried, rebuilt, atol=1e-5)
    assert nxt.shape == carried.shape
    with pytest.raises(RuntimeError, match="does not continue"):
        stream_forecast(model, collate([train[k] for k in resumed[3]]))


@pytest.mark.parametrize("blend", [False, True])
def test_whole_past_errors_equal_one_call_per_window(prepared, blend):
    datasets, _, _ = window_datasets(prepared, L, H)
    test, model = datasets["test"], _model(7)
    model.history_blend = blend
    sums = whole_past_errors(model, test, batch_size=5)  # several batches of phases
    ref = ErrorSums(H, len(test.target_idx))
    with torch.no_grad():
        for i in range(len(test)):
            s = test.starts[i]
            ref.update(model(test.values[None, : s + L]).index_select(2, test.target_idx), test[i]["y"][None])
    assert sums.count == ref.count == len(test)
    assert sums.mse() == pytest.approx(ref.mse(), rel=1e-5) and sums.mae() == pytest.approx(ref.mae(), rel=1e-5)


def test_stream_training_selects_on_the_whole_past_and_resumes_to_the_same_model(prepared, tmp_path):
    result = train_run(_cfg(prepared), TASK, tmp_path / "a", quiet=True)
    steps = TASK.load(_cfg(prepared), prepared).train.steps_per_epoch(8)
    assert result["steps"] == 2 * steps
    assert {"mse_norm", "window_mse_norm"} <= result["test"].keys() and result["test"]["windows"] == 69
    assert result["test"]["mse_norm"] != result["test"]["window_mse_norm"]

    def stop(step: int) -> bool:
        return step == steps + 5  # inside a round of the second epoch

    with pytest.raises(TrainingInterrupted):
        train_run(_cfg(prepared), TASK, tmp_path / "b", quiet=True, should_stop=stop)
    resumed = train_run(_cfg(prepared), TASK, tmp_path / "b", resume=True, quiet=True)
    # The resumed round re-reads its streams' past with the weights of the resume step (the uninterrupted run
    # read it step by step with older ones), so the two runs agree closely rather than bit for bit.
    assert resumed["test"]["mse_norm"] == pytest.approx(result["test"]["mse_norm"], rel=0.05)
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 2 * steps + 1))

    # bench/forecast.py --context-check on the run: one block of past is the window alone.
    bench = Path(__file__).resolve().parents[2] / "bench" / "forecast.py"
    cmd = [sys.executable, str(bench), "--threads", "1", "--context-check", str(tmp_path / "a"), "--cutoffs", "3"]
    done = subprocess.run([*cmd, "--context-blocks", "1,2"], capture_output=True, text=True, check=True)
    check = json.loads(done.stderr.strip().splitlines()[-1])
    assert check["test_mse_1_blocks"] == check["test_mse_window"] != check["test_mse_all"]
    assert {"test_mse_2_blocks", "test_mae_2_blocks"} <= check.keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_train": "stream", "layout": "patch"}, "task.context_train: streams need task.layout = 'variate'"),
        ({"context_train": "stream", "context": 96}, "task.context_train: streams read the whole past"),
        ({"context_train": "both", "model": "dlinear"}, "task.context_train: streams train the titans model"),
    ],
)
def test_stream_config_errors_name_the_field(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ForecastConfig(**kwargs)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("task.context_train=streams", "task.context_train: expected one of 'window', 'stream', 'both', got"),
        ("task.stream_segment=-1", "task.stream_segment: must be >= 0 blocks"),
    ],
)
def test_a_bad_setting_is_a_one_line_error_naming_it(prepared, setting, message):
    with pytest.raises(UsageError, match=message) as err:
        load_config(resolve_task=lambda _n: ForecastConfig, preset=_cfg(prepared), sets=[setting])
    assert "\n" not in str(err.value)


def test_window_training_is_unchanged_by_default(prepared):
    cfg = dataclasses.replace(_cfg(prepared), task=ForecastConfig(lookback=L, horizon=(H,)))
    data = TASK.load(cfg, prepared)
    assert not isinstance(data.train, StreamWindows)
    assert TASK.build_model(cfg, data.meta).history_norm == "window"
    assert StreamKey(3).past == 0


def test_both_adds_a_shuffled_window_batch_covering_every_window_once(prepared):
    cfg = dataclasses.replace(_cfg(prepared), task=ForecastConfig(lookback=L, horizon=(H,), context_train="both"))
    data = TASK.load(cfg, prepared)
    batches = data.train.epoch_batches(0, seed=0, batch_size=8)
    companions = [k.companion for b in batches for k in b]
    assert sorted(companions) == list(range(len(data.train)))
    first = companions[:8]
    assert max(first) - min(first) > 2 * L  # spread over the split, unlike the streams' windows
    batch = DataLoader(data.train).collate_fn([data.train[k] for k in batches[0]])
    assert torch.equal(batch["x_window"][0], data.train.windows[batches[0][0].companion]["x"])
    model = TASK.build_model(cfg, data.meta)
    stream_only = {k: v for k, v in batch.items() if not k.endswith("_window")}
    both = TASK.loss(model, batch)  # block 0: each call starts its streams afresh
    assert both.requires_grad and not torch.isclose(both, TASK.loss(model, stream_only))


def test_segments_cover_every_window_once_mix_times_and_read_their_burn_in(prepared):
    t = ForecastConfig(lookback=L, horizon=(H,), context_train="stream", stream_segment=4)
    cfg = dataclasses.replace(_cfg(prepared), task=t)
    train = TASK.load(cfg, prepared).train
    batches = train.epoch_batches(0, seed=0, batch_size=8)
    assert len(batches) == train.steps_per_epoch(8) == len(train.epoch_batches(1, seed=0, batch_size=8))
    assert sorted(k.window for b in batches for k in b) == list(range(len(train)))
    firsts = [b for b in batches if b[0].past]  # the first step of a round with burn-in
    assert firsts and all(k.past == 4 and k.window // L >= 4 for b in firsts for k in b)
    assert max(max(k.window for k in b) - min(k.window for k in b) for b in firsts) > 2 * L  # mixed times
    model, collate = _model(7), DataLoader(train).collate_fn
    start = batches.index(firsts[0])
    with torch.no_grad():
        for b in batches[start : start + 3]:  # burn-in, then two carried steps
            y = stream_forecast(model, collate([train[k] for k in b]))
        first, state = batches[start + 2][0].window - 2 * L, None  # the first row's segment starts at `first`
        for j in range(-4, 3):  # that segment by itself, block by block from its burn-in on
            s = train.windows.starts[first] + j * L
            alone, state = model.stream_step(train.windows.values[None, s : s + L], state)
    assert torch.allclose(y[:1], alone, atol=1e-5)
