"""`titans train`: parse, resolve the run config (`tasks.resolve.resolve_train`), run the loop, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, emit_result

# The options that set one config field each: parameter -> section.key; the flag is --parameter-with-dashes.
FIELDS = {
    "task": "run.task",
    "data": "run.data",
    "name": "run.name",
    "variant": "model.variant",
    "kernel": "model.kernel",
    "model": "task.model",
    "lookback": "task.lookback",
    "horizon": "task.horizon",
    "rc_aug": "task.rc_aug",
    "init_from": "train.init_from",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "patience": "train.patience",
    "seed": "train.seed",
    "device": "train.device",
    "precision": "train.precision",
}


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
    from tasks.resolve import resolve_train
    from titans_cli.engine.config import dumps_toml
    from titans_cli.engine.train import run

    values = locals()
    # Paths given on the command line are stored absolute, so the run works from any directory (eval, resume).
    flags = {
        path: (f"--{param.replace('_', '-')}", str(v.absolute()) if isinstance(v, Path) else v)
        for param, path in FIELDS.items()
        if (v := values[param]) is not None
    }
    cfg, run_dir = resolve_train(flags=flags, config=config, preset=preset, sets=set_ or [], resume=resume, out=out)
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
