"""`titans prepare dna`: four kinds of DNA input → one output format (docs/conventions.md §12).

Inputs (one reader module each): a table of sequences (`gue.py`), reference FASTA + BED (`fasta_bed.py`),
a FASTA with labels in its headers (`fasta.py`), a GenomicBenchmarks folder (`genomic_benchmarks.py`).
Output in `--out DIR`: `train.parquet`, `val.parquet`, `test.parquet` (when there is a test split) with columns
`id, sequence, label, chrom, start, end, strand` (coordinates null unless from BED), and `manifest.json`
(alphabet, classes, per-split class counts and length statistics, N/IUPAC/lowercase counts, truncations,
duplicates across splits, input sha256). Sequences are uppercase over ACGTN; `-` strand regions are reverse
complemented.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from data_recipes import fasta as fasta_recipe
from data_recipes import fasta_bed, genomic_benchmarks, gue
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.runs import atomic_write, atomic_write_text, sha256_file
from titans_cli.engine.sequence import ALPHABET, IUPAC_AMBIGUOUS, Anchor, first_bad

FORMAT = "titans-dna/1"
SPLITS = ("train", "val", "test")
OUT_COLUMNS = ("id", "sequence", "label", "chrom", "start", "end", "strand")
_COORD_SCHEMA = {"chrom": pl.String, "start": pl.Int64, "end": pl.Int64, "strand": pl.String}


@dataclass(frozen=True)
class DnaPrepareOptions:
    """Every `titans prepare dna` option; exactly one input kind must be given (see `input_kind`)."""

    train: Path | None = None
    val: Path | None = None
    test: Path | None = None
    fasta: Path | None = None
    bed: tuple[str, ...] = ()
    label_col: int | None = None
    label_regex: str | None = None
    genomic_benchmarks: Path | None = None
    length: int | None = None
    crop: Anchor = "center"
    pad: Literal["none", "left", "right"] = "none"
    val_frac: float = 0.1
    test_frac: float = 0.0
    val_chroms: tuple[str, ...] = field(default_factory=tuple)
    test_chroms: tuple[str, ...] = field(default_factory=tuple)
    skip_invalid: bool = False
    seed: int = 0


def input_kind(opts: DnaPrepareOptions) -> str:
    """Which of the four input forms the options describe: table, fasta_bed, fasta or genomic_benchmarks."""
    kinds = []
    if opts.train is not None:
        kinds.append("table")
    if opts.fasta is not None and opts.bed:
        kinds.append("fasta_bed")
    elif opts.fasta is not None:
        kinds.append("fasta")
    if opts.genomic_benchmarks is not None:
        kinds.append("genomic_benchmarks")
    if len(kinds) != 1:
        raise UsageError(
            "give one input: --train T.csv [--val V.csv] [--test X.csv], --fasta REF --bed REGIONS, "
            "--fasta SEQS.fa --label-regex REGEX, or --genomic-benchmarks DIR"
        )
    if kinds[0] == "fasta" and not opts.label_regex:
        raise UsageError("--fasta without --bed needs --label-regex to read labels from the headers")
    if (opts.val or opts.test) and kinds[0] != "table":
        raise UsageError("--val/--test name tables; use them with --train")
    if (opts.val_chroms or opts.test_chroms) and kinds[0] != "fasta_bed":
        raise UsageError("--val-chroms/--test-chroms split BED intervals; use them with --fasta and --bed")
    if opts.bed and opts.fasta is None:
        raise UsageError("--bed needs the reference: add --fasta REF.fa")
    for name in ("val_frac", "test_frac"):
        if not 0.0 <= getattr(opts, name) < 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1)")
    if opts.label_col is not None and opts.label_col < 1:
        raise UsageError("--label-col counts BED columns from 1 (as cut -f)")
    if opts.length is not None and opts.length < 1:
        raise UsageError("--length must be a positive number of bases")
    return kinds[0]


# Normalisation -------------------------------------------------------------------------------------------


def normalize_rows(df: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Uppercase, IUPAC → N, refuse other characters (naming record and position), then reverse-complement
    the `-` strand rows. `df` holds raw + strand sequences and a `where` column for messages.
    """
    missing = df.filter(pl.col("sequence").is_null() | (pl.col("sequence") == ""))
    if missing.height:
        raise DataError(f"{missing['where'][0]}: empty sequence; remove the record or fix its coordinates")
    iupac = "[" + IUPAC_AMBIGUOUS + "]"
    out = df.with_columns(
        _lower=pl.col("sequence").str.count_matches("[a-z]"),
        _iupac=pl.col("sequence").str.to_uppercase().str.count_matches(iupac),
        sequence=pl.col("sequence").str.to_uppercase().str.replace_all(iupac, "N"),
    )
    bad = out.filter(pl.col("sequence").str.contains(f"[^{ALPHABET}]"))
    if bad.height:
        first_bad(bad["sequence"][0], bad["where"][0])
    if "strand" in out.columns:
        rc = pl.col("sequence").str.reverse().str.replace_many(["A", "C", "G", "T"], ["T", "G", "C", "A"])
        out = out.with_columns(sequence=pl.when(pl.col("strand") == "-").then(rc).otherwise(pl.col("sequence")))
    counts = {"iupac_to_n": int(out["_iupac"].sum()), "lowercase": int(out["_lower"].sum())}
    return out.drop("_lower", "_iupac"), counts


def apply_length(df: pl.DataFrame, length: int | None, side: Anchor, pad: str) -> tuple[pl.DataFrame, dict[str, int]]:
    """Crop sequences longer than `length` (counted: no silent truncation) and optionally pad shorter ones."""
    if length is None:
        return df, {"truncated": 0, "padded": 0}
    n = pl.col("sequence").str.len_chars().cast(pl.Int64)
    offset = {"left": pl.lit(0), "right": n - length, "center": (n - length) // 2}[side]
    truncated = int((df["sequence"].str.len_chars() > length).sum())
    padded = int((df["sequence"].str.len_chars() < length).sum()) if pad != "none" else 0
    seq = pl.when(n > length).then(pl.col("sequence").str.slice(offset, length)).otherwise(pl.col("sequence"))
    if pad == "left":
        seq = seq.str.pad_start(length, "N")
    elif pad == "right":
        seq = seq.str.pad_end(length, "N")
    return df.with_columns(sequence=seq), {"truncated": truncated, "padded": padded}


# Splits --------------------------------------------------------------------------------------------------


def stratified_split(labels: list[str], frac: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows to hold out: round(frac · n_c) rows of every class c, chosen with `seed`.

    Classes keep their proportions in both parts (up to one row of rounding per class).
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=object)
    mask = np.zeros(len(labels_arr), dtype=bool)
    for label in sorted(set(labels)):
        idx = np.flatnonzero(labels_arr == label)
        take = int(round(frac * len(idx)))
        mask[rng.permutation(idx)[:take]] = True
    return mask


def split_pool(pool: pl.DataFrame, opts: DnaPrepareOptions, given: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """Make the splits the inputs do not give: chromosome lists first, then stratified fractions of train."""
    splits = dict(given)
    rest = pool
    for name, chroms in (("val", opts.val_chroms), ("test", opts.test_chroms)):
        if chroms:
            unknown = sorted(set(chroms) - set(pool["chrom"].unique().to_list()))
            if unknown:
                raise UsageError(f"--{name}-chroms: no intervals on {', '.join(unknown)}")
            splits[name] = rest.filter(pl.col("chrom").is_in(list(chroms)))
            rest = rest.filter(~pl.col("chrom").is_in(list(chroms)))
    for name, frac, seed in (("test", opts.test_frac, opts.seed + 1), ("val", opts.val_frac, opts.seed)):
        if name not in splits and frac > 0:
            mask = stratified_split(rest["label"].to_list(), frac, seed)
            splits[name] = rest.filter(pl.Series(mask))
            rest = rest.filter(pl.Series(~mask))
    splits["train"] = rest
    if "val" not in splits or splits["val"].height == 0:
        raise UsageError("no validation rows: give --val, --val-frac > 0 or --val-chroms")
    return {name: splits[name] for name in SPLITS if name in splits}


# Statistics and output -----------------------------------------------------------------------------------


def sort_classes(labels: set[str]) -> list[str]:
    """Class order of the manifest (and of probability columns): numeric when every label is an integer."""
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def split_stats(df: pl.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Rows, class counts, length distribution and N count of one split."""
    lengths = df["sequence"].str.len_chars()
    counts = dict(df.group_by("label").len().iter_rows())
    return {
        "rows": df.height,
        "class_counts": {c: int(counts.get(c, 0)) for c in classes},
        "length": {
            "min": int(lengths.min()),
            "median": float(lengths.median()),
            "mean": round(float(lengths.mean()), 2),
            "max": int(lengths.max()),
        },
        "n_bases": int(df["sequence"].str.count_matches("N").sum()),
    }


def cross_duplicates(splits: dict[str, pl.DataFrame]) -> dict[str, int]:
    """Rows of the later split whose exact sequence also occurs in the earlier one (a leakage check)."""
    names = list(splits)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            seen = splits[a]["sequence"].unique()
            out[f"{a}-{b}"] = int(splits[b]["sequence"].is_in(seen.implode()).sum())
    return out


def _inputs(opts: DnaPrepareOptions, kind: str) -> list[dict[str, Any]]:
    """Provenance: sha256 of every input file; a GenomicBenchmarks folder gets one digest of its files'."""
    if kind == "genomic_benchmarks":
        root = Path(opts.genomic_benchmarks)
        lines = "".join(f"{f.relative_to(root)}\t{sha256_file(f)}\n" for f in genomic_benchmarks.folder_files(root))
        return [{"path": str(root), "sha256": hashlib.sha256(lines.encode()).hexdigest(), "files": lines.count("\n")}]
    paths = [opts.train, opts.val, opts.test, opts.fasta]
    paths += [fasta_bed.parse_bed_spec(b).path for b in opts.bed]
    return [{"path": str(p), "sha256": sha256_file(Path(p))} for p in paths if p is not None]


def _read(opts: DnaPrepareOptions, kind: str) -> tuple[pl.DataFrame, dict[str, pl.DataFrame], int]:
    """(pool to split, splits given as files, skipped intervals) for the input kind."""
    if kind == "table":
        given = {"train": gue.read_table(opts.train, True, "train:")}
        for name in ("val", "test"):
            if getattr(opts, name) is not None:
                given[name] = gue.read_table(getattr(opts, name), True, f"{name}:")
        return given.pop("train"), given, 0
    if kind == "genomic_benchmarks":
        given = genomic_benchmarks.read_folder(opts.genomic_benchmarks)
        return given.pop("train"), given, 0
    if kind == "fasta":
        return fasta_recipe.read_labelled_fasta(opts.fasta, opts.label_regex, True), {}, 0
    beds = [fasta_bed.parse_bed_spec(b) for b in opts.bed]
    pool, skipped = fasta_bed.read_regions(
        opts.fasta, beds, opts.label_col, opts.length, opts.crop, opts.skip_invalid, require_label=True
    )
    return pool, {}, skipped


def finish_rows(df: pl.DataFrame, opts: DnaPrepareOptions) -> tuple[pl.DataFrame, dict[str, int]]:
    """Normalise, apply `--length`, and give every row the output columns (coordinates null if absent)."""
    df, counts = normalize_rows(df)
    df, length_counts = apply_length(df, opts.length, opts.crop, opts.pad)
    df = df.with_columns(pl.lit(None, dtype).alias(c) for c, dtype in _COORD_SCHEMA.items() if c not in df.columns)
    return df.select(OUT_COLUMNS), counts | length_counts


def prepare(opts: DnaPrepareOptions, out_dir: Path) -> dict[str, Any]:
    """Run the recipe and write the splits and `manifest.json` into `out_dir`; returns the manifest."""
    kind = input_kind(opts)
    pool, given, skipped = _read(opts, kind)
    pool, counts = finish_rows(pool, opts)
    for name, df in list(given.items()):
        given[name], more = finish_rows(df, opts)
        counts = {k: counts[k] + more[k] for k in counts}
    splits = split_pool(pool, opts, given)
    classes = sort_classes({lab for df in splits.values() for lab in df["label"].unique().to_list()})
    if len(classes) < 2:
        raise DataError(f"only one class ({classes[0]!r}) in the input; classification needs at least two")
    missing = [c for c in classes if c not in set(splits["train"]["label"].to_list())]
    if missing:
        raise DataError(f"classes {', '.join(missing)} occur in val/test but not in train; fix the split")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:  # a stale split from an earlier run would be read as part of this dataset
        if name not in splits and (out_dir / f"{name}.parquet").exists():
            (out_dir / f"{name}.parquet").unlink()
    for name, df in splits.items():
        atomic_write(out_dir / f"{name}.parquet", df.write_parquet)
    manifest = {
        "format": FORMAT,
        "recipe": "dna",
        "input_kind": kind,
        "alphabet": ALPHABET,
        "classes": classes,
        "splits": {name: split_stats(df, classes) for name, df in splits.items()},
        "normalization": counts | {"skipped_invalid": skipped},
        "duplicates_across_splits": cross_duplicates(splits),
        "inputs": _inputs(opts, kind),
        "options": json.loads(json.dumps(asdict(opts), default=str)),
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_sequences(
    input_path: Path | None,
    fasta: Path | None,
    bed: list[str],
    label_regex: str | None,
    length: int | None,
    crop: str,
) -> pl.DataFrame:
    """`titans classify`'s input: rows (id, sequence, label, chrom, start, end, strand) of a FASTA, a CSV/TSV, or
    FASTA + BED regions, normalised and strand-corrected; labels as strings (null where unknown)."""
    if bed:
        if fasta is None or input_path is not None:
            raise UsageError("BED input is --fasta REF --bed REGIONS (without --input)")
        specs = [fasta_bed.parse_bed_spec(b) for b in bed]
        rows, _ = fasta_bed.read_regions(
            fasta, specs, None, length, crop, skip_invalid=False, require_label=False, skip_hint=False
        )
    elif input_path is not None:
        if fasta is not None:
            raise UsageError("--fasta is the reference for --bed; pass a FASTA of sequences as --input")
        if input_path.suffix.lower() in fasta_recipe.FASTA_SUFFIXES:
            rows = fasta_recipe.read_labelled_fasta(input_path, label_regex, require_label=False)
        else:
            rows = gue.read_table(input_path, require_label=False)
    else:
        raise UsageError("give --input FILE (FASTA, CSV or TSV) or --fasta REF --bed REGIONS")
    if rows.height == 0:
        raise UsageError("the input holds no sequences")
    rows, _ = normalize_rows(rows)
    return rows.drop("where").with_columns(pl.col("label").cast(pl.String))
