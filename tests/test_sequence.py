"""DNA sequence helpers: reverse complement, IUPAC normalisation, coordinates, pyfaidx handles.

The coordinate test is the one that matters: SARS-CoV-2 genes from `annotation.gff` (1-based closed),
converted to BED (0-based half-open) and cut from the reference with pyfaidx, translate to the same proteins as
the CDS features of `reference_seq.gb` read from its own ORIGIN sequence: an off-by-one anywhere shifts the frame.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from titans_cli.engine import sequence as sq
from titans_cli.engine.errors import DataError

SARS = Path(__file__).parent / "fixtures" / "dna" / "sars_cov_2"
CONTIG = "MN908947.3"

# Standard genetic code (NCBI table 1), codons in TCAG order: a tiny translator, no Biopython.
_BASES = "TCAG"
_AMINO = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
CODE = {a + b + c: _AMINO[16 * i + 4 * j + k] for i, a in enumerate(_BASES) for j, b in enumerate(_BASES)
        for k, c in enumerate(_BASES)}  # fmt: skip


def translate(dna: str) -> str:
    assert len(dna) % 3 == 0, f"CDS length {len(dna)} is not a multiple of 3"
    return "".join(CODE[dna[i : i + 3]] for i in range(0, len(dna), 3))


def genbank_cds(path: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """(ORIGIN sequence, {gene: (start, end) 1-based closed}) from a GenBank flat file with simple CDS ranges."""
    text = path.read_text()
    origin = "".join(re.findall(r"[acgtn]+", text.split("\nORIGIN")[1].split("//")[0])).upper()
    cds = {}
    for start, end, gene in re.findall(r"\n {5}CDS +(\d+)\.\.(\d+)\n +/gene=\"([^\"]+)\"", text):
        cds[gene] = (int(start), int(end))
    return origin, cds


def gff_genes(path: Path) -> dict[str, tuple[int, int, str]]:
    genes = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        f = line.split("\t")
        genes[f[8].strip().removeprefix("gene_name=")] = (int(f[3]), int(f[4]), f[6])
    return genes


@pytest.fixture()
def reference(tmp_path: Path) -> Path:
    """A private copy of the reference, so the `.fai` index is written in a temporary folder."""
    return Path(shutil.copy(SARS / "nCoV-2019.reference.fasta", tmp_path / "ref.fasta"))


def test_gff_gene_intervals_translate_to_the_genbank_proteins(reference: Path) -> None:
    fasta = sq.open_fasta(reference)
    origin, cds = genbank_cds(SARS / "reference_seq.gb")
    genes = gff_genes(SARS / "annotation.gff")
    assert len(genes) == 12 and set(genes) <= set(cds)
    assert origin == str(fasta[CONTIG][:])  # the GenBank record and the FASTA are the same genome
    for gene, (start1, end1, strand) in genes.items():
        start, end = sq.gff_to_bed(start1, end1)
        assert end - start == end1 - start1 + 1
        protein = translate(sq.fetch(fasta, CONTIG, start, end, strand))
        gb_start, gb_end = cds[gene]
        assert protein == translate(origin[gb_start - 1 : gb_end]), gene
        if gene not in {"ORF1a", "ORF1b"}:  # the ORF1ab halves meet at the -1 ribosomal frameshift
            assert protein[0] == "M" and protein[-1] == "*" and "*" not in protein[:-1], gene
    e_start, e_end = sq.gff_to_bed(*genes["E"][:2])
    # Envelope protein QHD43418.1 (75 aa), an independent check of the whole path.
    envelope = "MYSFVSEETGTLIVNSVLLFLAFVVFLLVTLAILTALRLCAYCCNIVNVSLVKPSFYVYSRVKNLNSSRVPDLLV"
    assert translate(sq.fetch(fasta, CONTIG, e_start, e_end)) == envelope + "*"
    s_start, s_end = sq.gff_to_bed(*genes["S"][:2])
    assert translate(sq.fetch(fasta, CONTIG, s_start, s_end)).startswith("MFVFLVLLPLVSSQCVNLT")


def test_minus_strand_primer_comes_out_reverse_complemented(reference: Path) -> None:
    fasta = sq.open_fasta(reference)
    # ARTIC V3 nCoV-2019_1_LEFT (+, 30-54) and nCoV-2019_1_RIGHT (-, 385-410) as ordered from the vendor.
    assert sq.fetch(fasta, CONTIG, 30, 54, "+") == "ACCAACCAACTTTCGATCTCTTGT"
    assert sq.fetch(fasta, CONTIG, 385, 410, "-") == "CATCTTTAAGATGTTGACGTGCCTC"
    assert sq.fetch(fasta, CONTIG, 385, 410, "-") == sq.reverse_complement(sq.fetch(fasta, CONTIG, 385, 410))


def test_reverse_complement_of_acgtn_iupac_and_case() -> None:
    assert sq.reverse_complement("ACGTN") == "NACGT"
    assert sq.reverse_complement("RYKMSWBDHVN") == "NBDHVWSKMRY"
    assert sq.reverse_complement("acgTn") == "nAcgt"
    assert sq.reverse_complement("") == ""


@given(st.text(alphabet="ACGTRYKMSWBDHVNacgtrykmswbdhvn", max_size=200))
def test_reverse_complement_is_an_involution(seq: str) -> None:
    assert sq.reverse_complement(sq.reverse_complement(seq)) == seq
    assert len(sq.reverse_complement(seq)) == len(seq)


def test_reverse_complement_refuses_non_nucleotides() -> None:
    with pytest.raises(DataError, match=r"'X' at position 3"):
        sq.reverse_complement("ACXT")


def test_normalize_uppercases_counts_iupac_and_names_bad_positions() -> None:
    assert sq.normalize("acgtRYn", "r1") == ("ACGTNNN", 2, 5)
    with pytest.raises(DataError, match=r"^seqs\.fa record 'x': invalid character 'U' at position 4;"):
        sq.normalize("ACGU", "seqs.fa record 'x'")
    with pytest.raises(DataError, match="empty sequence"):
        sq.normalize("", "r2")


def test_encode_decode_round_trip() -> None:
    ids = sq.encode("ACGTN")
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert sq.decode([*ids.tolist(), sq.PAD_ID]) == "ACGTN"
    # Token-level complement mirrors the string one (used for RC augmentation on batches).
    assert [sq.TOKEN_COMPLEMENT[i] for i in ids.tolist()[::-1]] == sq.encode(sq.reverse_complement("ACGTN")).tolist()


def test_coordinate_conversions() -> None:
    assert sq.gff_to_bed(1, 10) == (0, 10)
    assert sq.bed_to_region("chr1", 0, 10) == "chr1:1-10"
    with pytest.raises(ValueError):
        sq.gff_to_bed(0, 5)
    assert sq.resize_interval(100, 110, 4, "center") == (103, 107)
    assert sq.resize_interval(100, 110, 4, "left") == (100, 104)
    assert sq.resize_interval(100, 110, 4, "right") == (106, 110)
    assert sq.resize_interval(100, 101, 5, "center") == (98, 103)  # the midpoint base stays in the middle


def test_crop_and_pad() -> None:
    assert sq.crop("AACCGGTT", 4, "center") == "CCGG"
    assert sq.crop("AACCGGTT", 4, "left") == "AACC"
    assert sq.crop("AACCGGTT", 4, "right") == "GGTT"
    assert sq.crop("ACG", 4, "center") == "ACG"
    assert sq.pad("ACG", 5, "left") == "NNACG" and sq.pad("ACG", 5, "right") == "ACGNN"


def test_chromosome_mismatch_names_the_contigs_and_the_chr_fix() -> None:
    with pytest.raises(DataError, match=r"regions\.bed: chromosome names not in ref\.fa: chr1, chr2 .*strip it"):
        sq.check_chromosomes({"chr1", "chr2"}, {"1", "2", "X"}, "regions.bed", "ref.fa")
    with pytest.raises(DataError, match="add it to the BED"):
        sq.check_chromosomes({"1"}, {"chr1"}, "regions.bed", "ref.fa")
    with pytest.raises(DataError, match="made for this reference"):
        sq.check_chromosomes({"scaffold_9"}, {"chr1"}, "regions.bed", "ref.fa")
    sq.check_chromosomes({"chr1"}, {"chr1", "chr2"}, "regions.bed", "ref.fa")


def test_one_pyfaidx_handle_per_process(reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = sq.open_fasta(reference)
    assert sq.open_fasta(reference) is first
    monkeypatch.setattr(sq.os, "getpid", lambda: -1)  # as in a forked worker: a new process id
    assert sq.open_fasta(reference) is not first


def test_read_fasta_records_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.fa"
    path.write_text(">a one\nAC\nGT\n\n>b\nnn\n")
    records = list(sq.read_fasta(path))
    assert [(r.name, r.header, r.sequence, r.line) for r in records] == [("a", "a one", "ACGT", 1), ("b", "b", "nn", 5)]
    path.write_text("ACGT\n")
    with pytest.raises(DataError, match=r"x\.fa line 1: sequence before the first '>'"):
        list(sq.read_fasta(path))
