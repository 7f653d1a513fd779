"""The training loop's contract beyond one plain run: early stopping, divergence, sub-runs and their summary."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tasks
from tasks.recall import RecallTask
from tests.recall_fixtures import tiny_config, tiny_data
from titans_cli.checkpoint import read_checkpoint
from titans_cli.errors import TitansError, UsageError
from titans_cli.evaluate import evaluate_run
from titans_cli.runs import read_jsonl
from titans_cli.train import run


class FlatRecall(RecallTask):
    """Recall whose validation accuracy never improves after the first evaluation."""

    def evaluate(self, model, loader, meta):
        metrics = super().evaluate(model, loader, meta)
        return {**metrics, "accuracy": 0.5}


class DivergingRecall(RecallTask):
    def loss(self, model, batch):
        return super().loss(model, batch) * torch.tensor(float("nan"))


class TwoLearningRates(RecallTask):
    """Trains one model per learning rate into RUN/<name>/ and averages their test accuracy."""

    def sub_runs(self, cfg):
        return [
            (f"lr{lr:g}", dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))) for lr in (1e-3, 3e-3)
        ]

    def summarize(self, results):
        return {"mean_accuracy": sum(r["accuracy"] for r in results.values()) / len(results), "runs": sorted(results)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("recall"))


def test_early_stopping_after_patience_evaluations_without_improvement(data, tmp_path):
    result = run(tiny_config(data, epochs=6, patience=2), FlatRecall(), tmp_path / "r", quiet=True)
    val_steps = [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["split"] == "val"]
    assert val_steps == [5, 10, 15]  # best at 5, then two evaluations without improvement
    assert result["stopped_early"] and result["best_step"] == 5 and result["steps"] == 15
    with pytest.raises(UsageError, match="nothing to do, it stopped early"):
        run(tiny_config(data, epochs=6, patience=2), FlatRecall(), tmp_path / "r", resume=True, quiet=True)
    more = run(tiny_config(data, epochs=6, patience=4), FlatRecall(), tmp_path / "r", resume=True, quiet=True)
    assert more["stopped_early"] and more["steps"] == 25  # two more evaluations without improvement


def test_divergence_is_a_clear_runtime_error(data, tmp_path):
    with pytest.raises(TitansError, match="training diverged: loss is nan at step 1") as info:
        run(tiny_config(data), DivergingRecall(), tmp_path / "r", quiet=True)
    assert info.value.exit_code == 1


def test_sub_runs_train_one_model_each_and_are_summarized(data, tmp_path, monkeypatch):
    task = TwoLearningRates()
    result = run(tiny_config(data, epochs=1), task, tmp_path / "r", quiet=True)
    assert sorted(result["sub_runs"]) == ["lr0.001", "lr0.003"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary == result["summary"] and summary["runs"] == ["lr0.001", "lr0.003"]
    for name, lr in (("lr0.001", 0.001), ("lr0.003", 0.003)):
        assert f"lr = {lr}" in (tmp_path / "r" / name / "config.toml").read_text()
        assert (tmp_path / "r" / name / "checkpoints" / "best.pt").is_file()
    # `titans eval` on the parent evaluates every sub-run and summarizes through the same task hook.
    monkeypatch.setitem(tasks.TASKS, "two-lr", f"{__name__}:TWO_LR")
    cfg_text = (tmp_path / "r" / "config.toml").read_text().replace('task = "recall"', 'task = "two-lr"')
    (tmp_path / "r" / "config.toml").write_text(cfg_text)
    report = evaluate_run(tmp_path / "r", device="cpu")
    assert report["summary"]["mean_accuracy"] == pytest.approx(summary["mean_accuracy"])
    assert {r["split"] for r in report["sub_runs"].values()} == {"test"}


TWO_LR = TwoLearningRates()


def test_memory_warmup_holds_the_gated_branch_fixed_then_trains_it(data, tmp_path):
    """train.memory_warmup=N: MAG's W (zero-initialised here) gets no step for N steps, so the block is its memory
    alone; from step N + 1 on W trains."""

    def proj_weights(steps: int, name: str) -> list[torch.Tensor]:
        cfg = tiny_config(data, variant="mag", max_steps=steps, memory_warmup=3, eval_every=steps)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory_residual=True, attn_branch_init=0.0))
        run(cfg, RecallTask(), tmp_path / name, quiet=True)
        state = read_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]
        return [v for k, v in state.items() if k.endswith(".proj.weight")]

    held = proj_weights(3, "held")
    assert held and all(w.abs().sum() == 0 for w in held)
    assert all(w.abs().sum() > 0 for w in proj_weights(4, "joined"))
