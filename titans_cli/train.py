"""The one training loop: AdamW, linear warm-up + cosine schedule, clipping, early stopping, checkpoints.

Every task trains here (issue 2 §4). Evaluation runs on the validation split at the end of every epoch (or
every `eval_every` steps) through `task.evaluate`; the best score writes checkpoints/best.pt, every evaluation
writes last.pt, and the test split is evaluated once, at the end, from best.pt. `resume` continues from last.pt
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
from torch.utils.data import DataLoader

from titans_cli import runs
from titans_cli.checkpoint import read_checkpoint, save_checkpoint, transfer_weights
from titans_cli.config import RunConfig, dumps_toml
from titans_cli.errors import DataError, TitansError, UsageError
from titans_cli.evaluate import DeviceLoader, evaluate_split, is_better
from titans_cli.model import attn_branch_weights
from titans_cli.runtime import autocast, resolve_device, rng_state, seed_everything, set_rng_state

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
    task: Any,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    progress: bool = True,
    should_stop: StopCheck | None = None,
) -> dict[str, Any]:
    """Train `task` with `cfg` into `run_dir` (or continue it with `resume`) and return a JSON-able summary.

    Args:
        cfg: the resolved run config; `cfg.run.data` is the prepared data directory.
        task: a `tasks.base.Task`; `task.load`, `build_model`, `loss` and `evaluate` get the whole `cfg`.
        run_dir: the run directory; a new run refuses a non-empty one unless `overwrite`.
        resume: continue from `run_dir/checkpoints/last.pt` (sub-runs: each unfinished one).
        quiet: no log lines on stderr. progress: a rich progress bar when stderr is a TTY.
        should_stop: called after every optimizer step with the step number; True stops as Ctrl-C does
            (last.pt saved, `TrainingInterrupted` raised).

    Returns:
        `{"run_dir", "task", "steps", "best_step", "val", "test", ...}`, or for sub-runs
        `{"run_dir", "sub_runs": {name: result}, "summary"}`.
    """
    log: Log = (lambda _msg: None) if quiet else _stderr
    if not resume:
        runs.prepare_run_dir(run_dir, overwrite)
    subs = list(task.sub_runs(cfg)) if hasattr(task, "sub_runs") else []
    with _interrupt_on_sigint(should_stop) as stop:
        if not subs:
            return _train_one(cfg, task, run_dir, resume, log, progress and not quiet, stop)
        runs.atomic_write_text(run_dir / runs.CONFIG, dumps_toml(cfg))  # the base config the sub-runs derive from
        if not resume:
            runs.write_json(run_dir / runs.ENV, runs.environment(cfg.train.device, cfg.train.precision, cfg.train.seed))
        finals: dict[str, dict[str, Any]] = {}
        for name, sub_cfg in subs:
            sub_dir = run_dir / name
            if resume and (sub_dir / runs.METRICS).is_file():
                log(f"{name}: finished earlier, kept")
                finals[name] = json.loads((sub_dir / runs.METRICS).read_text())
                continue
            sub_resume = resume and (sub_dir / runs.CHECKPOINTS / "last.pt").is_file()
            if not sub_resume:
                runs.prepare_run_dir(sub_dir, overwrite=True)
            log(f"sub-run {name}")
            _train_one(sub_cfg, task, sub_dir, sub_resume, log, progress and not quiet, stop)
            finals[name] = json.loads((sub_dir / runs.METRICS).read_text())
        out: dict[str, Any] = {"run_dir": str(run_dir), "task": task.name, "sub_runs": finals}
        if hasattr(task, "summarize"):
            out["summary"] = task.summarize(finals)
            runs.write_json(run_dir / runs.SUMMARY, out["summary"])
        return out


def _train_one(
    cfg: RunConfig, task: Any, run_dir: Path, resume: bool, log: Log, progress: bool, stop: StopCheck
) -> dict[str, Any]:
    tc = cfg.train
    device = resolve_device(tc.device)
    last_path = run_dir / runs.CHECKPOINTS / "last.pt"
    best_path = run_dir / runs.CHECKPOINTS / "best.pt"
    if resume and not last_path.is_file():
        raise UsageError(f"--resume {run_dir}: no {runs.CHECKPOINTS}/last.pt to continue from")
    ckpt = read_checkpoint(last_path) if resume else None

    seed_everything(tc.seed, tc.deterministic)
    data_dir = Path(cfg.run.data)
    if not cfg.run.data or not data_dir.is_dir():
        raise UsageError(f"run.data {cfg.run.data!r}: no such directory; create it with `titans prepare ...`")
    data = task.load(cfg, data_dir)
    if len(data.train) == 0 or len(data.val) == 0:
        raise DataError(f"{data_dir}: the train and val splits must not be empty")
    try:
        meta_json = json.dumps(data.meta)
    except TypeError as err:
        raise TitansError(f"task {task.name}: meta is not JSON-serialisable ({err})") from None
    model = task.build_model(cfg, data.meta).to(device)
    if tc.init_from and not resume:
        loaded, skipped = transfer_weights(model, Path(tc.init_from))
        note = f", kept own {len(skipped)} embed.* (shape differs)" if skipped else ""
        log(f"init_from {tc.init_from}: loaded {len(loaded)} tensors{note}")
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay
    )

    n_train = len(data.train)
    steps_per_epoch = math.ceil(n_train / tc.batch_size)
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
        runs.truncate_jsonl(run_dir / runs.METRICS_JSONL, state.step)
        log(f"resuming {run_dir} at step {state.step}")
    else:
        runs.write_json(run_dir / runs.ENV, runs.environment(str(device), tc.precision, tc.seed))
    # Written once the data and model are known to load (a failed start leaves the directory reusable); on
    # resume it records the changes --resume allows (epochs, max_steps, ...).
    runs.atomic_write_text(run_dir / runs.CONFIG, dumps_toml(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"task {task.name} · device {device} · precision {tc.precision} · seed {tc.seed} · "
        f"{n_params / 1e6:.2f}M parameters · {total} steps ({steps_per_epoch}/epoch, batch {tc.batch_size})"
    )

    def evaluate(dataset: Any) -> dict[str, Any]:
        return evaluate_split(
            task, model, dataset, data.meta, batch_size=tc.eval_batch_size or tc.batch_size, device=device,
            precision=tc.precision, num_workers=tc.num_workers,
        )  # fmt: skip

    def checkpoint_payload(val_metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": task.name,
            "config_toml": dumps_toml(cfg),
            "meta_json": meta_json,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {
                "kind": "warmup_cosine",
                "total_steps": total,
                "warmup_steps": warmup,
                "base_lr": tc.lr,
                "min_lr_ratio": tc.min_lr_ratio,
            },
            "rng": rng_state(),
            "train_state": asdict(state),
            "step": state.step,
            "epoch": math.ceil(state.step / steps_per_epoch),
            "val_metrics_json": json.dumps(runs.json_safe(val_metrics)),
        }

    held = attn_branch_weights(model) if tc.memory_warmup else []  # fixed for the first memory_warmup steps
    started = time.perf_counter()
    last_saved_step = state.step if ckpt is not None else -1
    model.train()
    with _progress_bar(progress, total, state.step) as advance:
        while state.step < total and not state.stopped_early:
            epoch = state.step // steps_per_epoch
            skip = state.step % steps_per_epoch
            order = epoch_order(n_train, tc.seed, epoch).tolist()
            batches = [order[i : i + tc.batch_size] for i in range(skip * tc.batch_size, n_train, tc.batch_size)]
            loader = DataLoader(data.train, batch_sampler=batches, num_workers=tc.num_workers)
            for batch in DeviceLoader(loader, device):
                state.step += 1
                lr = lr_at(state.step, total, warmup, tc.lr, tc.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, tc.precision):
                    loss = task.loss(model, batch)
                if not torch.isfinite(loss):
                    bf16 = ", use --precision 32" if tc.precision == "bf16" else ""
                    raise TitansError(
                        f"training diverged: loss is {loss.item()} at step {state.step} (epoch {epoch + 1}); "
                        f"lower --lr (now {tc.lr:g}){bf16}, lower model.theta_max / model.chunk_size, or set "
                        "model.inner_clip (e.g. 1.0) for a steadier memory update"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if state.step <= tc.memory_warmup:
                    for p in held:
                        p.grad = None  # AdamW skips a parameter without a gradient: no step, no moments
                if tc.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                state.loss_sum += loss.item()
                state.loss_count += 1
                advance(state.step, state.loss_sum / state.loss_count)
                if state.step % tc.log_every == 0:
                    runs.append_jsonl(
                        run_dir / runs.METRICS_JSONL,
                        {
                            "step": state.step,
                            "epoch": epoch + 1,
                            "split": "train",
                            "loss": state.loss_sum / state.loss_count,
                            "lr": lr,
                        },
                    )
                    state.loss_sum, state.loss_count = 0.0, 0
                end_of_epoch = state.step % steps_per_epoch == 0
                due = state.step % tc.eval_every == 0 if tc.eval_every else end_of_epoch
                if due or state.step == total:
                    metrics = evaluate(data.val)
                    value = metrics[task.primary_metric]
                    improved = is_better(value, state.best, task.higher_is_better)
                    if improved:
                        state.best, state.best_step, state.bad_evals = value, state.step, 0
                    else:
                        state.bad_evals += 1
                        state.stopped_early = 0 < tc.patience <= state.bad_evals
                    runs.append_jsonl(
                        run_dir / runs.METRICS_JSONL,
                        {"step": state.step, "epoch": epoch + 1, "split": "val", **metrics},
                    )
                    save_checkpoint(last_path, checkpoint_payload(metrics))
                    last_saved_step = state.step
                    if improved:
                        _copy_atomic(last_path, best_path)
                    mark = " (best)" if improved else f" (best {state.best:.4g} at step {state.best_step})"
                    log(
                        f"step {state.step} epoch {epoch + 1} loss {loss.item():.4f} "
                        f"val {task.primary_metric} {value:.4f}{mark}"
                    )
                    if state.stopped_early:
                        log(f"early stop: no improvement in {tc.patience} evaluations")
                        break
                if stop(state.step) and state.step < total:
                    if last_saved_step != state.step:
                        save_checkpoint(last_path, checkpoint_payload({}))
                    raise TrainingInterrupted(
                        f"interrupted at step {state.step}; continue with: titans train --resume {run_dir}"
                    )
                if state.step >= total:
                    break
    train_seconds = time.perf_counter() - started
    if last_saved_step != state.step:
        save_checkpoint(last_path, checkpoint_payload({}))
    if not best_path.is_file():
        raise TitansError(f"no finite validation {task.primary_metric} in {state.step} steps; no best.pt written")

    # Test metrics come from best.pt only, evaluated once (conventions §8, pitfall 6).
    best = read_checkpoint(best_path, device="cpu")
    model.load_state_dict(best["model"])
    best_val = json.loads(best["val_metrics_json"])
    final: dict[str, Any] = {"split": "val", "checkpoint": "best.pt", "step": state.best_step, **best_val}
    if data.test is not None and len(data.test) > 0:
        final = {
            "split": "test",
            "checkpoint": "best.pt",
            "step": state.best_step,
            **evaluate(data.test),
            "val": best_val,
        }
    runs.write_json(run_dir / runs.METRICS, final)
    runs.write_metrics_csv(run_dir)
    return {
        "run_dir": str(run_dir),
        "task": task.name,
        "variant": cfg.model.variant,
        "steps": state.step,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(train_seconds, 2),
        "val": best_val,
        "test": {k: v for k, v in final.items() if k not in ("split", "checkpoint", "step", "val")}
        if final["split"] == "test"
        else None,
    }


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
def _progress_bar(enabled: bool, total: int, start: int) -> Iterator[Callable[[int, float], None]]:
    """A rich progress bar on stderr, only when stderr is a terminal; otherwise a no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda step, loss: None
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
