"""titans: train and evaluate Titans (neural long-term memory) models on genomics and time series.

The Python API, for research code that imports rather than shells out (the `titans` command is the other door):

    Titans(cfg)                  the backbone, [B, T, dim] -> [B, T, dim], for a `ModelConfig` (variants lmm, mac,
                                 mag, mal, attn); `y, state = model(x, state)` continues earlier sequences
    NeuralMemory(dim, heads)     the memory layer alone; keyword arguments as `MemorySettings` (defaults: ModelConfig)
    memory_update(q, k, v, ...)  the memory-update op (kernels naive, torch, triton; see its module)
    ModelConfig, MemorySettings, MemoryState

Example:
    >>> import torch
    >>> from titans_cli import ModelConfig, NeuralMemory, Titans
    >>> model = Titans(ModelConfig(variant="mac", dim=64, heads=4, n_layers=2))
    >>> y, state = model(torch.randn(2, 256, 64))
    >>> memory = NeuralMemory(dim=64, heads=4, depth=2, chunk_size=16)
    >>> o, mem_state = memory(torch.randn(2, 256, 64))

The names are imported on first use, so `titans --help` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "Titans": "titans_cli.backbone.model",
    "NeuralMemory": "titans_cli.backbone.memory",
    "MemorySettings": "titans_cli.backbone.memory",
    "ModelConfig": "titans_cli.backbone.config",
    "memory_update": "titans_cli.backbone.ops.memory_update",
    "MemoryState": "titans_cli.backbone.ops.memory_update",
}
__all__ = ["MemorySettings", "MemoryState", "ModelConfig", "NeuralMemory", "Titans", "__version__", "memory_update"]

if TYPE_CHECKING:
    from titans_cli.backbone.config import ModelConfig
    from titans_cli.backbone.memory import MemorySettings, NeuralMemory
    from titans_cli.backbone.model import Titans
    from titans_cli.backbone.ops.memory_update import MemoryState, memory_update


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'titans_cli' has no attribute {name!r}")
