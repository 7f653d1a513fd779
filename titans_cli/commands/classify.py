"""`titans classify`: class probabilities for every sequence of a FASTA, a CSV/TSV, or FASTA + BED regions.

Output TSV (conventions §13): `id`, then `chrom start end strand` for BED input, `label` when the input has one,
`pred` and one `prob_<class>` column per class, rows in input order. Sequences longer than the training length
are read by the Titans backbone through its memory state in pieces of that length (no truncation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, emit_result, log
from titans_cli.engine.errors import UsageError
from titans_cli.engine.runs import check_output_file, removed_on_failure

FASTA_SUFFIXES = {".fa", ".fasta", ".fna", ".fas"}


def read_input(
    input_path: Path | None,
    fasta: Path | None,
    bed: list[str],
    label_regex: str | None,
    length: int | None,
    crop: str,
):  # -> polars.DataFrame of normalised rows
    """Rows to classify (id, sequence, label, chrom, start, end, strand), normalised and strand-corrected."""
    import polars as pl

    from data_recipes import fasta as fasta_recipe
    from data_recipes import fasta_bed, gue
    from data_recipes.dna import normalize_rows

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
        if input_path.suffix.lower() in FASTA_SUFFIXES:
            rows = fasta_recipe.read_labelled_fasta(input_path, label_regex, require_label=False)
        else:
            rows = gue.read_table(input_path, require_label=False)
    else:
        raise UsageError("give --input FILE (FASTA, CSV or TSV) or --fasta REF --bed REGIONS")
    if rows.height == 0:
        raise UsageError("the input holds no sequences")
    rows, _ = normalize_rows(rows)
    return rows.drop("where").with_columns(pl.col("label").cast(pl.String))


def classify(
    run: Annotated[Path, typer.Option(help="A `titans train --task dna` run directory (or a .pt checkpoint).")],
    out: Annotated[
        Path, typer.Option(help="Output TSV: id, chrom/start/end/strand (BED input), label (if known), pred, prob_*.")
    ],
    input_path: Annotated[
        Path | None, typer.Option("--input", help="FASTA (.fa/.fasta/.fna) or CSV/TSV with a sequence column.")
    ] = None,
    fasta: Annotated[Path | None, typer.Option(help="Reference FASTA for --bed regions.")] = None,
    bed: Annotated[
        list[str] | None, typer.Option(help="BED regions to classify (- strand: reverse complement).")
    ] = None,
    length: Annotated[int | None, typer.Option(help="BED: resize regions to N bases around --crop first.")] = None,
    crop: Annotated[Literal["center", "left", "right"], typer.Option(help="Anchor of --length.")] = "center",
    label_regex: Annotated[str | None, typer.Option(help="FASTA input: read a true label from headers.")] = None,
    rc_tta: Annotated[
        Literal["run", "none", "mean"], typer.Option(help="Average both strands (mean); run: the run's setting.")
    ] = "run",
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Predict a label and class probabilities for every input sequence, in input order.

    Example: titans classify --run runs/tata --input data/GUE_prom_300_tata/test.csv --out predictions.tsv
    """
    import polars as pl

    from data_recipes.dna import write_atomic_text
    from tasks import get_task
    from tasks.dna import predict_sequences
    from titans_cli.engine.checkpoint import load_run
    from titans_cli.engine.runtime import resolve_device

    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    beds = {f"--bed {b}": Path(b.rsplit(":", 1)[0]) for b in bed or []}
    check_output_file(out, "--out", {"--input": input_path, "--fasta": fasta, **beds})
    rows = read_input(input_path, fasta, bed or [], label_regex, length, crop)  # input errors before the model loads
    loaded = load_run(run, which=checkpoint, device=resolve_device(device), get_task=get_task)
    if loaded.task.name != "dna":
        other = "`titans forecast`" if loaded.task.name == "forecast" else "`titans eval`"
        raise UsageError(f"--run {run} is a {loaded.task.name!r} run; classify needs a dna run (try {other})")
    classes = loaded.meta["classes"]
    seqs = rows["sequence"].to_list()
    piece = getattr(loaded.model, "piece_len", 0)
    long = sum(len(s) > piece for s in seqs) if piece else 0
    if long:
        log(f"{long} sequences longer than {piece} bases are read through the memory in pieces of {piece}", quiet)
    probs, cropped = predict_sequences(loaded, seqs, batch_size, None if rc_tta == "run" else rc_tta)
    if cropped:
        log(f"{cropped} sequences are longer than the CNN's input length and were cropped (task.cnn_crop)", quiet)
    keep = ["id"]
    if "chrom" in rows.columns:  # BED input
        keep += ["chrom", "start", "end", "strand"]
    if rows["label"].null_count() < rows.height:
        keep.append("label")
    table = rows.select(keep).with_columns(
        pl.Series("pred", [classes[i] for i in probs.argmax(1)]),
        *(pl.Series(f"prob_{c}", probs[:, i]) for i, c in enumerate(classes)),
    )
    with removed_on_failure(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_text(table.write_csv(separator="\t", float_precision=6), out)
    counts = {c: int((probs.argmax(1) == i).sum()) for i, c in enumerate(classes)}
    result = {"out": str(out), "sequences": len(seqs), "predicted": counts, "streamed": long, "cropped": cropped}
    emit_result(result, json_out)
