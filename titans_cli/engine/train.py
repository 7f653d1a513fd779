"""The one training loop: AdamW, linear warm-up + cosine schedule, clipping, early stopping, checkpoints.

Every task trains here. Evaluation runs on the validation split at the end of every epoch (or
every `eval_every` steps) through `task.evaluate`; the best score writes checkpoints/best.pt, every evaluation
(and every `save_every` seconds of training) writes last.pt, and the test split is evaluated once, at the end,
from best.pt. Under torchrun each worker trains on its share of every batch (DistributedDataParallel) and rank 0
alone writes. `resume` continues from last.pt
with model, optimizer, schedule position, RNG streams, batch order and early-stopping state restored, so a
resumed run reproduces the loss curve of an uninterrupted one. A task with `sub_runs(cfg)` trains one model per
entry into `RUN/<name>/` and, with `summarize(results)`, writes `RUN/summary.json`.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from titans_cli.backbone.model import attn_branch_weights
from titans_cli.engine import runs
from titans_cli.engine.checkpoint import read_checkpoint, save_checkpoint, transfer_weights
from titans_cli.engine.config import RunConfig, dumps_toml
from titans_cli.engine.errors import DataError, TitansError, UsageError
from titans_cli.engine.evaluate import DeviceLoader, evaluate_split, is_better
from titans_cli.engine.runtime import (
    World,
    all_mean,
    any_worker,
    autocast,
    barrier,
    device_for,
    from_main,
    process_group,
    rng_state,
    seed_everything,
    set_rng_state,
    world_from_env,
)
from titans_cli.engine.task import OrderedBatches, SubRuns, Summarize, Task

Log = Callable[[str], None]
StopCheck = Callable[[int], bool]


class TrainingInterrupted(TitansError):
    """Training stopped on request (Ctrl-C or `should_stop`) after saving last.pt; resume continues it."""

    exit_code = 130


@dataclass
class TrainState:
    """What the loop carries between steps; saved in every checkpoint (plain values only)."""

    step: int = 0
    best: float | None = None  # best validation value of task.primary_metric
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    stopped_early: bool = False
    loss_sum: float = 0.0  # train-loss sum and count since the last metrics.jsonl row
    loss_count: int = 0


def lr_at(step: int, total: int, warmup_steps: int, base_lr: float, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then cosine to `base_lr * min_ratio`."""
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps_for(warmup: float, total: int) -> int:
    """`train.warmup` < 1 is a fraction of all steps, >= 1 a number of steps."""
    return int(round(warmup * total)) if warmup < 1 else min(int(warmup), total)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch: a pure function of (seed, epoch), independent of the global
    RNG, so a run resumed in the middle of an epoch sees exactly the batches it would have seen."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices (dim >= 2), not biases, norm scales or scalar gates."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run(
    cfg: RunConfig,
    task: Task,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    progress: bool = True,
    should_stop: StopCheck | None = None,
) -> dict[str, Any]:
    """Train `task` with `cfg` into `run_dir` (or continue it with `resume`) and return a JSON-able summary.

    Everything that can be checked (device, output path, lock, data, model) is checked before the run directory
    is created; a run that fails before its first last.pt removes what it created, so the corrected command
    can use the same `--out`. Under torchrun every worker trains its share of each batch with
    DistributedDataParallel and rank 0 alone writes.

    Args:
        cfg: the resolved run config; `cfg.run.data` is the prepared data directory (relative: to `run_dir`).
        task: a `titans_cli.engine.task.Task`; `task.load`, `build_model`, `loss` and `evaluate` get the whole `cfg`.
        run_dir: the run directory; a new run refuses a non-empty one unless `overwrite`.
        resume: continue from `run_dir/checkpoints/last.pt` (sub-runs: each unfinished one).
        quiet: no log lines on stderr. progress: a progress bar on a TTY, else a line every progress_every s.
        should_stop: called after every optimizer step with the step number; True stops as Ctrl-C does
            (last.pt saved, `TrainingInterrupted` raised).

    Returns:
        `{"run_dir", "task", "steps", "best_step", "val", "test", ...}`, or for sub-runs
        `{"run_dir", "sub_runs": {name: result}, "summary"}`; `{}` on torchrun workers other than rank 0.
    """
    world = world_from_env()
    if not resume:
        cfg = runs.absolute_paths(cfg, Path.cwd())  # a caller's relative paths are from its working directory
    log: Log = _stderr if world.main and not quiet else (lambda _msg: None)
    device = device_for(cfg.train.device, world)
    if resume:
        runs.check_unlocked(run_dir)
    else:
        runs.check_new_run_dir(run_dir, overwrite)
    subs = list(task.sub_runs(cfg)) if isinstance(task, SubRuns) else []
    todo = [(n, c) for n, c in subs if not (resume and (run_dir / n / runs.METRICS).is_file())]
    with process_group(world, device):
        setup = None
        if subs:
            for _name, sub_cfg in todo:  # every horizon's data and model load before the first one trains
                _setup(sub_cfg, task, run_dir, device, resume=False)
        else:
            from_last = resume and (run_dir / runs.CHECKPOINTS / "last.pt").is_file()
            setup = _setup(cfg, task, run_dir, device, from_last)
        barrier(world)
        with (
            _writer(run_dir, world, resume, overwrite, [n for n, _ in subs]),
            _interrupt_on_sigint(should_stop) as stop,
        ):
            bar = progress and not quiet and world.main
            if not subs:
                return _train_one(cfg, task, run_dir, resume, log, bar, stop, world, device, setup)
            if world.main:
                runs.atomic_write_text(run_dir / runs.CONFIG, dumps_toml(cfg))  # the base the sub-runs derive from
                if not resume:
                    env = runs.environment(str(device), cfg.train.precision, cfg.train.seed, world.size)
                    runs.write_json(run_dir / runs.ENV, env)
            finals: dict[str, dict[str, Any]] = {}
            for name, sub_cfg in subs:
                sub_dir = run_dir / name
                if (name, sub_cfg) not in todo:
                    log(f"{name}: finished earlier, kept")
                    finals[name] = json.loads((sub_dir / runs.METRICS).read_text())
                    continue
                sub_resume = resume and (sub_dir / runs.CONFIG).is_file()
                if not sub_resume and world.main:
                    runs.prepare_run_dir(sub_dir, overwrite=True)
                barrier(world)
                log(f"sub-run {name}")
                _train_one(sub_cfg, task, sub_dir, sub_resume, log, bar, stop, world, device, None)
                if world.main:
                    finals[name] = json.loads((sub_dir / runs.METRICS).read_text())
            if not world.main:
                return {}
            out: dict[str, Any] = {"run_dir": str(run_dir), "task": task.name, "sub_runs": finals}
            if isinstance(task, Summarize):
                out["summary"] = task.summarize(finals)
                runs.write_json(run_dir / runs.SUMMARY, out["summary"])
            return out


@contextmanager
def _writer(run_dir: Path, world: World, resume: bool, overwrite: bool, subs: list[str]) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the block; a new run that fails before any last.pt exists is
    removed again (the directories it created; in a directory that existed, titans' files), so the corrected
    command can use the same --out. An interrupted run (last.pt saved) is kept for --resume."""
    if not world.main:
        yield
        return
    created = runs.first_missing(run_dir)
    with runs.RunLock(run_dir):
        try:
            if resume:
                runs.remove_stale_temps(run_dir)  # a SIGKILL may have cut a write short
            else:
                runs.prepare_run_dir(run_dir, overwrite)
            yield
        except BaseException:
            if not resume and not any(run_dir.rglob("last.pt")):
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
                else:
                    runs.clear_run_dir(run_dir)
                    for name in subs:
                        shutil.rmtree(run_dir / name, ignore_errors=True)
            raise


@dataclass
class _Setup:
    """What a run needs before its first step: the data, the model on its device, the meta as JSON text."""

    data: Any
    model: nn.Module
    meta_json: str


def _setup(cfg: RunConfig, task: Task, run_dir: Path, device: torch.device, resume: bool) -> _Setup:
    """Load the data and build the model (with init_from weights); every failure here precedes any file."""
    tc = cfg.train
    seed_everything(tc.seed, tc.deterministic)
    if not cfg.run.data:
        raise UsageError("run.data is not set; pass --data DIR (a directory written by `titans prepare ...`)")
    data_dir = runs.resolve_in_run(run_dir, cfg.run.data)
    if not data_dir.is_dir():
        raise UsageError(f"run.data {str(data_dir)!r}: no such directory; create it with `titans prepare ...`")
    data = task.load(cfg, data_dir)
    if len(data.train) == 0 or len(data.val) == 0:
        raise DataError(f"{data_dir}: the train and val splits must not be empty")
    try:
        meta_json = json.dumps(data.meta)
    except TypeError as err:
        raise TitansError(f"task {task.name}: meta is not JSON-serialisable ({err})") from None
    model = task.build_model(cfg, data.meta).to(device)
    if tc.init_from and not resume:
        transfer_weights(model, runs.resolve_in_run(run_dir, tc.init_from))
    return _Setup(data, model, meta_json)


@dataclass
class _Training:
    """One model's training between `_start` (resume rules, optimizer, schedule, restored state) and
    `final_test`; `step` is one optimizer step, `evaluate_and_save` one validation with its checkpoints."""

    cfg: RunConfig
    task: Task
    run_dir: Path
    log: Log
    world: World
    device: torch.device
    data: Any
    model: nn.Module
    trained: nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun
    meta_json: str
    optimizer: torch.optim.Optimizer
    state: TrainState
    total: int
    warmup: int
    steps_per_epoch: int
    held: list[nn.Parameter]  # attention-branch weights fixed for the first train.memory_warmup steps
    last_saved_step: int
    saved_at: float

    @property
    def last_path(self) -> Path:
        return self.run_dir / runs.CHECKPOINTS / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / runs.CHECKPOINTS / "best.pt"

    def evaluate(self, dataset: Any) -> dict[str, Any]:
        tc = self.cfg.train
        return evaluate_split(
            self.task, self.model, dataset, self.data.meta, batch_size=tc.eval_batch_size or tc.batch_size,
            device=self.device, precision=tc.precision, num_workers=tc.num_workers,
        )  # fmt: skip

    def checkpoint_payload(self, val_metrics: dict[str, Any]) -> dict[str, Any]:
        tc, state = self.cfg.train, self.state
        return {
            "task": self.task.name,
            "config_toml": dumps_toml(self.cfg),
            "meta_json": self.meta_json,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "kind": "warmup_cosine",
                "total_steps": self.total,
                "warmup_steps": self.warmup,
                "base_lr": tc.lr,
                "min_lr_ratio": tc.min_lr_ratio,
            },
            "rng": rng_state(),
            "train_state": asdict(state),
            "step": state.step,
            "workers": self.world.size,  # torchrun processes: the global batch is workers × batch_size
            "epoch": math.ceil(state.step / self.steps_per_epoch),
            "val_metrics_json": json.dumps(runs.json_safe(val_metrics)),
        }

    def save_last(self, val_metrics: dict[str, Any]) -> None:
        if self.world.main:
            save_checkpoint(self.last_path, self.checkpoint_payload(val_metrics))
        self.last_saved_step, self.saved_at = self.state.step, time.monotonic()

    def epoch_loader(self, epoch: int) -> DeviceLoader:
        """This worker's batches of `epoch` from the current step on (a resumed epoch skips those it trained)."""
        tc, world = self.cfg.train, self.world
        skip = self.state.step % self.steps_per_epoch
        if isinstance(self.data.train, OrderedBatches):
            batches = self.data.train.epoch_batches(epoch, tc.seed, tc.batch_size, skip)
        else:
            order = epoch_order(len(self.data.train), tc.seed, epoch).tolist()
            batches = worker_batches(order, tc.batch_size, world.size, world.rank, skip)
        return DeviceLoader(DataLoader(self.data.train, batch_sampler=batches, num_workers=tc.num_workers), self.device)

    def step(self, batch: Any, epoch: int, advance: Callable[[int, float], None]) -> float:
        """One optimizer step on `batch`; returns the batch's loss (the mean over all workers)."""
        tc, state, world = self.cfg.train, self.state, self.world
        state.step += 1
        lr = lr_at(state.step, self.total, self.warmup, tc.lr, tc.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, tc.precision):
            loss = self.task.loss(self.trained, batch)
        # One number for all workers (the loss of the whole batch): they stop together on a NaN.
        loss_value = all_mean(loss.item(), world, self.device)
        if not math.isfinite(loss_value):
            bf16 = ", use --precision 32" if tc.precision == "bf16" else ""
            raise TitansError(
                f"training diverged: loss is {loss_value} at step {state.step} (epoch {epoch + 1}); "
                f"lower --lr (now {tc.lr:g}){bf16}, lower model.theta_max / model.chunk_size, or set "
                "model.inner_clip (e.g. 1.0) for a steadier memory update"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if state.step <= tc.memory_warmup:
            for p in self.held:
                p.grad = None  # AdamW skips a parameter without a gradient: no step, no moments
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        state.loss_sum += loss_value
        state.loss_count += 1
        advance(state.step, state.loss_sum / state.loss_count)
        if state.step % tc.log_every == 0:
            if world.main:
                runs.append_jsonl(
                    self.run_dir / runs.METRICS_JSONL,
                    {
                        "step": state.step,
                        "epoch": epoch + 1,
                        "split": "train",
                        "loss": state.loss_sum / state.loss_count,
                        "lr": lr,
                    },
                )
            state.loss_sum, state.loss_count = 0.0, 0
        return loss_value

    def evaluate_and_save(self, epoch: int, loss_value: float) -> None:
        """Validate, keep best.pt and last.pt, count evaluations without improvement (`state.stopped_early`)."""
        tc, state, world, task = self.cfg.train, self.state, self.world, self.task
        # Rank 0 evaluates the whole split; the others take its numbers, so all agree on best.pt and early stopping.
        metrics = from_main(self.evaluate(self.data.val) if world.main else None, world)
        value = metrics[task.primary_metric]
        improved = is_better(value, state.best, task.higher_is_better)
        if improved:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
        else:
            state.bad_evals += 1
            state.stopped_early = 0 < tc.patience <= state.bad_evals
        if world.main:
            runs.append_jsonl(
                self.run_dir / runs.METRICS_JSONL,
                {"step": state.step, "epoch": epoch + 1, "split": "val", **metrics},
            )
        self.save_last(metrics)
        if improved and world.main:
            _copy_atomic(self.last_path, self.best_path)
        mark = " (best)" if improved else f" (best {state.best:.4g} at step {state.best_step})"
        self.log(
            f"step {state.step} epoch {epoch + 1} loss {loss_value:.4f} val {task.primary_metric} {value:.4f}{mark}"
        )
        if state.stopped_early:
            self.log(f"early stop: no improvement in {tc.patience} evaluations")

    def final_test(self, train_seconds: float) -> dict[str, Any]:
        """Save the last step, then test best.pt once (docs/conventions.md §8, pitfall 6); metrics.json and the
        summary."""
        state, task, run_dir = self.state, self.task, self.run_dir
        if self.last_saved_step != state.step:
            self.save_last({})
        if not self.world.main:
            return {}
        if not self.best_path.is_file():
            raise TitansError(f"no finite validation {task.primary_metric} in {state.step} steps; no best.pt written")
        best = read_checkpoint(self.best_path, device="cpu")
        self.model.load_state_dict(best["model"])
        best_val = json.loads(best["val_metrics_json"])
        final: dict[str, Any] = {"split": "val", "checkpoint": "best.pt", "step": state.best_step, **best_val}
        if self.data.test is not None and len(self.data.test) > 0:
            final = {
                "split": "test",
                "checkpoint": "best.pt",
                "step": state.best_step,
                **self.evaluate(self.data.test),
                "val": best_val,
            }
        runs.write_json(run_dir / runs.METRICS, final)
        runs.write_metrics_csv(run_dir)
        return {
            "run_dir": str(run_dir),
            "task": task.name,
            "variant": self.cfg.model.variant,
            "steps": state.step,
            "best_step": state.best_step,
            "stopped_early": state.stopped_early,
            "train_seconds": round(train_seconds, 2),
            "val": best_val,
            "test": {k: v for k, v in final.items() if k not in ("split", "checkpoint", "step", "val")}
            if final["split"] == "test"
            else None,
        }


def _start(
    cfg: RunConfig,
    task: Task,
    run_dir: Path,
    resume: bool,
    log: Log,
    world: World,
    device: torch.device,
    setup: _Setup | None,
) -> _Training:
    """Everything before the first step: the resume rules, data and model (`_setup`), optimizer and schedule, the
    restored state of last.pt, and the run's env.json, config.toml and first log line."""
    tc = cfg.train
    last_path = run_dir / runs.CHECKPOINTS / "last.pt"
    if resume and not last_path.is_file():
        # Killed before its first save: nothing was kept but the config, so the run starts over (same seed).
        log(f"--resume {run_dir}: no {runs.CHECKPOINTS}/last.pt yet; starting from step 0")
        resume = False
    ckpt = read_checkpoint(last_path) if resume else None
    if ckpt is not None and int(ckpt.get("workers", 1)) != world.size:
        # The global batch (and so the batch order and the schedule) depends on the number of workers.
        n = int(ckpt.get("workers", 1))
        how = f"torchrun --nproc_per_node={n} -m titans_cli train --resume {run_dir}" if n > 1 else "one process"
        raise UsageError(f"--resume {run_dir}: trained with {n} worker(s), now {world.size}; resume with {how}")
    setup = setup or _setup(cfg, task, run_dir, device, resume)
    data, model, meta_json = setup.data, setup.model, setup.meta_json
    if tc.init_from and not resume:
        log(f"init_from {tc.init_from}: backbone.* and embed.* weights loaded")
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay
    )

    n_train = len(data.train)
    per_step = tc.batch_size * world.size  # samples per optimizer step over all workers
    steps_per_epoch = math.ceil(n_train / per_step)
    if isinstance(data.train, OrderedBatches):
        if world.distributed:  # its batches continue one another; a share of each per worker would not
            raise UsageError(f"task {task.name}: this training set fixes its own batches; train in one process")
        steps_per_epoch = data.train.steps_per_epoch(tc.batch_size)
    total = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
    warmup = warmup_steps_for(tc.warmup, total)
    state = TrainState()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = TrainState(**ckpt["train_state"])
        state.stopped_early = 0 < tc.patience <= state.bad_evals  # a raised --patience continues the run
        if state.step >= total or state.stopped_early:
            why = "stopped early (patience)" if state.stopped_early else f"reached step {state.step} of {total}"
            raise UsageError(f"--resume {run_dir}: nothing to do, it {why}; raise --epochs/--max-steps/--patience")
        # Restored last, after everything that draws random numbers while being built.
        set_rng_state(ckpt["rng"])
        if world.main:
            runs.truncate_jsonl(run_dir / runs.METRICS_JSONL, state.step)
        log(f"resuming {run_dir} at step {state.step}")
    elif world.main:
        runs.truncate_jsonl(run_dir / runs.METRICS_JSONL, 0)  # a restarted run's rows from before the kill
        runs.write_json(run_dir / runs.ENV, runs.environment(str(device), tc.precision, tc.seed, world.size))
    # Written once the data and model are known to load; on resume it records the changes --resume allows
    # (epochs, max_steps, ...).
    if world.main:
        runs.atomic_write_text(run_dir / runs.CONFIG, dumps_toml(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    workers = f" × {world.size} workers" if world.distributed else ""
    log(
        f"task {task.name} · device {device} · precision {tc.precision} · seed {tc.seed} · "
        f"{n_params / 1e6:.2f}M parameters · {total} steps ({steps_per_epoch}/epoch, batch {tc.batch_size}{workers})"
    )
    # Workers step on their share of each batch; DDP averages the gradients, so with equal shares the update
    # is that of one process on the whole batch.
    trained: nn.Module = (
        _DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world.distributed else model
    )
    return _Training(
        cfg=cfg, task=task, run_dir=run_dir, log=log, world=world, device=device, data=data, model=model,
        trained=trained, meta_json=meta_json, optimizer=optimizer, state=state, total=total, warmup=warmup,
        steps_per_epoch=steps_per_epoch, held=attn_branch_weights(model) if tc.memory_warmup else [],
        last_saved_step=state.step if ckpt is not None else -1, saved_at=time.monotonic(),
    )  # fmt: skip


def _train_one(
    cfg: RunConfig,
    task: Task,
    run_dir: Path,
    resume: bool,
    log: Log,
    progress: bool,
    stop: StopCheck,
    world: World,
    device: torch.device,
    setup: _Setup | None,
) -> dict[str, Any]:
    """Train one model: `_start`, then `step` with `evaluate_and_save` when due, then `final_test`."""
    t = _start(cfg, task, run_dir, resume, log, world, device, setup)
    tc, state = cfg.train, t.state
    started = time.perf_counter()
    t.model.train()
    with _progress(progress, t.total, state.step, tc.progress_every) as advance:
        while state.step < t.total and not state.stopped_early:
            epoch = state.step // t.steps_per_epoch
            for batch in t.epoch_loader(epoch):
                loss_value = t.step(batch, epoch, advance)
                end_of_epoch = state.step % t.steps_per_epoch == 0
                due = state.step % tc.eval_every == 0 if tc.eval_every else end_of_epoch
                if due or state.step == t.total:
                    t.evaluate_and_save(epoch, loss_value)
                    if state.stopped_early:
                        break
                elif tc.save_every and time.monotonic() - t.saved_at >= tc.save_every:
                    t.save_last({})  # a SIGKILL now loses at most save_every seconds of training
                if any_worker(stop(state.step), world, device) and state.step < t.total:
                    if t.last_saved_step != state.step:
                        t.save_last({})
                    raise TrainingInterrupted(
                        f"interrupted at step {state.step}; continue with: titans train --resume {run_dir}"
                    )
                if state.step >= t.total:
                    break
    return t.final_test(time.perf_counter() - started)


def worker_batches(order: list[int], batch_size: int, workers: int, rank: int, skip: int) -> list[list[int]]:
    """This worker's batches of one epoch: each step takes `batch_size * workers` samples of `order` and hands
    worker `rank` its slice (the seeded shuffle split like a DistributedSampler), from step `skip` on.

    One worker gets the plain batches. With several, a short last step is filled up from the start of the
    epoch's order so every worker has the same number of samples (DDP averages equal-weight gradients).
    """
    per_step = batch_size * workers
    out = []
    for start in range(skip * per_step, len(order), per_step):
        chunk = order[start : start + per_step]
        if workers > 1 and len(chunk) < per_step:
            chunk = chunk + (order * per_step)[: per_step - len(chunk)]
        out.append(chunk[rank * batch_size : (rank + 1) * batch_size])
    return out


class _DDP(DistributedDataParallel):
    """DistributedDataParallel that hands attribute reads to the wrapped model: tasks read `model.head`,
    `model.rc_aug` and the like in their loss."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet (inside DDP's __init__): no wrapped model to ask
                raise
            return getattr(self.module, name)


def _copy_atomic(src: Path, dst: Path) -> None:
    with open(src, "rb") as fh:
        runs.atomic_write(dst, lambda out: shutil.copyfileobj(fh, out))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def _interrupt_on_sigint(should_stop: StopCheck | None) -> Iterator[StopCheck]:
    """Ctrl-C asks the loop to stop at the next step boundary (so last.pt is consistent); twice aborts."""
    requested = threading.Event()

    def stop(step: int) -> bool:
        return requested.is_set() or (should_stop is not None and should_stop(step))

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        _stderr("stopping after this step (Ctrl-C again to abort without saving)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _progress(enabled: bool, total: int, start: int, every: float) -> Iterator[Callable[[int, float], None]]:
    """A rich progress bar on a terminal; elsewhere (a log file) a line every `every` seconds with the step,
    the loss, steps/s and the ETA."""
    if not enabled:
        yield lambda step, loss: None
        return
    if not sys.stderr.isatty():
        t0 = last = time.monotonic()

        def line(step: int, loss: float) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < every and step < total:
                return
            last = now
            rate = (step - start) / max(now - t0, 1e-9)
            eta = (total - step) / rate if rate > 0 else 0.0
            _stderr(f"step {step}/{total} loss {loss:.4f} {rate:.2f} steps/s ETA {_clock(eta)}")

        yield line
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task_id = bar.add_task("train", total=total, completed=start, loss="-")
        yield lambda step, loss: bar.update(task_id, completed=step, loss=f"{loss:.4f}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
