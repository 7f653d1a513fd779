"""`titans prepare recall`: wiring for the synthetic associative-recall generator (`data_recipes/recall.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from titans_cli.commands.common import Debug, JsonOut, Quiet, emit_result, log


def recall(
    out: Annotated[Path, typer.Option(help="Output directory for the Parquet splits and manifest.json.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 1024,
    pairs: Annotated[int, typer.Option(help="Key-value pairs hidden in the context of each sequence.")] = 4,
    queries: Annotated[int, typer.Option(help="Pairs asked about at the end of each sequence.")] = 4,
    vocab: Annotated[int, typer.Option(help="Distinct keys (= distinct values); chance accuracy is 1/vocab.")] = 16,
    min_gap: Annotated[
        int, typer.Option(help="Filler tokens between the last pair and the first query, at least.")
    ] = 256,
    filler_vocab: Annotated[int, typer.Option(help="Distinct filler (noise) tokens; 1 = constant filler.")] = 1,
    n_train: Annotated[int, typer.Option(help="Training sequences.")] = 10000,
    n_val: Annotated[int, typer.Option(help="Validation sequences.")] = 200,
    n_test: Annotated[int, typer.Option(help="Test sequences.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the generator (each split has its own stream).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already in --out.")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Generate a seeded multi-query associative-recall dataset as Parquet + manifest.json.

    Example: titans prepare recall --out data/recall-1k --seq-len 1024 --pairs 4 --vocab 16
    """
    from data_recipes.output import staged_dir
    from data_recipes.recall import RecallSpec, prepare

    spec = RecallSpec(
        seq_len=seq_len,
        pairs=pairs,
        queries=queries,
        vocab=vocab,
        min_gap=min_gap,
        filler_vocab=filler_vocab,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=seed,
    )
    with staged_dir(out, overwrite) as stage:
        manifest = prepare(spec, stage)
    log(f"wrote {out} ({n_train}/{n_val}/{n_test} sequences of {seq_len} tokens)", quiet)
    rows = {split: info["rows"] for split, info in manifest["splits"].items()}
    emit_result({"out": str(out), "rows": rows, "chance_accuracy": manifest["chance_accuracy"]}, json_out)
