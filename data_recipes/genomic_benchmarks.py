"""GenomicBenchmarks folder layout → raw DNA rows per split (Grešová et al. 2023).

`DIR/train/<class>/*.txt` and `DIR/test/<class>/*.txt`, one sequence per file, as the `genomic_benchmarks`
package downloads them. The class is the folder name; the id is `<class>/<file stem>`. There is no validation
split in this layout (docs/conventions.md pitfall 13): `data_recipes.dna` carves one out of train.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from titans_cli.engine.errors import DataError


def _natural_key(path: Path) -> tuple:
    # "10.txt" after "9.txt": files are numbered by the genomic_benchmarks downloader.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem))


def read_split(folder: Path) -> pl.DataFrame:
    """Read one split folder (`train/` or `test/`) whose sub-folders are the classes."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders; expected {folder}/<class>/*.txt")
    ids, seqs, labels, wheres = [], [], [], []
    for class_dir in classes:
        files = sorted(class_dir.glob("*.txt"), key=_natural_key)
        if not files:
            raise DataError(f"{class_dir}: no .txt sequence files")
        for f in files:
            text = f.read_text(encoding="ascii", errors="replace").split()
            ids.append(f"{class_dir.name}/{f.stem}")
            seqs.append("".join(text))  # the downloader writes one line; tolerate wrapping
            labels.append(class_dir.name)
            wheres.append(str(f))
    return pl.DataFrame({"id": ids, "sequence": seqs, "label": labels, "where": wheres})


def read_folder(root: Path) -> dict[str, pl.DataFrame]:
    """{"train": rows, "test": rows (if the folder has one)} of a GenomicBenchmarks dataset folder."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder; expected the GenomicBenchmarks layout train/<class>/*.txt")
    splits = {"train": read_split(root / "train")}
    if (root / "test").is_dir():
        splits["test"] = read_split(root / "test")
    return splits


def folder_files(root: Path) -> list[Path]:
    """Every sequence file of the dataset, in a stable order (for the manifest's input hash)."""
    return sorted(Path(root).glob("*/*/*.txt"))
