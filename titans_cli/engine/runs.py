"""Run-directory contract (docs/conventions.md §3): layout, overwrite check, env.json, metrics files, atomic writes.

    RUN/config.toml  env.json  metrics.jsonl  metrics.csv  metrics.json  checkpoints/{best,last}.pt
    RUN/<sub-run>/... and RUN/summary.json when a task trains several models (e.g. one per forecast horizon)

Every whole-file output is written to a temporary file in the same directory and renamed into place, so a
crash never leaves a half-written file; metrics.jsonl is appended one complete line per write. One process
writes a run directory at a time (`RunLock`, an flock on RUN/.lock holding the writer's PID).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from titans_cli import __version__
from titans_cli.engine.errors import UsageError

CONFIG = "config.toml"
ENV = "env.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
METRICS = "metrics.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
# What `--overwrite` may delete: titans' own artifacts only, never other files a user put there.
_ARTIFACTS = (CONFIG, ENV, METRICS_JSONL, METRICS_CSV, METRICS, SUMMARY, "splits.json", "predictions.parquet")


def default_run_name(task: str, variant: str) -> str:
    """`<task>-<variant>-<UTC timestamp>` (docs/conventions.md §3)."""
    return f"{task}-{variant}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def is_run_dir(path: Path) -> bool:
    """A directory written by `titans train` (it always holds config.toml)."""
    return (path / CONFIG).is_file()


def check_new_run_dir(path: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse, before anything is created, a run directory that a new run may not use.

    Raises `UsageError` for a path that cannot be written, a directory another process is writing (naming its
    PID), a non-empty directory without `overwrite`, and a non-empty directory that is not a titans run even
    with it (so `--out ~ --overwrite` cannot delete anything of the user's).
    """
    check_output_path(path, flag, directory=True)
    check_unlocked(path)
    _check_contents(path, overwrite, flag)


def _check_contents(path: Path, overwrite: bool, flag: str) -> bool:
    """True if `path` holds files (other than the lock) that `overwrite` allows to clear; raises otherwise."""
    if not (path.is_dir() and any(p.name != LOCK for p in path.iterdir())):
        return False
    if not overwrite:
        raise UsageError(
            f"{flag} {path}: run directory is not empty; pass --overwrite to replace it, "
            f"--resume {path} to continue it, or choose another {flag}"
        )
    if not is_run_dir(path):
        raise UsageError(f"{flag} {path}: not empty and not a titans run directory; --overwrite refuses it")
    return True


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Create `path` for a new run; with `overwrite`, clear titans' files in it (`_check_contents` rules).

    Call it holding the directory's `RunLock` (which it does not check, being the holder).
    """
    if _check_contents(path, overwrite, "--out"):
        clear_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_run_dir(path: Path) -> None:
    """Delete titans' artifacts in a run directory, sub-runs included; other files stay."""
    for name in _ARTIFACTS:
        (path / name).unlink(missing_ok=True)
    if (path / CHECKPOINTS).is_dir():
        shutil.rmtree(path / CHECKPOINTS)
    for child in path.iterdir():
        if child.is_dir() and is_run_dir(child):
            clear_run_dir(child)
            if not any(child.iterdir()):
                child.rmdir()


def check_output_path(path: Path, flag: str, *, directory: bool = False) -> None:
    """Fail now, before any work, if `path` (a file, or a directory with `directory`) cannot be written.

    Catches what would otherwise surface as a raw OSError after minutes of work: a file where a directory is
    needed (or the reverse), a missing or read-only parent, /proc. The check creates and deletes one empty
    probe file in the nearest existing directory: permission bits alone do not tell (root, read-only mounts).
    """
    if path.exists() and path.is_dir() != directory:
        what = "a file, not a directory" if directory else "a directory; give a file name"
        raise UsageError(f"{flag} {path}: is {what}")
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".titans-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write in {ancestor} ({err.strerror}); choose another {flag}") from None


def check_output_file(path: Path, flag: str, inputs: dict[str, Path | None]) -> None:
    """`check_output_path` for a file, which must also not be one of the command's `inputs` ({flag: path}):
    writing the result over the file being read would destroy it."""
    check_output_path(path, flag)
    for other_flag, other in inputs.items():
        if other is not None and path.resolve() == other.resolve():  # resolve(): symlinks and ../ too
            raise UsageError(f"{flag} {path}: is also {other_flag}; choose another {flag} (it would be overwritten)")


def first_missing(path: Path) -> Path | None:
    """The outermost directory that creating `path` (with parents) would create; None if `path` exists."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """If the block raises, delete `path` and the parents the block created for it (they did not exist before)."""
    top = first_missing(path)
    try:
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def resolve_in_run(run_dir: Path, value: str) -> Path:
    """A path stored in a run's config: absolute as written, or relative to the run directory (not the cwd)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(run_dir) / path


def absolute_paths(cfg: Any, base: Path) -> Any:
    """A RunConfig whose run.data and train.init_from are absolute (relative ones taken from `base`): what a new
    run stores, so that it works from any working directory."""
    import dataclasses

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(base.absolute() / path) if value and not path.is_absolute() else value

    run = dataclasses.replace(cfg.run, data=absolute(cfg.run.data))
    train = dataclasses.replace(cfg.train, init_from=absolute(cfg.train.init_from))
    return dataclasses.replace(cfg, run=run, train=train)


def check_unlocked(run_dir: Path) -> None:
    """`UsageError` naming the PID if another process holds `run_dir`'s lock (see `RunLock`)."""
    path = run_dir / LOCK
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked(run_dir) from None
    finally:
        os.close(fd)


def _locked(run_dir: Path) -> UsageError:
    pid = "?"
    for _ in range(20):  # the holder writes its PID right after taking the lock
        pid = (run_dir / LOCK).read_text().strip() if (run_dir / LOCK).is_file() else ""
        if pid:
            break
        time.sleep(0.05)
    return UsageError(
        f"{run_dir}: in use by another titans process (PID {pid or '?'}); wait for it to finish or choose another --out"
    )


class RunLock:
    """One writer per run directory: an exclusive flock on RUN/.lock, which holds the writer's PID.

    The kernel drops an flock when its process dies, so a SIGKILLed run never leaves a stale lock; the file
    itself is removed on release. Opening and locking are two steps, so after locking we check that the file
    at the path is still the one we locked (a releasing holder may have just unlinked it).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        path = self.run_dir / LOCK
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _locked(self.run_dir) from None
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = -1
            if current == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)
        raise _locked(self.run_dir)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            (self.run_dir / LOCK).unlink(missing_ok=True)  # unlink while holding it, then let go
            os.close(self.fd)
            self.fd = None


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temporary files of writes a killed process left half-done (`.NAME.XXXX.tmp`, see
    `atomic_write`) in a run directory and its sub-runs; call it holding the run's lock."""
    for tmp in run_dir.rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(fh)` on a temporary file in `path`'s directory, fsync it, then rename it onto `path`.

    A crash leaves either the old file or the new one, never half of one. The file gets the usual
    permissions (0666 minus the umask); `mkstemp` alone would leave it readable by its owner only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (recorded in manifests for provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, written atomically; NaN and infinity become null (JSON has neither)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def json_safe(obj: Any) -> Any:
    """`obj` with NaN and infinities replaced by None, recursively (strict JSON has neither)."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one metrics row as a single complete line (one write call)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(json_safe(row)) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (crash mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only rows up to `max_step` (on resume, so the continued run does not log a step twice)."""
    rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_metrics_csv(run_dir: Path) -> None:
    """metrics.csv: the rows of metrics.jsonl, flat, with the union of their keys as columns."""
    rows = read_jsonl(run_dir / METRICS_JSONL)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and not isinstance(row[k], dict | list))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / METRICS_CSV, buf.getvalue())


def git_sha() -> str | None:
    """The commit of the titans source tree (with `+dirty` for local changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def environment(device: str, precision: str, seed: int, workers: int = 1) -> dict[str, Any]:
    """What env.json records: versions, git sha, device, precision, seed, threads, workers (torchrun processes),
    command line, time."""
    import numpy
    import polars
    import torch

    return {
        "titans": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "polars": polars.__version__,
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "device": device,
        "precision": precision,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "workers": workers,
        "command": [_program(), *sys.argv[1:]],
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _program() -> str:
    # `python -m titans_cli` reports argv[0] as .../titans_cli/__main__.py; the user typed the same command.
    name = Path(sys.argv[0]).name
    return "titans" if name in ("__main__.py", "titans") else name
