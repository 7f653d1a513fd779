"""The training loop's contract beyond one plain run: early stopping, divergence, sub-runs and their summary."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import tasks
from tasks import get_task
from tasks.recall import RecallTask
from tests.recall_fixtures import tiny_config, tiny_data
from titans_cli.cli import app
from titans_cli.engine.checkpoint import read_checkpoint
from titans_cli.engine.errors import TitansError, UsageError
from titans_cli.engine.evaluate import evaluate_run
from titans_cli.engine.runs import read_jsonl
from titans_cli.engine.train import run


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
    report = evaluate_run(tmp_path / "r", device="cpu", get_task=get_task)
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


# ---- crash safety and torchrun: real processes (SIGKILL, torchrun), so these start subprocesses ------------
RECALL_CLI = ["--task", "recall", "--preset", "recall_tiny", "--set", "model.dim=16", "--set", "train.log_every=1"]


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "titans_cli", *map(str, args)]


def _env(threads: int | None = None) -> dict[str, str]:
    # The same thread count as this process: float sums, and so bit-identical metrics, depend on it.
    return {**os.environ, "OMP_NUM_THREADS": str(threads or torch.get_num_threads())}


def _invoke(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_sigkill_then_resume_reaches_the_metrics_of_an_uninterrupted_run(data, tmp_path):
    steps = ["--max-steps", 60, "--set", "train.eval_every=25", "--set", "train.batch_size=4"]
    _invoke("train", *RECALL_CLI, "--data", data, "--out", tmp_path / "straight", *steps, "-q")
    killed = tmp_path / "killed"
    save_often = ["--set", "train.save_every=1e-6"]  # last.pt after every step: the kill lands between saves
    proc = subprocess.Popen(_cli("train", *RECALL_CLI, "--data", data, "--out", killed, *steps, *save_often, "-q"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "last.pt").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.01)
        # One writer per run directory: a second train on the same --out is refused, naming the holder.
        second = CliRunner().invoke(app, ["train", *RECALL_CLI, "--data", str(data), "--out", str(killed)])
        assert second.exit_code == 2 and f"PID {proc.pid}" in second.stderr, second.output
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    step = read_checkpoint(killed / "checkpoints" / "last.pt")["step"]
    assert 0 < step < 60 and not (killed / "metrics.json").exists()
    (killed / "checkpoints" / ".last.pt.cut.tmp").write_bytes(b"PK")  # as a kill during a save leaves it
    _invoke("train", "--resume", killed, "-q")
    assert not list(killed.rglob("*.tmp")) and not (killed / ".lock").exists()
    for name in ("metrics.json", "metrics.jsonl"):
        assert (killed / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    # Killed before the first save: only config.toml (and rows of metrics.jsonl) survive; --resume starts over.
    shutil.rmtree(killed / "checkpoints")
    (killed / "metrics.json").unlink()
    _invoke("train", "--resume", killed, "-q")
    for name in ("metrics.json", "metrics.jsonl"):
        assert (killed / name).read_text() == (tmp_path / "straight" / name).read_text(), name


def test_torchrun_two_workers_at_half_batch_follow_one_process_and_resume(data, tmp_path):
    """2 gloo workers with batch 2 each = 1 process with batch 4: same loss curve to float tolerance; then
    --resume under torchrun continues as --resume does in one process."""
    common = [*RECALL_CLI, "--data", data, "--set", "train.eval_every=3", "-q"]
    _invoke("train", *common, "--out", tmp_path / "one", "--batch-size", 4, "--max-steps", 5)
    _invoke("train", "--resume", tmp_path / "one", "--max-steps", 8, "-q")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "titans_cli"]
    for args in (["train", *common, "--out", tmp_path / "two", "--batch-size", 2, "--max-steps", 5],
                 ["train", "--resume", tmp_path / "two", "--max-steps", 8, "-q"]):  # fmt: skip
        done = subprocess.run([*torchrun, *map(str, args)], env=_env(1), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
    assert json.loads((tmp_path / "two" / "env.json").read_text())["workers"] == 2  # (rows once: rank 0 wrote)
    alone = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "two"), "--max-steps", "9"])
    assert alone.exit_code == 2 and "trained with 2 worker(s), now 1" in alone.stderr, alone.output


def test_progress_lines_outside_a_terminal(data, tmp_path):
    result = CliRunner().invoke(app, ["train", *RECALL_CLI, "--data", str(data), "--out", str(tmp_path / "r"),
                                      "--max-steps", "3", "--set", "train.progress_every=0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ") and "steps/s" in line]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"] and all("ETA" in line for line in lines)
