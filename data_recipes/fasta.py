"""FASTA with one sequence per record → raw DNA rows; the label comes from the header through a regex.

`--label-regex 'label=(\\w+)'`: the named group `label`, else the first group, else the whole match
(docs/conventions.md pitfall 20: never `int(header[-1])`). Output columns are those of `data_recipes.dna.RAW_COLUMNS`.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.sequence import read_fasta

FASTA_SUFFIXES = {".fa", ".fasta", ".fna", ".fas"}  # an input file read as FASTA rather than a table


def compile_label_regex(pattern: str) -> re.Pattern[str]:
    """Compile `--label-regex`, turning a syntax error into a usage error."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UsageError(f"--label-regex {pattern!r}: {err}") from err


def header_label(regex: re.Pattern[str], header: str) -> str | None:
    """The label a header carries: named group `label`, else group 1, else the whole match; None if no match."""
    match = regex.search(header)
    if match is None:
        return None
    if "label" in regex.groupindex:
        return match.group("label")
    return match.group(1) if regex.groups else match.group(0)


def read_labelled_fasta(path: Path, label_regex: str | None, require_label: bool) -> pl.DataFrame:
    """Read every record of a FASTA file; ids are the headers' first words, in file order.

    Args:
        path: a plain-text FASTA (several records; line-wrapped or not).
        label_regex: regular expression applied to each full header (None: no labels).
        require_label: a header that does not match is an error naming the record and its line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    regex = compile_label_regex(label_regex) if label_regex else None
    ids, seqs, labels, wheres = [], [], [], []
    for rec in read_fasta(path):
        label = header_label(regex, rec.header) if regex else None
        if label is None and require_label:
            raise DataError(
                f"{path} line {rec.line}: header {rec.header!r} does not match --label-regex {label_regex!r}"
            )
        ids.append(rec.name)
        seqs.append(rec.sequence)
        labels.append(label)
        wheres.append(f"{path} record {rec.name!r} (line {rec.line})")
    return pl.DataFrame(
        {"id": ids, "sequence": seqs, "label": labels, "where": wheres},
        schema={"id": pl.String, "sequence": pl.String, "label": pl.String, "where": pl.String},
    )
