"""`titans classify`: class probabilities for every sequence of a FASTA, a CSV/TSV, or FASTA + BED regions.

Output TSV (docs/conventions.md §13): `id`, then `chrom start end strand` for BED input, `label` when the input has one,
`pred` and one `prob_<class>` column per class, rows in input order. Sequences longer than the training length
are read by the Titans backbone through its memory state in pieces of that length (no truncation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, emit_result, log, require_task
from titans_cli.engine.errors import UsageError
from titans_cli.engine.runs import atomic_write_text, check_output_file, removed_on_failure


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
    from data_recipes.dna import read_sequences
    from tasks import get_task
    from tasks.dna import classify_rows
    from titans_cli.engine.checkpoint import load_run
    from titans_cli.engine.runtime import resolve_device

    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    beds = {f"--bed {b}": Path(b.rsplit(":", 1)[0]) for b in bed or []}
    check_output_file(out, "--out", {"--input": input_path, "--fasta": fasta, **beds})
    rows = read_sequences(input_path, fasta, bed or [], label_regex, length, crop)  # errors before the model loads
    loaded = load_run(run, which=checkpoint, device=resolve_device(device), get_task=get_task)
    require_task(loaded.task.name, "dna", run, "classify")
    table, result = classify_rows(loaded, rows, batch_size, None if rc_tta == "run" else rc_tta)
    piece = result["piece_len"]
    if result["streamed"]:
        log(f"{result['streamed']} sequences longer than {piece} bases are read through the memory in pieces of "
            f"{piece}", quiet)  # fmt: skip
    if result["cropped"]:
        log(f"{result['cropped']} sequences are longer than the CNN's input length and were cropped (task.cnn_crop)",
            quiet)  # fmt: skip
    with removed_on_failure(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, table.write_csv(separator="\t", float_precision=6))
    emit_result({"out": str(out), **{k: v for k, v in result.items() if k != "piece_len"}}, json_out)
