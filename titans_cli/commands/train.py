"""`titans train`: resolve the run config (flags > --set > --config > --preset > defaults) and run the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, emit_result
from titans_cli.engine.errors import UsageError


def train(
    task: Annotated[str | None, typer.Option(help="Task to train: recall, forecast, dna, dna-lm.")] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared data directory (from `titans prepare`).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<task>-<variant>-<UTC time>).")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with run, model, train and task tables.")] = None,
    preset: Annotated[str | None, typer.Option(help="Named preset from tasks/presets.py, e.g. recall_tiny.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override one field, section.key=value (repeatable).")
    ] = None,
    variant: Annotated[str | None, typer.Option(help="Backbone: lmm, mac, mag, mal or attn (model.variant).")] = None,
    kernel: Annotated[
        str | None, typer.Option(help="Memory-update path: torch, naive (per-token reference), triton, auto.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="task.model, for tasks that have it.")] = None,
    lookback: Annotated[int | None, typer.Option(help="task.lookback, for tasks that have it.")] = None,
    horizon: Annotated[str | None, typer.Option(help="task.horizon, e.g. 96 or 96,192,336,720.")] = None,
    rc_aug: Annotated[
        bool | None, typer.Option("--rc-aug/--no-rc-aug", help="task.rc_aug: reverse-complement augmentation.")
    ] = None,
    init_from: Annotated[Path | None, typer.Option(help="Run whose best.pt gives backbone.*/embed.* weights.")] = None,
    epochs: Annotated[int | None, typer.Option(help="train.epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="train.max_steps (overrides epochs when > 0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="train.batch_size.")] = None,
    lr: Annotated[float | None, typer.Option(help="train.lr: peak learning rate.")] = None,
    patience: Annotated[int | None, typer.Option(help="train.patience: evaluations without improvement.")] = None,
    seed: Annotated[int | None, typer.Option(help="train.seed: seeds Python, NumPy, torch, batch order.")] = None,
    device: Annotated[str | None, typer.Option(help="train.device: auto, cpu, cuda, cuda:N or mps.")] = None,
    precision: Annotated[str | None, typer.Option(help="train.precision: 32 or bf16.")] = None,
    name: Annotated[str | None, typer.Option(help="run.name: the default run directory name.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue RUN from its last.pt with its saved config.")] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved config as TOML and exit.")
    ] = False,
    progress: Annotated[
        bool,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bar on a terminal; elsewhere a line every train.progress_every seconds.",
        ),
    ] = True,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train one model (or one per sub-run) and write a run directory.

    Example: titans train --task recall --data data/recall-1k --out runs/recall-mac --variant mac --epochs 4
    """
    from tasks import get_task
    from tasks.presets import PRESETS, TASK_DEFAULTS
    from titans_cli.engine.config import check_resume_changes, dumps_toml, load_config, loads_config
    from titans_cli.engine.runs import CONFIG, absolute_paths, default_run_name, is_run_dir
    from titans_cli.engine.train import run

    given = {
        "run.task": ("--task", task),
        "run.data": ("--data", data),
        "run.name": ("--name", name),
        "model.variant": ("--variant", variant),
        "model.kernel": ("--kernel", kernel),
        "task.model": ("--model", model),
        "task.lookback": ("--lookback", lookback),
        "task.horizon": ("--horizon", horizon),
        "task.rc_aug": ("--rc-aug", rc_aug),
        "train.init_from": ("--init-from", init_from),
        "train.epochs": ("--epochs", epochs),
        "train.max_steps": ("--max-steps", max_steps),
        "train.batch_size": ("--batch-size", batch_size),
        "train.lr": ("--lr", lr),
        "train.patience": ("--patience", patience),
        "train.seed": ("--seed", seed),
        "train.device": ("--device", device),
        "train.precision": ("--precision", precision),
    }
    # Paths given on the command line are stored absolute, so the run works from any directory (eval, resume).
    flags = {k: (f, str(v.absolute()) if isinstance(v, Path) else v) for k, (f, v) in given.items() if v is not None}

    def resolve(task_name: str) -> type:
        return get_task(task_name).config_cls

    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise UsageError("--resume continues RUN in place; drop --out")
        if config is not None or preset is not None:
            raise UsageError("--resume uses the run's saved config.toml; drop --config and --preset")
        saved = resume / CONFIG
        if not saved.is_file():
            raise UsageError(f"--resume {resume}: no {CONFIG}; is it a titans run directory?")
        cfg = load_config(resolve_task=resolve, config_file=saved, sets=set_ or [], flags=flags)
        check_resume_changes(loads_config(saved.read_text(), resolve, str(saved)), cfg)
        run_dir = resume
    else:
        if preset is not None and preset not in PRESETS:
            raise UsageError(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
        preset_cfg = PRESETS[preset]() if preset else None
        cfg = load_config(
            resolve_task=resolve,
            config_file=config,
            preset=preset_cfg,
            preset_name=preset or "",
            sets=set_ or [],
            flags=flags,
        )
        if preset is None and cfg.run.task in TASK_DEFAULTS:
            # No preset: the task's own recipe is the lowest layer instead of the bare dataclass defaults.
            cfg = load_config(
                resolve_task=resolve,
                config_file=config,
                preset=TASK_DEFAULTS[cfg.run.task](),
                preset_name=f"the defaults of --task {cfg.run.task}",
                sets=set_ or [],
                flags=flags,
            )
        # Relative paths in a run's own config.toml are relative to that run (as everywhere inside a run).
        cfg = absolute_paths(cfg, config.parent if config is not None and is_run_dir(config.parent) else Path.cwd())
        run_dir = out or Path("runs") / (cfg.run.name or default_run_name(cfg.run.task, cfg.model.variant))
    if print_config:
        typer.echo(dumps_toml(cfg), nl=False)
        return
    result = run(
        cfg,
        get_task(cfg.run.task),
        run_dir,
        resume=resume is not None,
        overwrite=overwrite,
        quiet=quiet,
        progress=progress,
    )
    if result:  # torchrun workers other than rank 0 return nothing to print
        emit_result(result, json_out)
