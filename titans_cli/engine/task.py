"""The Task protocol: what a task plugin supplies to the one training engine (`titans_cli.engine.train`).

A task owns its data, its input embedding and head, its loss, its metrics and its predictions; the backbone
(`titans_cli.backbone.model.Titans`) never knows which task it serves. This file holds the interface only: the
engine receives a `Task` (`train.run`) or a `TaskLookup` (`checkpoint.load_run`, `evaluate.evaluate_run`) from its
caller and never imports the `tasks` package (tests/test_layers.py). The optional hooks are their own protocols,
`SubRuns`, `Summarize` and `EvalReport`; the engine tests for them with `isinstance`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]


@dataclass
class TaskData:
    """Splits as map-style datasets that yield `Batch`-shaped dicts of tensors (one sample each).

    `meta` is JSON-serialisable and is stored in every checkpoint (scaler statistics, alphabet, classes,
    column order, ...), so a run can be rebuilt from its checkpoint alone.
    """

    train: Dataset
    val: Dataset
    test: Dataset | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A task plugin. Implementations are plain objects registered in `tasks.TASKS`."""

    name: str
    config_cls: type  # frozen dataclass for the `[task]` section of the run config
    primary_metric: str  # validation metric used for early stopping and best.pt
    higher_is_better: bool

    def load(self, cfg: Any, data_dir: Path) -> TaskData:
        """Read prepared data (from `titans prepare`) and return the splits plus checkpoint metadata."""
        ...

    def build_model(self, cfg: Any, meta: dict[str, Any]) -> nn.Module:
        """Embedding + backbone + head (or a baseline model) for this task."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss for one batch (mean over the batch's samples)."""
        ...

    def evaluate(self, model: nn.Module, loader: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """Metrics over every sample of `loader` exactly once (sums and counts, never means of batch means).

        Must contain `primary_metric` as a float; other values must be JSON-serialisable.
        """
        ...


TaskLookup = Callable[[str], Task]  # a task name -> its Task (`tasks.get_task`; raises UsageError if unknown)


@runtime_checkable
class SubRuns(Protocol):
    """Optional: a task whose one config trains several models (forecast: one per horizon) into sub-runs."""

    def sub_runs(self, cfg: Any) -> list[tuple[str, Any]]:
        """(sub-directory name, its config) per model; an empty list trains one model in the run directory."""
        ...


@runtime_checkable
class Summarize(Protocol):
    """Optional: the summary of a run's sub-runs (training writes it to summary.json; `titans eval` prints it)."""

    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """`results`: each sub-run's metrics (training) or `eval_report` (evaluation), keyed by its name."""
        ...


@runtime_checkable
class EvalReport(Protocol):
    """Optional: `titans eval`'s full report on one split, in place of `Task.evaluate` on it (`--opt KEY=VALUE`
    options arrive as keyword arguments)."""

    def eval_report(
        self, loaded: Any, split: str = "test", data_dir: Path | None = None, **opts: Any
    ) -> dict[str, Any]:
        """`loaded` is the `checkpoint.LoadedRun`; returns JSON-able metrics."""
        ...


@runtime_checkable
class OrderedBatches(Protocol):
    """Optional, on a train dataset: it fixes its own batches in place of the engine's seeded shuffle (stateful
    training: forecast streams carry a memory state from one batch to the next, so batch t + 1 must continue
    batch t). Trained by one process only."""

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches of every epoch."""
        ...

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, skip: int) -> list[list[Any]]:
        """The keys (`dataset[key]`) of each batch of `epoch` from batch `skip` on: a pure function of its
        arguments, so a run resumed at step `skip` of an epoch trains on the samples an uninterrupted one would
        (its first batch may bring what the skipped ones would have left behind, e.g. a stream's past)."""
        ...
