"""Tiny recall data and a tiny model config shared by the engine, checkpoint, CLI and recall tests."""

from __future__ import annotations

from pathlib import Path

from data_recipes.recall import RecallSpec, prepare
from tasks.recall import RecallConfig
from titans_cli.engine.config import ModelConfig, RunConfig, RunSection, TrainConfig

TINY_SPEC = RecallSpec(
    seq_len=48, pairs=3, queries=3, vocab=8, min_gap=16, filler_vocab=8, n_train=24, n_val=8, n_test=10
)


def tiny_data(root: Path, spec: RecallSpec = TINY_SPEC) -> Path:
    """Write the tiny recall dataset under `root/data` and return its directory."""
    out = root / "data"
    prepare(spec, out)
    return out


def tiny_config(data: Path, variant: str = "lmm", **train: object) -> RunConfig:
    """A one-layer, 16-wide model that trains a step in milliseconds."""
    model = ModelConfig(
        variant=variant, dim=16, n_layers=1, heads=2, memory_depth=1, memory_expansion=1, chunk_size=8,
        window=8, segment_len=16, n_persistent=2, ffn_mult=1,
    )  # fmt: skip
    options = {"lr": 3e-3, "batch_size": 5, "epochs": 2, "log_every": 1, **train}
    return RunConfig(RunSection(task="recall", data=str(data)), model, TrainConfig(**options), RecallConfig())
