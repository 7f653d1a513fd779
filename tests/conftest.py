"""Shared test set-up: the Triton interpreter, the `gpu` skip and a NaN-filled `torch.empty`.

- Without CUDA the Triton kernels run in Triton's CPU interpreter, which must be switched on before the kernel
  module is imported: `TRITON_INTERPRET=1` is set here, before any test module is collected.
- Tests marked `gpu` are skipped where there is no CUDA device.
- `nan_empty`: `torch.empty`, `torch.empty_like` and `Tensor.new_empty` return floating tensors filled with NaN,
  so a kernel that reads a buffer it never wrote fails loudly instead of reading whatever memory held.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _nan_filled(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    return wrapper


@pytest.fixture
def nan_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uninitialised float buffers hold NaN for the duration of the test."""
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))
