"""A task's metrics over one split: sequential loader that never drops a sample, batches moved to the device.

Used by the training loop (validation every epoch, test once from best.pt) and by `titans eval`
(`evaluate_run`: a run's best.pt on a split, or every sub-run and their summary). Tasks aggregate sums and
counts over every sample exactly once (docs/conventions.md pitfalls 1-2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from titans_cli.engine.config import read_toml
from titans_cli.engine.errors import TitansError, UsageError
from titans_cli.engine.runs import CHECKPOINTS, CONFIG, is_run_dir, resolve_in_run
from titans_cli.engine.runtime import autocast
from titans_cli.engine.task import EvalReport, SubRuns, Summarize, Task, TaskLookup


class DeviceLoader:
    """Wraps a DataLoader and moves every tensor of each batch dict to `device`; has `len()` and `dataset`."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.dataset = loader.dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def __len__(self) -> int:
        return len(self.loader)


def eval_loader(dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0) -> DeviceLoader:
    """In-order loader over every sample: no shuffling, and the last short batch is kept (`drop_last=False`)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    return DeviceLoader(loader, device)


def evaluate_split(
    task: Any,
    model: nn.Module,
    dataset: Dataset,
    meta: dict[str, Any],
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "32",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Run `task.evaluate` on `dataset` in eval mode without gradients; restore the model's mode afterwards.

    Returns:
        The task's metrics dict; its `task.primary_metric` entry is checked to be a float.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, precision):
            metrics = task.evaluate(model, eval_loader(dataset, batch_size, device, num_workers), meta)
    finally:
        model.train(was_training)
    value = metrics.get(task.primary_metric)
    if not isinstance(value, int | float):
        raise TitansError(f"task {task.name}: evaluate() returned no float {task.primary_metric!r}")
    metrics[task.primary_metric] = float(value)
    return metrics


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    """Strict improvement of a validation metric; NaN never improves."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def evaluate_run(
    run: Path,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    which: str = "best",
    device: str = "auto",
    batch_size: int = 0,
    opts: dict[str, str] | None = None,
    get_task: TaskLookup,
) -> dict[str, Any]:
    """`titans eval`: metrics of a run's checkpoint on one split, or of every sub-run plus their summary.

    Args:
        run: a run directory (or a .pt file); a directory of sub-runs evaluates each and calls
            `task.summarize(results)` when the task has it.
        split: "test" or "val". data_dir: overrides the config's `run.data`.
        which: "best" or "last" checkpoint. batch_size: 0 uses the run's evaluation batch size.
        opts: passed to `task.eval_report(loaded, split, data_dir, **opts)` when the task defines it.
        get_task: finds a run's task by its name (`tasks.get_task`).
    """
    from titans_cli.engine.checkpoint import load_run
    from titans_cli.engine.runtime import resolve_device

    if split not in ("test", "val"):
        raise UsageError(f"--split: expected test or val, got {split!r}")
    opts = dict(opts or {})
    if not run.exists():
        raise UsageError(f"--run {run}: no such run directory")
    subs = sorted(p for p in run.iterdir() if p.is_dir() and is_run_dir(p)) if run.is_dir() else []
    if subs and not (run / CHECKPOINTS).is_dir():
        _check_sub_runs(run, subs, get_task)
        results = {
            p.name: evaluate_run(
                p, split=split, data_dir=data_dir, which=which, device=device, batch_size=batch_size, opts=opts,
                get_task=get_task,
            )
            for p in subs
        }
        out: dict[str, Any] = {"run": str(run), "split": split, "sub_runs": results}
        task = _parent_task(run, get_task)
        if isinstance(task, Summarize):
            out["summary"] = task.summarize(results)
        return out
    loaded = load_run(run, which=which, device=resolve_device(device), get_task=get_task)
    task, cfg = loaded.task, loaded.cfg
    if data_dir is None:
        data_dir = resolve_in_run(loaded.run_dir, cfg.run.data)
        if not data_dir.is_dir():
            raise UsageError(
                f"run.data {str(data_dir)!r} (where {loaded.run_dir} was trained from) is gone; pass --data DIR"
            )
    elif not data_dir.is_dir():
        raise UsageError(f"--data {data_dir}: no such directory")
    if isinstance(task, EvalReport):
        metrics = task.eval_report(loaded, split, data_dir, **opts)
    else:
        if opts:
            raise UsageError(f"task {task.name} takes no --opt options")
        data = task.load(cfg, data_dir)
        dataset = data.test if split == "test" else data.val
        if dataset is None or len(dataset) == 0:
            raise UsageError(f"{data_dir}: has no {split} split")
        device_t = next(loaded.model.parameters()).device
        metrics = evaluate_split(
            task,
            loaded.model,
            dataset,
            loaded.meta,
            batch_size=batch_size or cfg.train.eval_batch_size or cfg.train.batch_size,
            device=device_t,
            precision=cfg.train.precision,
        )
    return {
        "run": str(loaded.run_dir),
        "checkpoint": loaded.checkpoint.name,
        "step": loaded.step,
        "split": split,
        **metrics,
    }


def _parent_task(run: Path, get_task: TaskLookup) -> Task:
    return get_task(str(read_toml(run / CONFIG, "--run").get("run", {}).get("task", "")))


def _check_sub_runs(run: Path, subs: list[Path], get_task: TaskLookup) -> None:
    """Every sub-run the parent's config lists must have finished: an average over the horizons that happen to
    exist would be reported as the whole table's."""
    from titans_cli.engine.config import loads_config

    task = _parent_task(run, get_task)
    if not isinstance(task, SubRuns):
        return
    cfg = loads_config((run / CONFIG).read_text(), lambda name: get_task(name).config_cls, str(run / CONFIG))
    expected = [name for name, _ in task.sub_runs(cfg)]
    have = {p.name for p in subs if (p / CHECKPOINTS / "best.pt").is_file()}
    missing = [name for name in expected if name not in have]
    if missing:
        raise TitansError(
            f"--run {run}: sub-run {', '.join(missing)} has no checkpoints/best.pt (failed or unfinished); "
            f"finish it with `titans train --resume {run}` or evaluate one sub-run with --run {run / expected[0]}"
        )
