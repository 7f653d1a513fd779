"""Where a recipe writes: a staged sibling directory that replaces `--out` whole, only once it is complete.

`titans prepare ... --out DIR` never half-writes DIR and never touches files that are not a prepared set: the
recipe writes into `.DIR.<random>.tmp` beside it, and only a finished set is renamed onto DIR. An existing
prepared set (it has manifest.json) is replaced only with `--overwrite`, since runs trained on it would no
longer evaluate against the same rows; a non-empty directory of anything else is refused even with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.runs import check_output_path, current_umask, first_missing

MANIFEST = "manifest.json"
# What a prepared set holds: the manifest and Parquet splits. Anything else in DIR is the user's.
_OURS = (".parquet", ".json")


def read_manifest(data_dir: Path, recipe: str, prepare: str) -> dict[str, Any]:
    """`data_dir/manifest.json` of a set that `recipe` prepared; a `DataError` names the file and says how to make
    one (`prepare`, the command) when it is missing, is not JSON, or comes from another recipe."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: missing; prepare the data with `{prepare}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err}); prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("recipe") != recipe:
        got = manifest.get("recipe") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: recipe {got!r}, not {recipe!r}; use the matching --task or `{prepare}`")
    return manifest


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an `--out` that cannot be written or that holds something `prepare` may not
    replace (see the module docstring)."""
    check_output_path(out, "--out", directory=True)
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not (out / MANIFEST).is_file():
        raise UsageError(f"--out {out}: not empty and not a prepared data set; choose a new or empty directory")
    others = sorted(p.name for p in out.iterdir() if not (p.is_file() and p.suffix in _OURS))
    if others:
        raise UsageError(
            f"--out {out}: holds files that are not part of the prepared set ({', '.join(others[:3])}); "
            "move them or choose another --out"
        )
    if not overwrite:
        raise UsageError(
            f"--out {out}: already holds prepared data (runs trained on it read it); pass --overwrite to replace "
            "it, or choose another --out"
        )


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty directory beside `out` to write the set into; on success it becomes `out`.

    On failure the staged directory and any parent directories created for it are removed, and `out` is as
    before.
    """
    check_out_dir(out, overwrite)
    created = first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes it private; a prepared set is an ordinary folder
        old = None
        if out.exists():  # an empty directory, or a prepared set being replaced (--overwrite)
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
