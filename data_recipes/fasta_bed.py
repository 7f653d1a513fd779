"""Reference FASTA + BED intervals → raw DNA rows, read through one pyfaidx handle (docs/conventions.md §12).

BED is 0-based half-open (`chrom start end [name score strand ...]`), the same as pyfaidx slices, so no
coordinate arithmetic happens here except `--length` resizing (`titans_cli.engine.sequence.resize_interval`).
Labels: a BED column (`--label-col K`, 1-based like `cut -f`) or one label per file (`--bed pos.bed:1`).
Sequences are returned on the + strand; `data_recipes.dna` normalises them, then reverse-complements `-` rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.sequence import Anchor, check_chromosomes, contig_lengths, open_fasta, resize_interval

STRAND_COL = 6  # BED6: chrom start end name score strand


@dataclass(frozen=True)
class BedSpec:
    """One `--bed` argument: a file, and the label of all its intervals when given as `path:label`."""

    path: Path
    label: str | None = None


def parse_bed_spec(spec: str) -> BedSpec:
    """`regions.bed` or `pos.bed:1`; a path that exists as written is never split at its colon."""
    if Path(spec).exists() or ":" not in spec:
        return BedSpec(Path(spec))
    path, label = spec.rsplit(":", 1)
    if not label:
        raise UsageError(f"--bed {spec!r}: empty label after ':'; use --bed FILE:LABEL")
    return BedSpec(Path(path), label)


def read_bed(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each interval line; header, comment, track and browser lines are skipped."""
    if not path.is_file():
        raise DataError(f"{path}: BED file not found")
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) < 3:
                raise DataError(f"{path} line {lineno}: expected at least 3 columns (chrom start end)")
            yield lineno, fields


@dataclass(frozen=True)
class Interval:
    """A parsed BED line before extraction (0-based half-open, already resized if `--length` is set)."""

    where: str
    id: str
    chrom: str
    start: int
    end: int
    strand: str
    label: str | None


def _parse_interval(
    spec: BedSpec, lineno: int, fields: list[str], label_col: int | None, require_label: bool
) -> Interval:
    where = f"{spec.path} line {lineno}"
    try:
        start, end = int(fields[1]), int(fields[2])
    except ValueError as err:
        raise DataError(f"{where}: start/end {fields[1]!r}, {fields[2]!r} are not integers") from err
    strand = fields[STRAND_COL - 1].strip() if len(fields) >= STRAND_COL else "."
    strand = strand or "."
    if strand not in {"+", "-", "."}:
        raise DataError(f"{where}: strand (column {STRAND_COL}) is {strand!r}; expected +, - or .")
    label = spec.label
    if label_col is not None:
        if len(fields) < label_col or not fields[label_col - 1].strip():
            raise DataError(f"{where}: no label in column {label_col} (--label-col counts from 1)")
        label = fields[label_col - 1].strip()
    if label is None and require_label:
        raise UsageError(f"{spec.path}: intervals need labels: use --label-col K or --bed {spec.path}:LABEL")
    name = fields[3].strip() if len(fields) >= 4 and label_col != 4 else ""
    ident = name or f"{fields[0]}:{start}-{end}({strand})"
    return Interval(where, ident, fields[0], start, end, strand, label)


def read_regions(
    fasta: Path,
    beds: list[BedSpec],
    label_col: int | None = None,
    length: int | None = None,
    anchor: Anchor = "center",
    skip_invalid: bool = False,
    require_label: bool = True,
    skip_hint: bool = True,
) -> tuple[pl.DataFrame, int]:
    """Extract every BED interval from the reference.

    Args:
        fasta: indexed (or indexable) reference FASTA.
        beds: the `--bed` files, each with an optional file-wide label.
        label_col: 1-based BED column holding the label (overrides file labels).
        length: resize each interval to this many bases around `anchor` before extraction.
        skip_invalid: drop intervals with start >= end or outside their contig instead of failing.
        require_label: refuse intervals without a label (prepare); classify passes False.
        skip_hint: an invalid interval's error suggests `--skip-invalid` (only `titans prepare dna` has it).

    Returns:
        (raw rows with coordinates and + strand sequences in BED order, number of skipped intervals).
    """
    handle = open_fasta(fasta)
    sizes = contig_lengths(handle)
    parsed: list[Interval] = []
    for spec in beds:
        intervals = [_parse_interval(spec, n, f, label_col, require_label) for n, f in read_bed(spec.path)]
        check_chromosomes({iv.chrom for iv in intervals}, sizes, str(spec.path), str(fasta))
        parsed.extend(intervals)
    if not parsed:
        raise DataError(f"{', '.join(str(b.path) for b in beds)}: no intervals")

    rows: dict[str, list] = {k: [] for k in ("id", "sequence", "label", "where", "chrom", "start", "end", "strand")}
    skipped = 0
    for iv in parsed:
        start, end = (iv.start, iv.end) if length is None else resize_interval(iv.start, iv.end, length, anchor)
        size = sizes[iv.chrom]
        if start < 0 or end > size or start >= end:
            if skip_invalid:
                skipped += 1
                continue
            resized = f" (resized to {start}-{end} by --length {length})" if length is not None else ""
            raise DataError(
                f"{iv.where}: interval {iv.chrom}:{iv.start}-{iv.end}{resized} is empty or outside the contig "
                f"(length {size}); fix it" + (" or pass --skip-invalid to drop such intervals" if skip_hint else "")
            )
        rows["id"].append(iv.id)
        rows["sequence"].append(str(handle[iv.chrom][start:end]))  # BED and pyfaidx: 0-based half-open
        rows["label"].append(iv.label)
        rows["where"].append(f"{iv.where} ({iv.chrom}:{start}-{end}, + strand)")
        rows["chrom"].append(iv.chrom)
        rows["start"].append(start)
        rows["end"].append(end)
        rows["strand"].append(iv.strand)
    schema = {"id": pl.String, "sequence": pl.String, "label": pl.String, "where": pl.String, "chrom": pl.String}
    schema |= {"start": pl.Int64, "end": pl.Int64, "strand": pl.String}
    return pl.DataFrame(rows, schema=schema), skipped
