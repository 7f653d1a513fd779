"""DNA sequences: the alphabet and its token ids, IUPAC → N, reverse complement, FASTA reading, and the one
place where genomic coordinates are converted (BED and pyfaidx slices are 0-based half-open; GFF and
samtools/faidx regions are 1-based closed; docs/conventions.md §17, pitfalls 15-19).

Every DNA task and recipe goes through this module, so a coordinate or strand bug can only live here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from titans_cli.engine.errors import DataError

ALPHABET = "ACGTN"  # token ids 0..4, in this order; normalised sequences contain nothing else
PAD_ID = len(ALPHABET)  # 5: right padding inside a batch; never a prediction target
VOCAB_SIZE = PAD_ID + 1
IUPAC_AMBIGUOUS = "RYKMSWBDHV"  # two- and three-base codes; all become N (N itself is kept)

Anchor = Literal["center", "left", "right"]
Strand = Literal["+", "-", "."]

# Complements for every IUPAC code in both cases (R=A/G ↔ Y=C/T, K=G/T ↔ M=A/C, B=not A ↔ V=not T,
# D=not C ↔ H=not G; S, W and N are their own complements), so rc() is an involution on all of them.
_COMPLEMENT = str.maketrans("ACGTRYKMSWBDHVNacgtrykmswbdhvn", "TGCAYRMKSWVHDBNtgcayrmkswvhdbn")
_VALID_RC = set("ACGTRYKMSWBDHVNacgtrykmswbdhvn")
_ENCODE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(ALPHABET):
    _ENCODE[ord(_c)] = _i
# Token-level complement for reverse-complement augmentation on encoded batches (pad stays pad).
TOKEN_COMPLEMENT = (3, 2, 1, 0, 4, PAD_ID)


def reverse_complement(seq: str) -> str:
    """Reverse complement of a DNA string, IUPAC codes and case preserved: rc("ACGTN") == "NACGT".

    Raises:
        DataError: on a character that is not a nucleotide or IUPAC code (names it and its position).
    """
    bad = next((i for i, c in enumerate(seq) if c not in _VALID_RC), None)
    if bad is not None:
        raise DataError(f"cannot reverse-complement {seq[bad]!r} at position {bad + 1}: not an IUPAC nucleotide code")
    return seq.translate(_COMPLEMENT)[::-1]


def normalize(seq: str, where: str) -> tuple[str, int, int]:
    """Uppercase, turn IUPAC ambiguity codes into N, and refuse anything else.

    Args:
        seq: raw sequence (soft-masked lowercase allowed).
        where: names the record in error messages, e.g. "train.csv line 17" or "genes.fa record 'x'".

    Returns:
        (normalised sequence over ACGTN, number of IUPAC codes turned into N, number of lowercase bases).
    """
    upper = seq.upper()
    lowercase = sum(seq.count(c) for c in "acgtn" + IUPAC_AMBIGUOUS.lower())
    iupac = sum(upper.count(c) for c in IUPAC_AMBIGUOUS)
    out = upper.translate(str.maketrans(IUPAC_AMBIGUOUS, "N" * len(IUPAC_AMBIGUOUS)))
    first_bad(out, where)
    if not out:
        raise DataError(f"{where}: empty sequence; remove the record or fix its coordinates")
    return out, iupac, lowercase


def first_bad(seq: str, where: str) -> None:
    """Raise a DataError naming the first character of `seq` outside ACGTN (1-based position)."""
    if not seq.strip(ALPHABET):  # the fast path: nothing outside ACGTN
        return
    for i, c in enumerate(seq):
        if c not in ALPHABET:
            raise DataError(
                f"{where}: invalid character {c!r} at position {i + 1}; "
                "only A, C, G, T, N and IUPAC ambiguity codes are allowed"
            )


def encode(seq: str) -> np.ndarray:
    """Token ids (uint8, A=0 C=1 G=2 T=3 N=4) of a normalised sequence."""
    ids = _ENCODE[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
    if (ids == 255).any():
        first_bad(seq, "encode()")
    return ids


def decode(ids: Iterable[int]) -> str:
    """Inverse of `encode`; padding ids are dropped."""
    return "".join(ALPHABET[i] for i in ids if i != PAD_ID)


# Coordinates ---------------------------------------------------------------------------------------


def gff_to_bed(start: int, end: int) -> tuple[int, int]:
    """GFF/GTF/GenBank 1-based closed [start, end] → BED 0-based half-open [start-1, end)."""
    if start < 1 or end < start:
        raise ValueError(f"invalid 1-based closed interval [{start}, {end}]")
    return start - 1, end


def bed_to_region(chrom: str, start: int, end: int) -> str:
    """BED 0-based half-open → samtools/faidx region string, 1-based closed: ("c", 0, 10) → "c:1-10"."""
    return f"{chrom}:{start + 1}-{end}"


def resize_interval(start: int, end: int, length: int, anchor: Anchor) -> tuple[int, int]:
    """Resize a half-open interval to exactly `length` bases around an anchor (may leave the contig).

    center keeps the midpoint (an odd surplus goes to the right), left keeps `start`, right keeps `end`.
    """
    if anchor == "left":
        return start, start + length
    if anchor == "right":
        return end - length, end
    new_start = start + (end - start - length) // 2
    return new_start, new_start + length


def crop(seq: str, length: int, side: Anchor) -> str:
    """Keep `length` characters: the middle (center), the start (left) or the end (right)."""
    if len(seq) <= length:
        return seq
    if side == "left":
        return seq[:length]
    if side == "right":
        return seq[len(seq) - length :]
    start = (len(seq) - length) // 2
    return seq[start : start + length]


def pad(seq: str, length: int, side: Literal["left", "right"]) -> str:
    """Pad with N up to `length` on one side (longer sequences are returned unchanged)."""
    fill = "N" * max(0, length - len(seq))
    return fill + seq if side == "left" else seq + fill


# FASTA -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastaRecord:
    """One record of a FASTA file: `name` is the header's first word, `line` the header's line number."""

    name: str
    header: str
    sequence: str
    line: int


def refuse_gzip(path: Path) -> None:
    """A `DataError` for a gzip/bgzip-compressed file (magic bytes 1f 8b): titans reads plain-text FASTA only
    (pyfaidx would ask for BioPython, the text reader would fail on the first byte)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError:
        return  # the caller's own open reports a missing or unreadable file
    if magic == b"\x1f\x8b":
        raise DataError(f"{path}: gzip-compressed; decompress it first (gunzip -k {path})")


def read_fasta(path: Path) -> Iterator[FastaRecord]:
    """Stream the records of a (small or multi-record) FASTA file; raw sequence, case preserved."""
    refuse_gzip(path)
    header: str | None = None
    header_line = 0
    parts: list[str] = []
    try:
        with open(path, encoding="ascii", errors="strict") as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.strip()
                if line.startswith(">"):
                    if header is not None:
                        yield _record(header, parts, header_line)
                    header, header_line, parts = line[1:].strip(), lineno, []
                elif line and not line.startswith(";"):
                    if header is None:
                        raise DataError(f"{path} line {lineno}: sequence before the first '>' header; not FASTA")
                    parts.append(line)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a plain-text FASTA file ({err.reason} at byte {err.start})") from err
    if header is None:
        raise DataError(f"{path}: no FASTA record found (expected a line starting with '>')")
    yield _record(header, parts, header_line)


def _record(header: str, parts: list[str], line: int) -> FastaRecord:
    name = header.split()[0] if header.split() else ""
    return FastaRecord(name=name, header=header, sequence="".join(parts), line=line)


# pyfaidx handles: one per process and path. A Fasta shared by forked DataLoader workers returns wrong or
# short sequences (mdshw5/pyfaidx#211), so the cache is keyed by the process id and a child opens its own.
_HANDLES: dict[tuple[int, str], object] = {}


def open_fasta(path: Path):  # -> pyfaidx.Fasta (untyped: pyfaidx ships no annotations)
    """The process's pyfaidx handle for an indexed reference FASTA (raw strings, case preserved).

    The `.fai` index is written beside the FASTA, or under `$XDG_CACHE_HOME/titans/fai/` when that folder is
    read-only.
    """
    import pyfaidx

    path = Path(path).resolve()
    key = (os.getpid(), str(path))
    if key in _HANDLES:
        return _HANDLES[key]
    if not path.is_file():
        raise DataError(f"{path}: FASTA file not found")
    refuse_gzip(path)
    index = Path(f"{path}.fai")
    if not index.exists() and not os.access(path.parent, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "titans" / "fai"
        cache.mkdir(parents=True, exist_ok=True)
        index = cache / (hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".fai")
    try:
        handle = pyfaidx.Fasta(str(path), indexname=str(index), as_raw=True, strict_bounds=True)
    except (pyfaidx.FastaIndexingError, pyfaidx.UnsupportedCompressionFormat, ValueError) as err:
        raise DataError(f"{path}: cannot index this FASTA ({err}); bgzip-compress or decompress it") from err
    _HANDLES[key] = handle
    return handle


def contig_lengths(fasta) -> dict[str, int]:
    """{contig name: length} from a pyfaidx handle's index."""
    return {name: len(record) for name, record in fasta.records.items()}


def fetch(fasta, chrom: str, start: int, end: int, strand: str = "+") -> str:
    """Bases [start, end) of `chrom` (BED coordinates; pyfaidx slices are 0-based half-open too).

    Minus-strand intervals come back reverse complemented. Bounds are the caller's job (`check_interval`).
    """
    seq = str(fasta[chrom][start:end])
    return reverse_complement(seq) if strand == "-" else seq


def check_chromosomes(names: Collection[str], available: Collection[str], source: str, fasta: str) -> None:
    """Fail if any chromosome name of `source` is missing from the FASTA, naming them and the likely fix."""
    have = set(available)
    missing = sorted(set(names) - have)
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    hint = "check that the BED was made for this reference"
    if all(("chr" + m) in have for m in missing):
        hint = "the FASTA uses the 'chr' prefix: add it to the BED (sed 's/^/chr/' in.bed > out.bed)"
    elif all(m.startswith("chr") and m[3:] in have for m in missing):
        hint = "the FASTA has no 'chr' prefix: strip it from the BED (sed 's/^chr//' in.bed > out.bed)"
    example = ", ".join(sorted(have)[:3])
    raise DataError(f"{source}: chromosome names not in {fasta}: {shown} (FASTA has e.g. {example}); {hint}")
