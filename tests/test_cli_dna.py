"""CLI round trip for DNA on real fixtures: prepare dna → train (2 steps) → eval → classify (CSV, FASTA, BED);
predictions join back to the input ids; error exit codes and one-line messages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from titans_cli.cli import app

FIX = Path(__file__).parent / "fixtures" / "dna"
GUE = FIX / "gue"
SARS = FIX / "sars_cov_2"
runner = CliRunner()


def invoke(*args: str | Path | int) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_dna")
    data = root / "data"
    res = invoke("prepare", "dna", "--train", GUE / "train.csv", "--val", GUE / "dev.csv", "--test", GUE / "test.csv",
                 "--out", data, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout)
    assert manifest["classes"] == ["0", "1"] and manifest["splits"]["test"]["rows"] == 60
    run = root / "run"
    res = invoke("train", "--task", "dna", "--preset", "dna_tiny", "--data", data, "--out", run, "--max-steps", 2, "-q")
    assert res.exit_code == 0, res.output
    ref = Path(shutil.copy(SARS / "nCoV-2019.reference.fasta", root / "ref.fasta"))
    return {"root": root, "data": data, "run": run, "ref": ref}


def test_prepare_prints_balance_lengths_and_duplicates(tmp_path: Path) -> None:
    res = invoke("prepare", "dna", "--train", GUE / "train.csv", "--val-frac", "0.2", "--out", tmp_path / "d")
    assert res.exit_code == 0, res.output
    assert "train      192 rows | 0=94 1=98 | length min 300 median 300 max 300 | N bases 0" in res.stdout
    assert "identical sequences across splits: train-val 1" in res.stdout  # a real duplicate in GUE train


def test_eval_reports_every_metric_and_the_majority_reference(trained: dict[str, Path]) -> None:
    res = invoke("eval", "--run", trained["run"], "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {"accuracy", "mcc", "f1_macro", "auroc", "auprc", "confusion_matrix", "per_class"} <= set(report)
    assert report["n"] == 60 and sum(map(sum, report["confusion_matrix"])) == 60
    assert report["majority_class"] == {
        "class": "1",
        "accuracy": 28 / 60,
        "mcc": 0.0,
        "f1_macro": pytest.approx(0.318181818),
    }
    res = invoke("eval", "--run", trained["run"], "--opt", "rc_tta=both")
    assert res.exit_code == 2 and "expected none or mean" in res.stderr


def test_classify_table_joins_back_to_input_rows(trained: dict[str, Path]) -> None:
    out = trained["root"] / "pred.tsv"
    res = invoke("classify", "--run", trained["run"], "--input", GUE / "test.csv", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sequences"] == 60
    pred = pl.read_csv(out, separator="\t", infer_schema=False)
    assert pred.columns == ["id", "label", "pred", "prob_0", "prob_1"]
    source = pl.read_csv(GUE / "test.csv", infer_schema=False).with_row_index("id", offset=1)
    joined = pred.join(source.with_columns(pl.col("id").cast(pl.String)), on="id")
    assert joined.height == 60 and (joined["label"] == joined["label_right"]).all()
    total = pred["prob_0"].cast(pl.Float64) + pred["prob_1"].cast(pl.Float64)
    assert ((total - 1).abs() < 1e-5).all()


def test_classify_fasta_keeps_input_order_and_rc_tta(trained: dict[str, Path]) -> None:
    seqs = pl.read_csv(GUE / "test.csv")["sequence"].to_list()[:7]
    names = [f"seq_{c}" for c in "gfedcba"]
    fasta = trained["root"] / "in.fa"
    fasta.write_text(
        "".join(f">{n} some description\n{s[:150]}\n{s[150:].lower()}\n" for n, s in zip(names, seqs, strict=True))
    )
    out = trained["root"] / "pred_fa.tsv"
    res = invoke("classify", "--run", trained["run"], "--input", fasta, "--out", out, "--rc-tta", "mean")
    assert res.exit_code == 0, res.output
    pred = pl.read_csv(out, separator="\t")
    assert pred["id"].to_list() == names and pred.columns == ["id", "pred", "prob_0", "prob_1"]


def test_classify_bed_regions_with_strand_and_long_sequences(trained: dict[str, Path]) -> None:
    inserts, primers = trained["root"] / "inserts.bed", trained["root"] / "primers.bed"
    inserts.write_text("".join((SARS / "nCoV-2019.insert.bed").read_text().splitlines(keepends=True)[:6]))
    primers.write_text("".join((SARS / "nCoV-2019.primer.bed").read_text().splitlines(keepends=True)[:8]))
    out = trained["root"] / "pred_bed.tsv"
    res = invoke("classify", "--run", trained["run"], "--fasta", trained["ref"], "--bed", inserts, "--bed", primers,
                 "--out", out, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["streamed"] == 6  # inserts are 330-360 bp: longer than the 300 bp training length
    assert "read through the memory in pieces of 300" in res.stderr
    pred = pl.read_csv(out, separator="\t", infer_schema=False)
    assert pred.columns[:6] == ["id", "chrom", "start", "end", "strand", "pred"]
    assert pred.height == 6 + 8 and pred["id"][6] == "nCoV-2019_1_LEFT"
    right = pred.filter(pl.col("id") == "nCoV-2019_1_RIGHT")
    assert right.select("start", "end", "strand").row(0) == ("385", "410", "-")


def test_errors_are_one_line_with_exit_codes(trained: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sequence,label\nACGT,0\nACXT,1\n")
    res = invoke("prepare", "dna", "--train", bad, "--out", tmp_path / "o")
    assert res.exit_code == 3
    assert res.stderr.strip().splitlines() == [f"error: {bad} line 3: invalid character 'X' at position 3; "
                                               "only A, C, G, T, N and IUPAC ambiguity codes are allowed"]  # fmt: skip
    res = invoke("prepare", "dna", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "give one input" in res.stderr
    bed = tmp_path / "r.bed"
    bed.write_text("chrMN908947.3\t1\t50\n")
    res = invoke("prepare", "dna", "--fasta", trained["ref"], "--bed", f"{bed}:1", "--out", tmp_path / "o")
    assert res.exit_code == 3 and "strip it from the BED" in res.stderr
    res = invoke("classify", "--run", trained["run"], "--input", bad, "--out", tmp_path / "p.tsv")
    assert res.exit_code == 3 and "position 3" in res.stderr and not (tmp_path / "p.tsv").exists()
    res = invoke("classify", "--run", tmp_path / "nowhere", "--input", GUE / "test.csv", "--out", tmp_path / "p.tsv")
    assert res.exit_code == 2
