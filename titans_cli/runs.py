"""Run-directory contract (conventions §3): layout, overwrite check, env.json, metrics files, atomic writes.

    RUN/config.toml  env.json  metrics.jsonl  metrics.csv  metrics.json  checkpoints/{best,last}.pt
    RUN/<sub-run>/... and RUN/summary.json when a task trains several models (e.g. one per forecast horizon)

Every whole-file output is written to a temporary file in the same directory and renamed into place, so a
crash never leaves a half-written file; metrics.jsonl is appended one complete line per write.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from titans_cli import __version__
from titans_cli.errors import UsageError

CONFIG = "config.toml"
ENV = "env.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
METRICS = "metrics.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
# What `--overwrite` may delete: titans' own artifacts only, never other files a user put there.
_ARTIFACTS = (CONFIG, ENV, METRICS_JSONL, METRICS_CSV, METRICS, SUMMARY, "splits.json", "predictions.parquet")


def default_run_name(task: str, variant: str) -> str:
    """`<task>-<variant>-<UTC timestamp>` (conventions §3)."""
    return f"{task}-{variant}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def is_run_dir(path: Path) -> bool:
    """A directory written by `titans train` (it always holds config.toml)."""
    return (path / CONFIG).is_file()


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Create `path` for a new run; refuse a non-empty directory unless `overwrite` (then clear titans' files).

    Raises `UsageError` for a non-empty directory without `overwrite`, and for a non-empty directory that is
    not a titans run even with it (so `--out ~ --overwrite` cannot delete anything of the user's).
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(
                f"--out {path}: run directory is not empty; pass --overwrite to replace it, "
                f"--resume {path} to continue it, or choose another --out"
            )
        if not is_run_dir(path):
            raise UsageError(f"--out {path}: not empty and not a titans run directory; --overwrite refuses it")
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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


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


def environment(device: str, precision: str, seed: int) -> dict[str, Any]:
    """What env.json records: versions, git sha, device, precision, seed, threads, command line, time."""
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
        "command": [_program(), *sys.argv[1:]],
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _program() -> str:
    # `python -m titans_cli` reports argv[0] as .../titans_cli/__main__.py; the user typed the same command.
    name = Path(sys.argv[0]).name
    return "titans" if name in ("__main__.py", "titans") else name
