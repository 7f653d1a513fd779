"""Tables of sequences → raw DNA rows: CSV/TSV with `sequence` and (for training) `label` columns.

This is the GUE layout (DNABERT-2's `train.csv`, `dev.csv`, `test.csv`); an optional `id` column is kept.
Output columns are those of `data_recipes.dna.RAW_COLUMNS`; `data_recipes.dna` normalises and writes them.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from titans_cli.engine.errors import DataError


def read_table(path: Path, require_label: bool, id_prefix: str = "") -> pl.DataFrame:
    """Read a CSV (`,`) or TSV (`.tsv`/`.txt`, tab) table of sequences.

    Args:
        path: the table; the header must name a `sequence` column, `label` is needed when `require_label`.
        require_label: refuse a table without labels (training splits) or with a missing label.
        id_prefix: prepended to generated ids (`<prefix><row>`, rows counted from 1 after the header).

    Returns:
        Raw rows: id, sequence, label (str or null), where (error location), coordinates null.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    sep = "\t" if path.suffix.lower() in {".tsv", ".txt", ".tab"} else ","
    try:
        df = pl.read_csv(path, separator=sep, infer_schema=False)  # every column as text: labels stay verbatim
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as err:
        raise DataError(f"{path}: cannot parse as {'TSV' if sep == chr(9) else 'CSV'} ({err})") from err
    columns = {c.strip().lower(): c for c in df.columns}
    if "sequence" not in columns:
        raise DataError(f"{path}: no 'sequence' column (found {', '.join(df.columns)}); add a header line")
    if require_label and "label" not in columns:
        raise DataError(f"{path}: no 'label' column (found {', '.join(df.columns)}); training tables need one")
    row = pl.int_range(1, pl.len() + 1)
    label = pl.col(columns["label"]).str.strip_chars() if "label" in columns else pl.lit(None, pl.String)
    ident = pl.col(columns["id"]) if "id" in columns else pl.lit(id_prefix) + row.cast(pl.String)
    out = df.select(
        id=ident,
        sequence=pl.col(columns["sequence"]).str.strip_chars(),
        label=label,
        where=pl.lit(f"{path} line ") + (row + 1).cast(pl.String),  # +1: the header is line 1
    )
    if require_label:
        missing = out.filter(pl.col("label").is_null() | (pl.col("label") == ""))
        if missing.height:
            raise DataError(f"{missing['where'][0]}: missing label; every training row needs one")
    return out
