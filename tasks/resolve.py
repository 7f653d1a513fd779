"""What `titans train` trains: the run config and the run directory, resolved from the command's layers.

Precedence: flags > `--set` > `--config FILE` > `--preset NAME` > the task's defaults (`TASK_DEFAULTS`) > the
dataclass defaults. `--resume RUN` starts from the run's saved config.toml and may change only what
`titans_cli.engine.config.RESUMABLE` allows. Here because it needs the task registry and the presets, which the
engine must not import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks import get_task
from tasks.presets import PRESETS, TASK_DEFAULTS
from titans_cli.engine.config import RunConfig, check_resume_changes, load_config, loads_config
from titans_cli.engine.errors import UsageError
from titans_cli.engine.runs import CONFIG, absolute_paths, default_run_name, is_run_dir


def _config_cls(task_name: str) -> type:
    return get_task(task_name).config_cls


def resolve_train(
    *,
    flags: Mapping[str, tuple[str, Any]],
    config: Path | None = None,
    preset: str | None = None,
    sets: Sequence[str] = (),
    resume: Path | None = None,
    out: Path | None = None,
) -> tuple[RunConfig, Path]:
    """The resolved run config and the run directory of one `titans train` call.

    Args:
        flags: `{"train.lr": ("--lr", 3e-4), ...}` for the options that were given (see `load_config`).
        config, preset, sets: `--config FILE`, `--preset NAME`, `--set section.key=value` items.
        resume: `--resume RUN`: RUN's saved config with the resumable changes of `flags` and `sets`.
        out: `--out DIR` (default runs/<name or task-variant-time>).
    """
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise UsageError("--resume continues RUN in place; drop --out")
        if config is not None or preset is not None:
            raise UsageError("--resume uses the run's saved config.toml; drop --config and --preset")
        saved = resume / CONFIG
        if not saved.is_file():
            raise UsageError(f"--resume {resume}: no {CONFIG}; is it a titans run directory?")
        cfg = load_config(resolve_task=_config_cls, config_file=saved, sets=sets, flags=flags)
        check_resume_changes(loads_config(saved.read_text(), _config_cls, str(saved)), cfg)
        return cfg, resume
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    preset_cfg = PRESETS[preset]() if preset else None
    layers = {"resolve_task": _config_cls, "config_file": config, "sets": sets, "flags": flags}
    cfg = load_config(preset=preset_cfg, preset_name=preset or "", **layers)
    if preset is None and cfg.run.task in TASK_DEFAULTS:
        # No preset: the task's own recipe is the lowest layer instead of the bare dataclass defaults.
        default = TASK_DEFAULTS[cfg.run.task]()
        cfg = load_config(preset=default, preset_name=f"the defaults of --task {cfg.run.task}", **layers)
    # Relative paths in a run's own config.toml are relative to that run (as everywhere inside a run).
    cfg = absolute_paths(cfg, config.parent if config is not None and is_run_dir(config.parent) else Path.cwd())
    return cfg, out or Path("runs") / (cfg.run.name or default_run_name(cfg.run.task, cfg.model.variant))
