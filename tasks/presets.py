"""Typed presets: named functions returning a complete RunConfig (`titans train --preset NAME`).

A preset is the lowest layer of a config (below `--config`, `--set` and flags). One function per preset with a
one-line docstring saying what it is for, and one `PRESETS` entry each; add yours at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tasks.recall import RecallConfig
from titans_cli.engine.config import ModelConfig, RunConfig, RunSection, TrainConfig


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


def _recall_model() -> ModelConfig:
    # One memory head of width 64 with a matrix memory (L_M = 1), chunks of 16; every memory setting (θ_max, η_max,
    # step scale, clamp) at its default.
    return ModelConfig(
        dim=64, n_layers=2, heads=1, memory_depth=1, chunk_size=16, window=64, segment_len=64, n_persistent=4,
        ffn_mult=2,
    )  # fmt: skip


def _recall_run(lr: float, max_steps: int, eval_every: int) -> RunConfig:
    # Both stages of the recall claim train the same model with batch 8 and no weight decay.
    train = TrainConfig(
        lr=lr, weight_decay=0.0, batch_size=8, max_steps=max_steps, warmup=0.05, eval_every=eval_every,
        eval_batch_size=50, log_every=25,
    )  # fmt: skip
    return RunConfig(run=RunSection(task="recall"), model=_recall_model(), train=train, task=RecallConfig())


def recall_256() -> RunConfig:
    """Recall claim, stage 1: learn the task on 256-token sequences (pairs > 128 tokens before the queries)."""
    return _recall_run(lr=3e-3, max_steps=1200, eval_every=300)


def recall_1k() -> RunConfig:
    """Recall claim, stage 2: continue (--init-from a recall_256 run) on 1024-token sequences, window 64."""
    return _recall_run(lr=1e-3, max_steps=300, eval_every=100)


def forecast_tiny() -> RunConfig:
    """CPU smoke run of forecast on a few hundred rows (seconds): lookback 24, horizon 12, one narrow layer."""
    from tasks.forecast import ForecastConfig

    return RunConfig(
        run=RunSection(task="forecast"),
        model=ModelConfig(dim=16, n_layers=1, heads=2, memory_expansion=2, chunk_size=4, n_persistent=2, ffn_mult=2),
        train=TrainConfig(lr=3e-3, batch_size=16, epochs=1, warmup=0.1, log_every=1),
        task=ForecastConfig(lookback=24, horizon=(12,), patch_len=8, patch_stride=4),
    )


def _forecast_lmm() -> ModelConfig:
    # A small LMM for 2 CPU cores; the paper gives no size for its forecaster (docs/design.md §6.1, A20).
    # chunk_size 4 was chosen before the bounds of docs/design.md §12 (chunks of 8 or 16 then diverged over a whole
    # file of context); with variate tokens a sequence is only 4 persistent + C channel tokens long: cheap.
    return ModelConfig(
        variant="lmm", dim=64, n_layers=2, heads=4, memory_expansion=2, chunk_size=4, n_persistent=4, ffn_mult=2
    )


def forecast_small() -> RunConfig:
    """The README's main job on bundled ETTh1 (minutes on 2 CPU cores): lookback 96, horizon 96, small LMM."""
    from tasks.forecast import ForecastConfig

    return RunConfig(
        run=RunSection(task="forecast"),
        model=_forecast_lmm(),
        train=TrainConfig(lr=1e-3, batch_size=32, max_steps=600, eval_every=200, eval_batch_size=1024, log_every=50),
        task=ForecastConfig(lookback=96, horizon=(96,)),
    )


def forecast_default() -> RunConfig:
    """What `titans train --task forecast` starts from without --preset: `forecast_paper` at one horizon (96)."""
    base = forecast_paper()
    return dataclasses.replace(base, task=dataclasses.replace(base.task, horizon=(96,)))


def forecast_paper() -> RunConfig:
    """Table 3 protocol: lookback 96, horizons 96/192/336/720, LMM, early stopping on validation MSE."""
    from tasks.forecast import ForecastConfig

    return RunConfig(
        run=RunSection(task="forecast"),
        model=_forecast_lmm(),
        # Evaluation batches of 1,024: forward-only, and the per-window cost falls with the batch on the CPU.
        train=TrainConfig(lr=1e-3, batch_size=32, epochs=4, patience=2, eval_batch_size=1024, log_every=50),
        task=ForecastConfig(lookback=96, horizon=(96, 192, 336, 720)),
    )


def forecast_long() -> RunConfig:
    """forecast_default trained for `titans forecast --context all`: streams through the carried memory state plus
    windows read alone, 32-block segments, whole-past and window forecasts averaged (docs/forecasting.md)."""
    base = forecast_default()
    task = dataclasses.replace(base.task, context_train="both", stream_segment=32, history_blend=True)
    return dataclasses.replace(base, task=task)


def dna_tiny() -> RunConfig:
    """CPU smoke run of DNA classification on the GUE fixture (seconds): one narrow LMM layer."""
    from tasks.dna import DnaConfig

    return RunConfig(
        run=RunSection(task="dna"),
        model=ModelConfig(dim=16, n_layers=1, heads=2, chunk_size=16, memory_expansion=2, n_persistent=2, ffn_mult=2),
        train=TrainConfig(lr=3e-3, batch_size=16, epochs=1, warmup=0.1, log_every=1),
        task=DnaConfig(),
    )


def dna_cnn() -> RunConfig:
    """The GenomicBenchmarks CNN baseline as its authors train it: Adam, constant lr 1e-3, 10 epochs."""
    from tasks.dna import DnaConfig

    return RunConfig(
        run=RunSection(task="dna"),
        model=ModelConfig(),  # unused by the CNN
        train=TrainConfig(
            lr=1e-3, weight_decay=0.0, beta2=0.999, batch_size=64, epochs=10, warmup=0, min_lr_ratio=1.0, log_every=20
        ),
        task=DnaConfig(model="cnn"),
    )


def dna_tata() -> RunConfig:
    """Titans MAG for promoter-length DNA (`titans train --task dna` without a preset): 2 layers of width 64,
    window 32, linear memory, max pooling in 16 bins, lr 2e-3, 8 epochs, early stopping after 3.

    MAG rather than the paper's LMM: the sliding window reads a promoter's short motifs (TATA box) directly; on the
    validation split of GUE prom_300_tata it reached MCC 0.809 where the LMM recipe below plateaued at 0.71 and the
    CNN at 0.731 (docs/results.md, DNA).
    """
    base = dna_tata_lmm()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, variant="mag", window=32),
        train=dataclasses.replace(base.train, epochs=8, patience=3),
    )


def dna_tata_lmm() -> RunConfig:
    """Titans LMM (the paper's DNA model) on GUE prom_300_tata: 2 layers of width 64, max pooling in 16 bins.

    Linear memory (L_M = 1): it learned faster than the MLP memory (L_M = 2) at lr 1e-3.
    """
    from tasks.dna import DnaConfig

    return RunConfig(
        run=RunSection(task="dna"),
        model=ModelConfig(dim=64, n_layers=2, heads=4, memory_depth=1, chunk_size=16),
        train=TrainConfig(lr=2e-3, batch_size=32, epochs=12, patience=4, log_every=20),
        task=DnaConfig(pooling="max", bins=16),
    )


def _hybrid(base: RunConfig, **model: object) -> RunConfig:
    # MAC and MAG on the recall claim: the memory output as its own residual branch (memory_residual), MAC writing
    # the residual stream (mac_write), and W of the gated attention branch zero at start (attn_branch_init=0).
    hybrid = dataclasses.replace(base.model, memory_residual=True, mac_write="residual", attn_branch_init=0.0, **model)
    return dataclasses.replace(base, model=hybrid)


def recall_256_hybrid() -> RunConfig:
    """Recall stage 1 for MAC/MAG: recall_256 with the memory on the residual stream, trained alone for 600 steps.

    The weights carrying attention into the block start at zero and stay there for the first 600 steps
    (model.attn_branch_init, train.memory_warmup), so the block starts learning recall as its memory alone, as LMM
    does. Exploratory (README, Recall): with 2,400 steps (bench --stage1-steps) MAG reached 100% at 1,024 tokens on
    seeds 0-2; MAC reached >= 99.5% on seeds 0 and 1 with these 1,200 steps, not on seed 2.
    """
    cfg = _hybrid(recall_256())
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, memory_warmup=600))


def recall_1k_hybrid() -> RunConfig:
    """Recall stage 2 for MAC/MAG (--init-from a recall_256_hybrid run): inner-loss clamp 1.0 at 1024 tokens."""
    return _hybrid(recall_1k(), inner_clip=1.0)


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "recall_tiny": recall_tiny,
    "recall_256": recall_256,
    "recall_1k": recall_1k,
    "forecast_tiny": forecast_tiny,
    "forecast_small": forecast_small,
    "forecast_paper": forecast_paper,
    "forecast_default": forecast_default,
    "forecast_long": forecast_long,
    "dna_tiny": dna_tiny,
    "dna_cnn": dna_cnn,
    "dna_tata": dna_tata,
    "dna_tata_lmm": dna_tata_lmm,
    "recall_256_hybrid": recall_256_hybrid,
    "recall_1k_hybrid": recall_1k_hybrid,
}


# What `titans train --task NAME` starts from when no --preset is given (the lowest config layer). A task missing
# here starts from the dataclass defaults.
TASK_DEFAULTS: dict[str, Callable[[], RunConfig]] = {
    "dna": dna_tata,
    # Early stopping (patience 2, at most 4 epochs): the dataclass defaults train 10 epochs with no patience.
    "forecast": forecast_default,
}
