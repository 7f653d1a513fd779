"""Checkpoints: atomic save, weights-only load, `load_run` to rebuild a trained model, `init_from` transfer.

A checkpoint is a dict of tensors and plain Python values (docs/conventions.md §8): model, optimizer and schedule
state, RNG states, step/epoch, early-stopping state, the resolved config as TOML text, the task name and the
task's meta as JSON text. It is loaded with `torch.load(weights_only=True)`, so a file that needs arbitrary
unpickling (a crafted payload) is refused instead of executed.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from titans_cli import __version__
from titans_cli.engine.config import RunConfig, loads_config
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.runs import CHECKPOINTS, atomic_write, is_run_dir
from titans_cli.engine.runtime import preserved_rng
from titans_cli.engine.task import Task, TaskLookup

FORMAT = "titans-checkpoint/1"
REQUIRED_KEYS = ("format", "task", "config_toml", "meta_json", "model")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus format and version tags) atomically: temporary file, fsync, rename."""
    payload = {"format": FORMAT, "titans_version": __version__, **payload}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` with `weights_only=True`.

    Raises `DataError` for a file that needs arbitrary unpickling (refused, never executed), a corrupt file,
    or a dict without the titans checkpoint keys; `UsageError` if the file does not exist.
    """
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing them
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph; the line naming the unsupported global or opcode is the useful one.
        lines = [ln.strip() for ln in str(err).splitlines() if "nsupported" in ln]
        reason = lines[0].removeprefix("Please file an issue") if lines else "not a weights-only file"
        raise DataError(
            f"{path}: refused to load: not a plain tensors-and-values checkpoint ({reason}); "
            "only use checkpoints written by titans"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        # torch's messages run to several sentences of advice; the first one says what is wrong.
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else "empty or truncated file"
        raise DataError(f"{path}: not a readable checkpoint ({first}); use a checkpoint written by titans") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise DataError(f"{path}: not a titans checkpoint (missing keys: {', '.join(REQUIRED_KEYS)})")
    if ckpt["format"] != FORMAT:
        raise DataError(f"{path}: checkpoint format {ckpt['format']!r}; this titans reads {FORMAT!r}")
    return ckpt


@dataclass
class LoadedRun:
    """A trained model rebuilt from one checkpoint, in eval mode on the requested device."""

    cfg: RunConfig
    task: Task
    model: nn.Module
    meta: dict[str, Any]
    run_dir: Path
    checkpoint: Path
    step: int = 0
    epoch: int = 0
    val_metrics: dict[str, Any] = field(default_factory=dict)


def checkpoint_path(run: Path, which: str = "best", flag: str = "--run") -> Path:
    """`RUN/checkpoints/<which>.pt`, or `run` itself when it is a .pt file; a clear error otherwise."""
    if run.is_file():
        return run
    path = run / CHECKPOINTS / f"{which}.pt"
    if path.is_file():
        return path
    if not run.is_dir():
        raise UsageError(f"{flag} {run}: no such run directory")
    subs = sorted(p.name for p in run.iterdir() if p.is_dir() and is_run_dir(p))
    if subs:
        raise UsageError(f"{flag} {run}: holds sub-runs ({', '.join(subs)}); pass {flag} {run / subs[0]} or similar")
    raise UsageError(f"{flag} {run}: no {CHECKPOINTS}/{which}.pt; is it a finished `titans train` run directory?")


def load_run(
    run_dir: Path, which: str = "best", device: str | torch.device = "cpu", *, get_task: TaskLookup
) -> LoadedRun:
    """Rebuild task, config and model from `RUN/checkpoints/<which>.pt` alone (or from a .pt path).

    `get_task` finds the task the checkpoint names (`tasks.get_task`: the engine does not import the tasks). The
    model is built under `preserved_rng`, so loading a run does not move the caller's random streams.
    """
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, which)
    ckpt = read_checkpoint(path, device="cpu")
    task = get_task(str(ckpt["task"]))
    cfg = loads_config(str(ckpt["config_toml"]), lambda name: get_task(name).config_cls, f"{path} [config]")
    meta = json.loads(str(ckpt["meta_json"]))
    with preserved_rng():
        model = task.build_model(cfg, meta)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise DataError(f"{path}: weights do not fit the model its config builds ({' '.join(first[:2])})") from None
    model.to(device).eval()
    return LoadedRun(
        cfg=cfg,
        task=task,
        model=model,
        meta=meta,
        run_dir=path.parent.parent if run_dir.is_file() else run_dir,
        checkpoint=path,
        step=int(ckpt.get("step", 0)),
        epoch=int(ckpt.get("epoch", 0)),
        val_metrics=json.loads(str(ckpt.get("val_metrics_json", "{}"))),
    )


def transfer_weights(
    model: nn.Module, source: Path, required: str = "backbone.", optional: str = "embed."
) -> tuple[list[str], list[str]]:
    """`init_from`: copy `backbone.*` (and `embed.*` where shapes agree) from another run's best.pt.

    Args:
        model: the freshly built task model (its backbone must have the same shapes as the source's).
        source: a run directory (its checkpoints/best.pt is used) or a .pt file.

    Returns:
        (loaded parameter names, skipped `embed.*` names whose shapes differ, e.g. another vocabulary).
    """
    path = checkpoint_path(source, "best", flag="train.init_from")
    weights = read_checkpoint(path)["model"]
    own = model.state_dict()
    loaded, skipped = [], []
    for name, tensor in weights.items():
        if not (name.startswith(required) or name.startswith(optional)):
            continue
        if name not in own:
            raise UsageError(f"train.init_from {source}: {name} has no counterpart here; use the same [model]")
        if own[name].shape != tensor.shape:
            if name.startswith(optional):
                skipped.append(name)
                continue
            raise UsageError(
                f"train.init_from {source}: {name} has shape {tuple(tensor.shape)} there but "
                f"{tuple(own[name].shape)} here; use the same [model] settings"
            )
        own[name] = tensor
        loaded.append(name)
    if not any(n.startswith(required) for n in loaded):
        raise UsageError(f"train.init_from {source}: no {required}* weights in {path}")
    model.load_state_dict(own)
    return loaded, skipped
