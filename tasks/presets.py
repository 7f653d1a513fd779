"""Typed presets: named functions returning a complete RunConfig (`titans train --preset NAME`).

A preset is the lowest layer of a config (below `--config`, `--set` and flags). One function per preset with a
one-line docstring saying what it is for, and one `PRESETS` entry each; add yours at the end.
"""

from __future__ import annotations

from collections.abc import Callable

from tasks.recall import RecallConfig
from titans_cli.config import ModelConfig, RunConfig, RunSection, TrainConfig


def recall_tiny() -> RunConfig:
    """CPU smoke run of recall on tiny data (seconds): one narrow layer, short chunks and window."""
    return RunConfig(
        run=RunSection(task="recall"),
        model=ModelConfig(
            dim=32,
            n_layers=1,
            heads=2,
            memory_expansion=2,
            chunk_size=8,
            window=16,
            segment_len=16,
            n_persistent=2,
            ffn_mult=2,
        ),
        train=TrainConfig(lr=3e-3, batch_size=8, epochs=2, warmup=0.1, log_every=1),
        task=RecallConfig(),
    )


def recall_1k() -> RunConfig:
    """The recall claim (issue 2 §5): sequences of 1024 with attention window 64, small enough for 2 CPU cores."""
    return RunConfig(
        run=RunSection(task="recall"),
        model=ModelConfig(
            dim=64,
            n_layers=2,
            heads=2,
            memory_depth=2,
            memory_expansion=2,
            chunk_size=16,
            window=64,
            segment_len=64,
            n_persistent=4,
            ffn_mult=2,
        ),
        train=TrainConfig(lr=3e-3, weight_decay=0.0, batch_size=16, epochs=4, warmup=0.05, log_every=10),
        task=RecallConfig(),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "recall_tiny": recall_tiny,
    "recall_1k": recall_1k,
}
