"""`titans prepare dna`: wiring for `data_recipes.dna.prepare` (four input kinds → Parquet splits + manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, emit_result


def _chroms(values: list[str] | None) -> tuple[str, ...]:
    # `--val-chroms chr8,chr9` and `--val-chroms chr8 --val-chroms chr9` mean the same.
    return tuple(c.strip() for v in values or [] for c in v.split(",") if c.strip())


def summary(manifest: dict[str, Any]) -> str:
    """Human-readable prepare report: class balance, lengths, N counts, duplicates across splits."""
    lines = [f"prepared {manifest['input_kind']} input: classes {', '.join(manifest['classes'])}"]
    for name, s in manifest["splits"].items():
        balance = " ".join(f"{c}={n}" for c, n in s["class_counts"].items())
        ln = s["length"]
        lines.append(
            f"  {name:5} {s['rows']:>8} rows | {balance} | length min {ln['min']} median {ln['median']:g} "
            f"max {ln['max']} | N bases {s['n_bases']}"
        )
    norm = manifest["normalization"]
    lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in norm.items()))
    dups = manifest["duplicates_across_splits"]
    lines.append("  identical sequences across splits: " + (", ".join(f"{k} {v}" for k, v in dups.items()) or "-"))
    return "\n".join(lines)


def prepare_dna(
    out: Annotated[Path, typer.Option(help="Output folder: train/val/test.parquet and manifest.json.")],
    train: Annotated[Path | None, typer.Option(help="CSV/TSV with sequence,label columns (GUE train.csv).")] = None,
    val: Annotated[Path | None, typer.Option(help="Validation table (GUE dev.csv); else --val-frac of train.")] = None,
    test: Annotated[Path | None, typer.Option(help="Test table (GUE test.csv); else --test-frac of train.")] = None,
    fasta: Annotated[
        Path | None, typer.Option(help="Reference FASTA (with --bed) or labelled FASTA (with --label-regex).")
    ] = None,
    bed: Annotated[
        list[str] | None,
        typer.Option(help="BED regions (0-based, half-open); FILE:LABEL gives one label per file. Repeatable."),
    ] = None,
    label_col: Annotated[int | None, typer.Option(help="BED column holding the label (1-based, as cut -f).")] = None,
    label_regex: Annotated[
        str | None, typer.Option(help="Regex on FASTA headers: group 'label', else group 1, else the match.")
    ] = None,
    genomic_benchmarks: Annotated[
        Path | None, typer.Option(help="GenomicBenchmarks folder: train/<class>/*.txt, test/<class>/*.txt.")
    ] = None,
    length: Annotated[
        int | None, typer.Option(help="BED: resize intervals to N bases; tables/FASTA: crop longer sequences.")
    ] = None,
    crop: Annotated[
        Literal["center", "left", "right"], typer.Option(help="Which part --length keeps (or anchors, for BED).")
    ] = "center",
    pad: Annotated[
        Literal["none", "left", "right"], typer.Option(help="Pad sequences shorter than --length with N.")
    ] = "none",
    val_frac: Annotated[float, typer.Option(help="Stratified validation fraction of train (no --val).")] = 0.1,
    test_frac: Annotated[float, typer.Option(help="Stratified test fraction of train (no --test).")] = 0.0,
    val_chroms: Annotated[list[str] | None, typer.Option(help="BED: chromosomes for validation (comma list).")] = None,
    test_chroms: Annotated[list[str] | None, typer.Option(help="BED: chromosomes for the test split.")] = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Drop intervals past a contig end (counted) instead of failing.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the stratified splits.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a prepared set already in --out.")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Turn DNA sequences and labels into validated Parquet splits plus manifest.json.

    Example: titans prepare dna --train data/GUE_prom_300_tata/train.csv --val data/GUE_prom_300_tata/dev.csv
    --test data/GUE_prom_300_tata/test.csv --out data/prom_300_tata
    """
    from data_recipes.dna import DnaPrepareOptions, prepare
    from data_recipes.output import staged_dir

    opts = DnaPrepareOptions(
        train=train,
        val=val,
        test=test,
        fasta=fasta,
        bed=tuple(bed or ()),
        label_col=label_col,
        label_regex=label_regex,
        genomic_benchmarks=genomic_benchmarks,
        length=length,
        crop=crop,
        pad=pad,
        val_frac=val_frac,
        test_frac=test_frac,
        val_chroms=_chroms(val_chroms),
        test_chroms=_chroms(test_chroms),
        skip_invalid=skip_invalid,
        seed=seed,
    )
    with staged_dir(out, overwrite) as stage:
        manifest = prepare(opts, stage)
    emit_result({"out": str(out), **manifest}, json_out, human=lambda m: summary(m) + f"\nwritten to {m['out']}")
