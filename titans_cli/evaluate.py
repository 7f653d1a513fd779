"""A task's metrics over one split: sequential loader that never drops a sample, batches moved to the device.

Used by the training loop (validation every epoch, test once from best.pt) and by `titans eval`. Tasks
aggregate sums and counts over every sample exactly once (conventions pitfalls 1-2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from titans_cli.errors import TitansError
from titans_cli.runtime import autocast


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
