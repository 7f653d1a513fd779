"""`titans prepare dna` recipes on real fixtures (GUE rows, the SARS-CoV-2 reference and its BED files) and on
small hand-made inputs for every validation error of `titans prepare dna`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from data_recipes.dna import DnaPrepareOptions, prepare, stratified_split
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.runs import sha256_file
from titans_cli.engine.sequence import reverse_complement

FIX = Path(__file__).parents[1] / "fixtures" / "dna"
GUE = FIX / "gue"
SARS = FIX / "sars_cov_2"


@pytest.fixture()
def ref(tmp_path: Path) -> Path:
    return Path(shutil.copy(SARS / "nCoV-2019.reference.fasta", tmp_path / "ref.fasta"))


def read(out: Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(out / f"{split}.parquet")


def test_gue_tables_keep_the_given_splits(tmp_path: Path) -> None:
    opts = DnaPrepareOptions(train=GUE / "train.csv", val=GUE / "dev.csv", test=GUE / "test.csv")
    manifest = prepare(opts, tmp_path / "out")
    assert manifest["classes"] == ["0", "1"]
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 240, "val": 60, "test": 60}
    assert manifest["splits"]["train"]["class_counts"] == {"0": 117, "1": 123}
    assert manifest["splits"]["train"]["length"] == {"min": 300, "median": 300.0, "mean": 300.0, "max": 300}
    assert manifest["inputs"][0]["sha256"] == sha256_file(GUE / "train.csv")
    train = read(tmp_path / "out", "train")
    assert train.columns == ["id", "sequence", "label", "chrom", "start", "end", "strand"]
    raw = pl.read_csv(GUE / "train.csv", infer_schema=False)
    assert train["sequence"].to_list() == raw["sequence"].to_list()  # already clean: unchanged, in file order
    assert train["label"].to_list() == raw["label"].to_list()
    assert train["id"][0] == "train:1" and train["chrom"].null_count() == 240
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_val_frac_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    manifest = prepare(DnaPrepareOptions(train=GUE / "train.csv", val_frac=0.25, test_frac=0.2), tmp_path / "o")
    counts = {k: v["class_counts"] for k, v in manifest["splits"].items()}
    # 117 zeros / 123 ones: test takes round(0.2 n_c), val round(0.25 of the rest) of every class.
    assert counts["test"] == {"0": 23, "1": 25}
    assert counts["val"] == {"0": 24, "1": 24}
    assert counts["train"] == {"0": 70, "1": 74}
    ids = [set(read(tmp_path / "o", s)["id"].to_list()) for s in ("train", "val", "test")]
    assert sum(map(len, ids)) == 240 and len(set.union(*ids)) == 240  # a partition of the input rows
    again = prepare(DnaPrepareOptions(train=GUE / "train.csv", val_frac=0.25, test_frac=0.2), tmp_path / "p")
    assert again["splits"] == manifest["splits"]
    assert read(tmp_path / "p", "val")["id"].to_list() == read(tmp_path / "o", "val")["id"].to_list()


def test_stratified_split_keeps_class_ratios_exactly() -> None:
    labels = ["a"] * 900 + ["b"] * 90 + ["c"] * 10
    mask = stratified_split(labels, 0.1, seed=3)
    held = [lab for lab, m in zip(labels, mask, strict=True) if m]
    assert (held.count("a"), held.count("b"), held.count("c")) == (90, 9, 1)


def test_fasta_bed_with_label_column_and_minus_strand(tmp_path: Path, ref: Path) -> None:
    primers = SARS / "nCoV-2019.primer.bed"
    opts = DnaPrepareOptions(fasta=ref, bed=(str(primers),), label_col=5, val_frac=0.2)
    manifest = prepare(opts, tmp_path / "o")
    assert manifest["classes"] == ["1", "2"]  # the ARTIC pool column
    rows = pl.concat([read(tmp_path / "o", s) for s in ("train", "val")])
    assert rows.height == 218
    right = rows.filter(pl.col("id") == "nCoV-2019_1_RIGHT").row(0, named=True)
    assert (right["chrom"], right["start"], right["end"], right["strand"]) == ("MN908947.3", 385, 410, "-")
    assert right["sequence"] == "CATCTTTAAGATGTTGACGTGCCTC"  # reverse complemented, as the primer is ordered
    left = rows.filter(pl.col("id") == "nCoV-2019_1_LEFT").row(0, named=True)
    assert left["sequence"] == "ACCAACCAACTTTCGATCTCTTGT"
    assert (rows["end"] - rows["start"] == rows["sequence"].str.len_chars().cast(pl.Int64)).all()


def test_fasta_bed_one_label_per_file_and_length_resize(tmp_path: Path, ref: Path) -> None:
    pos, neg = tmp_path / "pos.bed", tmp_path / "neg.bed"
    pos.write_text("MN908947.3\t1000\t1010\tp1\t0\t+\nMN908947.3\t2000\t2001\tp2\t0\t-\n")
    neg.write_text("MN908947.3\t5000\t5100\nMN908947.3\t6000\t6100\n")
    opts = DnaPrepareOptions(fasta=ref, bed=(f"{pos}:1", f"{neg}:0"), length=20, val_frac=0.5)
    prepare(opts, tmp_path / "o")
    rows = pl.concat([read(tmp_path / "o", s) for s in ("train", "val")]).sort("start")
    assert rows["label"].to_list() == ["1", "1", "0", "0"]
    assert rows.select("start", "end").rows() == [(995, 1015), (1990, 2010), (5040, 5060), (6040, 6060)]
    assert rows["id"].to_list()[:2] == ["p1", "p2"] and rows["id"][2] == "MN908947.3:5000-5100(.)"
    plus = ref.read_text().split("\n", 1)[1].replace("\n", "")
    assert rows["sequence"][1] == reverse_complement(plus[1990:2010])


def test_interval_past_contig_end_errors_or_is_skipped(tmp_path: Path, ref: Path) -> None:
    bed = tmp_path / "r.bed"
    bed.write_text("MN908947.3\t10\t20\ta\t0\t+\nMN908947.3\t29900\t29910\tb\t0\t+\nMN908947.3\t30\t40\tc\t0\t+\n")
    with pytest.raises(
        DataError, match=r"r\.bed line 2: interval MN908947\.3:29900-29910 .*length 29903.*--skip-invalid"
    ):
        prepare(
            DnaPrepareOptions(fasta=ref, bed=(f"{bed}:x", str(SARS / "nCoV-2019.insert.bed") + ":y")), tmp_path / "o"
        )
    opts = DnaPrepareOptions(fasta=ref, bed=(f"{bed}:x", str(SARS / "nCoV-2019.insert.bed") + ":y"), skip_invalid=True)
    manifest = prepare(opts, tmp_path / "o")
    assert manifest["normalization"]["skipped_invalid"] == 1
    assert sum(s["rows"] for s in manifest["splits"].values()) == 2 + 98


def test_chromosome_name_mismatch_is_an_error_with_the_fix(tmp_path: Path, ref: Path) -> None:
    bed = tmp_path / "r.bed"
    bed.write_text("chrMN908947.3\t10\t20\nchrMN908947.3\t30\t40\n")
    with pytest.raises(DataError, match=r"r\.bed: chromosome names not in .*ref\.fasta: chrMN908947\.3 .*strip"):
        prepare(DnaPrepareOptions(fasta=ref, bed=(f"{bed}:1",)), tmp_path / "o")


def test_val_and_test_chromosomes(tmp_path: Path) -> None:
    fa = tmp_path / "two.fa"
    fa.write_text(">c1\n" + "ACGT" * 50 + "\n>c2\n" + "GGCC" * 50 + "\n>c3\n" + "TTAA" * 50 + "\n")
    bed = tmp_path / "r.bed"
    bed.write_text(
        "".join(f"c{c}\t{s}\t{s + 8}\tr{c}_{s}\t0\t+\t{s % 3}\n" for c in (1, 2, 3) for s in range(0, 90, 10))
    )
    opts = DnaPrepareOptions(fasta=fa, bed=(str(bed),), label_col=7, val_chroms=("c2",), test_chroms=("c3",))
    manifest = prepare(opts, tmp_path / "o")
    for split, chrom in (("train", "c1"), ("val", "c2"), ("test", "c3")):
        assert read(tmp_path / "o", split)["chrom"].unique().to_list() == [chrom]
    assert manifest["splits"]["val"]["rows"] == 9 and read(tmp_path / "o", "val")["sequence"][0] == "GGCCGGCC"
    with pytest.raises(UsageError, match="--val-chroms: no intervals on c9"):
        prepare(DnaPrepareOptions(fasta=fa, bed=(str(bed),), label_col=7, val_chroms=("c9",)), tmp_path / "p")


def test_labelled_fasta_normalises_iupac_and_lowercase(tmp_path: Path) -> None:
    fa = tmp_path / "s.fa"
    fa.write_text(">a class=pos\nacgtRY\n>b class=neg\nACGT\n>c class=pos\nGGGG\n>d class=neg\nTTTTn\n")
    manifest = prepare(DnaPrepareOptions(fasta=fa, label_regex=r"class=(\w+)", val_frac=0.5), tmp_path / "o")
    assert manifest["classes"] == ["neg", "pos"]
    assert manifest["normalization"]["iupac_to_n"] == 2 and manifest["normalization"]["lowercase"] == 5
    rows = pl.concat([read(tmp_path / "o", s) for s in ("train", "val")]).sort("id")
    assert rows["sequence"].to_list() == ["ACGTNN", "ACGT", "GGGG", "TTTTN"]
    assert rows["label"].to_list() == ["pos", "neg", "pos", "neg"]


def test_labelled_fasta_errors_name_the_record(tmp_path: Path) -> None:
    fa = tmp_path / "s.fa"
    fa.write_text(">a class=pos\nACGT\n>b nolabel\nACGT\n")
    with pytest.raises(DataError, match=r"s\.fa line 3: header 'b nolabel' does not match --label-regex"):
        prepare(DnaPrepareOptions(fasta=fa, label_regex=r"class=(\w+)"), tmp_path / "o")
    fa.write_text(">a class=pos\nACGT\n>b class=neg\nAC-T\n")
    with pytest.raises(DataError, match=r"s\.fa record 'b' \(line 3\): invalid character '-' at position 3"):
        prepare(DnaPrepareOptions(fasta=fa, label_regex=r"class=(\w+)"), tmp_path / "o")
    with pytest.raises(UsageError, match="--label-regex"):
        prepare(DnaPrepareOptions(fasta=fa, label_regex="class=("), tmp_path / "o")


def test_genomic_benchmarks_folder(tmp_path: Path) -> None:
    root = tmp_path / "gb"
    for split, n in (("train", 10), ("test", 4)):
        for cls, base in (("negative", "A"), ("positive", "C")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{i}.txt").write_text(base * (5 + i) + "G\n")
    manifest = prepare(DnaPrepareOptions(genomic_benchmarks=root, val_frac=0.2), tmp_path / "o")
    assert manifest["classes"] == ["negative", "positive"]
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 16, "val": 4, "test": 8}
    test = read(tmp_path / "o", "test")
    assert test["id"].to_list()[:3] == ["negative/0", "negative/1", "negative/2"]
    assert test["sequence"][1] == "AAAAAAG" and manifest["inputs"][0]["files"] == 28


def test_length_crop_and_pad_are_counted(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("sequence,label\nAAAACCCCGG,0\nACG,1\nTTTTTTTT,0\nGG,1\n")
    opts = DnaPrepareOptions(train=csv, val=csv, length=4, crop="right", pad="left")
    manifest = prepare(opts, tmp_path / "o")
    assert read(tmp_path / "o", "train")["sequence"].to_list() == ["CCGG", "NACG", "TTTT", "NNGG"]
    assert manifest["normalization"]["truncated"] == 4 and manifest["normalization"]["padded"] == 4  # 2 per split
    assert manifest["duplicates_across_splits"] == {"train-val": 4}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("seq,label\nACGT,0\n", r"t\.csv: no 'sequence' column"),
        ("sequence\nACGT\n", r"t\.csv: no 'label' column"),
        ("sequence,label\nACGT,0\nACGT,\n", r"t\.csv line 3: missing label"),
        ("sequence,label\nACGT,0\n,1\n", r"t\.csv line 3: empty sequence"),
        ("sequence,label\nACGT,0\nACGTXA,1\n", r"t\.csv line 3: invalid character 'X' at position 5"),
        ("sequence,label\nACGT,0\nACGT,0\n", r"only one class \('0'\)"),
    ],
)
def test_table_validation_errors(tmp_path: Path, content: str, message: str) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(content)
    with pytest.raises(DataError, match=message):
        prepare(DnaPrepareOptions(train=csv, val=csv), tmp_path / "o")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("MN908947.3\tten\t20\n", r"r\.bed line 1: start/end 'ten', '20' are not integers"),
        ("MN908947.3\t10\n", r"r\.bed line 1: expected at least 3 columns"),
        ("MN908947.3\t10\t20\ta\t0\t*\n", r"r\.bed line 1: strand \(column 6\) is '\*'"),
        ("MN908947.3\t20\t20\ta\t0\t+\n", r"r\.bed line 1: interval MN908947\.3:20-20 is empty"),
        ("MN908947.3\t10\t20\n", r"r\.bed line 1: no label in column 5"),
    ],
)
def test_bed_validation_errors(tmp_path: Path, ref: Path, line: str, message: str) -> None:
    bed = tmp_path / "r.bed"
    bed.write_text(line)
    with pytest.raises(DataError, match=message):
        prepare(DnaPrepareOptions(fasta=ref, bed=(str(bed),), label_col=5), tmp_path / "o")


def test_class_missing_from_train_and_bad_option_combinations(tmp_path: Path) -> None:
    train, val = tmp_path / "t.csv", tmp_path / "v.csv"
    train.write_text("sequence,label\nACGT,a\nCCGT,b\n")
    val.write_text("sequence,label\nACGT,a\nCCGT,c\n")
    with pytest.raises(DataError, match="classes c occur in val/test but not in train"):
        prepare(DnaPrepareOptions(train=train, val=val), tmp_path / "o")
    with pytest.raises(UsageError, match="give one input"):
        prepare(DnaPrepareOptions(), tmp_path / "o")
    with pytest.raises(UsageError, match="needs --label-regex"):
        prepare(DnaPrepareOptions(fasta=SARS / "nCoV-2019.reference.fasta"), tmp_path / "o")
    with pytest.raises(UsageError, match="--val-chroms"):
        prepare(DnaPrepareOptions(train=train, val_chroms=("c1",)), tmp_path / "o")


def test_stale_split_files_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "o"
    prepare(DnaPrepareOptions(train=GUE / "train.csv", val=GUE / "dev.csv", test=GUE / "test.csv"), out)
    prepare(DnaPrepareOptions(train=GUE / "train.csv", val=GUE / "dev.csv"), out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.parquet", "val.parquet"]
