"""A corpus of bad inputs, one per case: each exits with its code and one `error: ...` line on stderr, shows no
traceback, creates and changes no file, and suggests only options that the command it names has.

The cases run in-process (CliRunner) against tiny prepared sets and runs built once per module; every case
compares a snapshot of all files under the module's directory before and after.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from tests.fixtures.timeseries import ett_lines, write_ett_slice
from titans_cli.cli import app
from titans_cli.engine.runs import RunLock
from titans_cli.engine.sequence import open_fasta

runner = CliRunner()
FIX = Path(__file__).parent / "fixtures" / "dna"
GUE = FIX / "gue"
SARS = FIX / "sars_cov_2"
RECALL_DATA = ["--seq-len", "32", "--pairs", "2", "--queries", "2", "--vocab", "8", "--min-gap", "8"]
RECALL_SIZES = ["--n-train", "8", "--n-val", "4", "--n-test", "4"]
RECALL_MODEL = ["--preset", "recall_tiny", "--set", "model.dim=16", "--set", "train.batch_size=4"]


def invoke(*args: str | Path | int):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str | Path | int):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root`, files with their size and modification time (a directory's own
    time moves when a lock or probe file comes and goes, which leaves nothing behind)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns) if path.is_file() else (-1, -1)
    return out


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    p: dict[str, Path] = {"root": root}
    # recall: data and a finished 3-step run, trained with a relative --data from the module's directory
    p["rdata"] = root / "rdata"
    ok("prepare", "recall", "--out", p["rdata"], *RECALL_DATA, *RECALL_SIZES, "-q")
    p["rrun"] = root / "rrun"
    cwd = Path.cwd()
    os.chdir(root)
    try:
        ok("train", "--task", "recall", "--data", "rdata", "--out", "rrun", *RECALL_MODEL, "--max-steps", 3, "-q")
    finally:
        os.chdir(cwd)
    # time series: a real ETTh1 slice, prepared, and a 2-step forecast run (lookback 24, horizon 12)
    p["csv"] = write_ett_slice(root / "slice.csv", 300)
    p["tdata"] = root / "tdata"
    ok("prepare", "timeseries", "--input", p["csv"], "--out", p["tdata"], "--lookback", 24, "--horizon", 12, "-q")
    p["frun"] = root / "frun"
    ok("train", "--task", "forecast", "--preset", "forecast_tiny", "--data", p["tdata"], "--out", p["frun"],
       "--max-steps", 2, "-q")  # fmt: skip
    # a multi-horizon parent whose h24 never finished (only h12 is there)
    p["multi"] = root / "multi"
    shutil.copytree(p["frun"], p["multi"] / "h12")
    config = (p["frun"] / "config.toml").read_text()
    (p["multi"] / "config.toml").write_text(re.sub(r"horizon = \[12\]", "horizon = [12, 24]", config))
    # bad series files
    lines = ett_lines(300)
    p["nan_csv"] = _edit(root / "nan.csv", lines, 50, lambda cells: cells[:2] + [""] + cells[3:])
    p["inf_csv"] = _edit(root / "inf.csv", lines, 50, lambda cells: cells[:2] + ["inf"] + cells[3:])
    p["big_csv"] = _edit(root / "big.csv", lines, 50, lambda cells: cells[:2] + ["1e308"] + cells[3:])
    p["semi_csv"] = root / "semi.csv"
    p["semi_csv"].write_text("\n".join(line.replace(",", ";") for line in lines) + "\n")
    p["dup_csv"] = root / "dup.csv"
    p["dup_csv"].write_text("\n".join([*lines[:30], lines[29], *lines[30:]]) + "\n")
    p["short_csv"] = write_ett_slice(root / "short.csv", 10)
    p["cols_csv"] = root / "cols.csv"
    p["cols_csv"].write_text("\n".join(",".join(line.split(",")[:3]) for line in lines) + "\n")
    # DNA inputs: a gzip-compressed FASTA, a BED past the contig end, a prepared set
    p["ref"] = Path(shutil.copy(SARS / "nCoV-2019.reference.fasta", root / "ref.fasta"))
    p["ref_gz"] = root / "ref.fasta.gz"
    p["ref_gz"].write_bytes(gzip.compress(p["ref"].read_bytes()))
    p["fa_gz"] = root / "seqs.fa"
    p["fa_gz"].write_bytes(gzip.compress(b">s1\nACGT\n"))
    p["bed_past"] = root / "past.bed"
    p["bed_past"].write_text("MN908947.3\t29000\t40000\tx\t1\t+\n")
    p["ddata"] = root / "ddata"
    ok("prepare", "dna", "--train", GUE / "train.csv", "--val", GUE / "dev.csv", "--out", p["ddata"], "-q")
    open_fasta(p["ref"])  # pyfaidx writes ref.fasta.fai at first use: before the snapshots, not during a case
    # checkpoints that must be refused: a crafted pickle and garbage
    p["evil"] = root / "evil.pt"
    torch.save({"x": _Evil()}, p["evil"])
    p["garbage"] = root / "garbage.pt"
    p["garbage"].write_bytes(b"PK\x03\x04 truncated")
    # places that cannot take output: a file, a directory of the user's, /proc
    p["afile"] = root / "afile.txt"
    p["afile"].write_text("mine\n")
    p["userdir"] = root / "userdir"
    p["userdir"].mkdir()
    (p["userdir"] / "notes.txt").write_text("mine\n")
    p["emptydir"] = root / "emptydir"
    p["emptydir"].mkdir()
    p["bad_toml"] = root / "bad.toml"
    p["bad_toml"].write_text("[train\nlr = 1\n")
    p["typed_toml"] = root / "typed.toml"
    p["typed_toml"].write_text('[run]\ntask = "recall"\n[train]\nlr = "3e-4"\n')
    return p


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _edit(path: Path, lines: list[str], row: int, change: Callable[[list[str]], list[str]]) -> Path:
    out = list(lines)
    out[row] = ",".join(change(out[row].split(",")))
    path.write_text("\n".join(out) + "\n")
    return path


NEW = "new"  # an output path that does not exist yet (under the module's directory)
TRAIN_R = ["train", "--task", "recall", "--data", "{rdata}", *RECALL_MODEL]
TRAIN_F = ["train", "--task", "forecast", "--preset", "forecast_tiny", "--data", "{tdata}"]
FORECAST = ["forecast", "--run", "{frun}"]

# (id, command args with {placeholders}, exit code, text in the error line, text that must not be in it)
CASES: list[tuple[str, list[str], int, str, str | None]] = [
    # train: data, task and flags
    ("train-no-data", ["train", "--task", "recall", *RECALL_MODEL, "--out", NEW], 2, "run.data is not set", None),
    ("train-data-missing", [*TRAIN_R[:4], "{root}/nope", *RECALL_MODEL, "--out", NEW], 2, "no such directory", None),
    ("train-data-empty", [*TRAIN_R[:4], "{emptydir}", *RECALL_MODEL, "--out", NEW], 3, "manifest.json", None),
    (
        "train-task-dna-on-recall",
        ["train", "--task", "dna", "--preset", "dna_tiny", "--data", "{rdata}", "--out", NEW],
        3,
        "rdata",
        None,
    ),
    (
        "train-task-dna-on-series",
        ["train", "--task", "dna", "--preset", "dna_tiny", "--data", "{tdata}", "--out", NEW],
        3,
        "tdata",
        None,
    ),
    ("train-task-recall-on-series", [*TRAIN_R[:4], "{tdata}", *RECALL_MODEL, "--out", NEW], 3, "tdata", None),
    ("train-task-forecast-on-recall", [*TRAIN_F[:6], "{rdata}", "--out", NEW], 3, "manifest.json", None),
    ("train-lookback-1000", [*TRAIN_F, "--lookback", "1000", "--out", NEW], 3, "lookback 1000", None),
    ("train-horizon-empty-item", [*TRAIN_F, "--horizon", "12,,24", "--out", NEW], 2, "empty item", None),
    ("train-horizon-too-long", [*TRAIN_F, "--horizon", "12,500", "--out", NEW], 3, "horizon 500", None),
    ("train-horizon-on-recall", [*TRAIN_R, "--horizon", "12", "--out", NEW], 2, "does not apply", None),
    ("train-kernel-unknown", [*TRAIN_R, "--kernel", "cuda", "--out", NEW], 2, "model.kernel", None),
    ("train-variant", [*TRAIN_R, "--variant", "rnn", "--out", NEW], 2, "model.variant", None),
    ("train-set-type", [*TRAIN_R, "--set", "train.lr=fast", "--out", NEW], 2, "train.lr", None),
    ("train-set-unknown-key", [*TRAIN_R, "--set", "train.speed=1", "--out", NEW], 2, "train.speed", None),
    ("train-set-no-equals", [*TRAIN_R, "--set", "train.lr", "--out", NEW], 2, "train.lr", None),
    ("train-set-unknown-section", [*TRAIN_R, "--set", "optim.lr=1", "--out", NEW], 2, "optim", None),
    ("train-preset", [*TRAIN_R[:4], "{rdata}", "--preset", "nope", "--out", NEW], 2, "--preset 'nope'", None),
    ("train-task-unknown", ["train", "--task", "recal", "--data", "{rdata}", "--out", NEW], 2, "unknown task", None),
    ("train-batch-size-0", [*TRAIN_R, "--batch-size", "0", "--out", NEW], 2, "train.batch_size", None),
    ("train-max-steps-negative", [*TRAIN_R, "--max-steps", "-1", "--out", NEW], 2, "train.max_steps", None),
    ("train-lr-0", [*TRAIN_R, "--lr", "0", "--out", NEW], 2, "train.lr", None),
    ("train-save-every-negative", [*TRAIN_R, "--set", "train.save_every=-1", "--out", NEW], 2, "save_every", None),
    ("train-precision", [*TRAIN_R, "--precision", "16", "--out", NEW], 2, "train.precision", None),
    ("train-device-unknown", [*TRAIN_R, "--device", "tpu", "--out", NEW], 2, "train.device", None),
    ("train-device-cuda-7", [*TRAIN_R, "--device", "cuda:7", "--out", NEW], 2, "train.device", None),
    ("train-device-cuda", [*TRAIN_R, "--device", "cuda", "--out", NEW], 2, "CUDA is not available", None),
    # fails at the first step, after the run directory was made: the directory is removed again
    ("train-kernel-triton-cpu", [*TRAIN_R, "--kernel", "triton", "--out", NEW, "-q"], 2, "needs CUDA", None),
    ("train-init-from-missing", [*TRAIN_R, "--init-from", "{root}/nope", "--out", NEW], 2, "nope", None),
    ("train-init-from-not-a-run", [*TRAIN_R, "--init-from", "{userdir}", "--out", NEW], 2, "userdir", None),
    ("train-config-missing", ["train", "--config", "{root}/nope.toml", "--out", NEW], 2, "nope.toml", None),
    ("train-config-bad-toml", ["train", "--config", "{bad_toml}", "--out", NEW], 2, "bad.toml", None),
    (
        "train-config-wrong-type",
        ["train", "--config", "{typed_toml}", "--data", "{rdata}", "--out", NEW],
        2,
        "train.lr: expected float, got str",
        None,
    ),
    # train: where the run goes
    ("train-out-is-file", [*TRAIN_R, "--out", "{afile}"], 2, "is a file", None),
    ("train-out-under-file", [*TRAIN_R, "--out", "{afile}/run"], 2, "is a file", None),
    ("train-out-proc", [*TRAIN_R, "--out", "/proc/titans-run"], 2, "cannot write", None),
    ("train-out-user-dir", [*TRAIN_R, "--out", "{userdir}"], 2, "not empty", None),
    ("train-out-user-dir-overwrite", [*TRAIN_R, "--out", "{userdir}", "--overwrite"], 2, "not a titans run", None),
    ("train-out-existing-run", [*TRAIN_R, "--out", "{rrun}"], 2, "--overwrite", None),
    ("train-out-data-dir", [*TRAIN_R, "--out", "{rdata}", "--overwrite"], 2, "not a titans run", None),
    # train --resume
    ("resume-missing", ["train", "--resume", "{root}/nope"], 2, "config.toml", None),
    ("resume-other-out", ["train", "--resume", "{rrun}", "--out", "{root}/other"], 2, "drop --out", None),
    ("resume-with-preset", ["train", "--resume", "{rrun}", "--preset", "recall_tiny"], 2, "drop --config", None),
    ("resume-changed-lr", ["train", "--resume", "{rrun}", "--lr", "0.5"], 2, "cannot change train.lr", None),
    ("resume-finished", ["train", "--resume", "{rrun}"], 2, "nothing to do", None),
    # eval
    ("eval-run-missing", ["eval", "--run", "{root}/nope"], 2, "no such run directory", None),
    ("eval-run-data-dir", ["eval", "--run", "{rdata}"], 2, "checkpoints/best.pt", None),
    ("eval-run-user-file", ["eval", "--run", "{afile}"], 3, "only use checkpoints written by titans", "Please"),
    ("eval-crafted-pickle", ["eval", "--run", "{evil}"], 3, "refused to load", "pwned"),
    ("eval-garbage-checkpoint", ["eval", "--run", "{garbage}"], 3, "not a readable checkpoint", None),
    ("eval-split", ["eval", "--run", "{rrun}", "--split", "train"], 2, "--split", None),
    ("eval-checkpoint-name", ["eval", "--run", "{rrun}", "--checkpoint", "worst"], 2, "worst", None),
    ("eval-data-missing", ["eval", "--run", "{rrun}", "--data", "{root}/nope"], 2, "--data", None),
    ("eval-opt-no-equals", ["eval", "--run", "{rrun}", "--opt", "x"], 2, "key=value", None),
    ("eval-opt-unknown", ["eval", "--run", "{frun}", "--opt", "colour=red"], 2, "unknown for forecast", None),
    ("eval-missing-horizon", ["eval", "--run", "{multi}"], 1, "h24", None),
    ("eval-device", ["eval", "--run", "{rrun}", "--device", "tpu"], 2, "train.device", None),
    # forecast
    ("forecast-out-is-input", [*FORECAST, "--input", "{csv}", "--out", "{csv}"], 2, "is also --input", None),
    ("forecast-plot-txt", [*FORECAST, "--input", "{csv}", "--out", "fc.csv", "--plot", "x.txt"], 2, "--plot", None),
    (
        "forecast-plot-proc",
        [*FORECAST, "--input", "{csv}", "--out", "fc.csv", "--plot", "/proc/x.png"],
        2,
        "cannot write",
        None,
    ),
    ("forecast-plot-is-out", [*FORECAST, "--input", "{csv}", "--out", "fc.csv", "--plot", "fc.csv"], 2, "--plot", None),
    ("forecast-out-json", [*FORECAST, "--input", "{csv}", "--out", "fc.json"], 2, ".csv, .tsv or .parquet", None),
    ("forecast-out-dir", [*FORECAST, "--input", "{csv}", "--out", "{emptydir}"], 2, "--out", None),
    ("forecast-out-under-file", [*FORECAST, "--input", "{csv}", "--out", "{afile}/fc.csv"], 2, "is a file", None),
    ("forecast-out-proc", [*FORECAST, "--input", "{csv}", "--out", "/proc/fc.csv"], 2, "cannot write", None),
    ("forecast-input-missing", [*FORECAST, "--input", "{root}/nope.csv", "--out", "fc.csv"], 3, "not found", None),
    ("forecast-nan", [*FORECAST, "--input", "{nan_csv}", "--out", "fc.csv"], 3, "missing value", "--fill"),
    (
        "forecast-inf",
        [*FORECAST, "--input", "{inf_csv}", "--out", "fc.csv", "--context", "all"],
        3,
        "float32",
        "diverged",
    ),
    (
        "forecast-1e308",
        [*FORECAST, "--input", "{big_csv}", "--out", "fc.csv", "--context", "all"],
        3,
        "float32",
        "chunk_size",
    ),
    ("forecast-semicolon", [*FORECAST, "--input", "{semi_csv}", "--out", "fc.csv"], 3, "comma-separated", None),
    ("forecast-short", [*FORECAST, "--input", "{short_csv}", "--out", "fc.csv"], 3, "lookback", None),
    ("forecast-columns", [*FORECAST, "--input", "{cols_csv}", "--out", "fc.csv"], 3, "is missing", None),
    ("forecast-duplicate-date", [*FORECAST, "--input", "{dup_csv}", "--out", "fc.csv"], 3, "duplicate", None),
    (
        "forecast-recall-run",
        ["forecast", "--run", "{rrun}", "--input", "{csv}", "--out", "fc.csv"],
        2,
        "not a forecast run",
        None,
    ),
    (
        "forecast-multi-parent",
        ["forecast", "--run", "{multi}", "--input", "{csv}", "--out", "fc.csv"],
        2,
        "sub-runs",
        None,
    ),
    ("forecast-context", [*FORECAST, "--input", "{csv}", "--out", "fc.csv", "--context", "most"], 2, "--context", None),
    # classify (input errors come before the run is loaded)
    ("classify-no-input", ["classify", "--run", "{frun}", "--out", "p.tsv"], 2, "--input", None),
    (
        "classify-out-is-input",
        ["classify", "--run", "{frun}", "--input", "{csv}", "--out", "{csv}"],
        2,
        "is also --input",
        None,
    ),
    (
        "classify-out-is-bed",
        ["classify", "--run", "{frun}", "--fasta", "{ref}", "--bed", "{bed_past}", "--out", "{bed_past}"],
        2,
        "is also --bed",
        None,
    ),
    (
        "classify-gzip-fasta",
        ["classify", "--run", "{frun}", "--input", "{fa_gz}", "--out", "p.tsv"],
        3,
        "gzip",
        "BioPython",
    ),
    (
        "classify-bed-past-end",
        ["classify", "--run", "{frun}", "--fasta", "{ref}", "--bed", "{bed_past}", "--out", "p.tsv"],
        3,
        "outside the contig",
        "--skip-invalid",
    ),
    (
        "classify-gzip-reference",
        ["classify", "--run", "{frun}", "--fasta", "{ref_gz}", "--bed", "{bed_past}", "--out", "p.tsv"],
        3,
        "gzip",
        "BioPython",
    ),
    (
        "classify-forecast-run",
        ["classify", "--run", "{frun}", "--input", GUE.joinpath("test.csv").as_posix(), "--out", "p.tsv"],
        2,
        "classify needs a dna run",
        None,
    ),
    (
        "classify-batch-size",
        ["classify", "--run", "{frun}", "--input", "{csv}", "--out", "p.tsv", "--batch-size", "0"],
        2,
        "--batch-size",
        None,
    ),
    (
        "classify-out-proc",
        ["classify", "--run", "{frun}", "--input", "{csv}", "--out", "/proc/p.tsv"],
        2,
        "cannot write",
        None,
    ),
    # prepare timeseries
    ("prep-ts-inf", ["prepare", "timeseries", "--input", "{inf_csv}", "--out", NEW], 3, "float32", None),
    ("prep-ts-1e308", ["prepare", "timeseries", "--input", "{big_csv}", "--out", NEW], 3, "float32", None),
    (
        "prep-ts-semicolon",
        ["prepare", "timeseries", "--input", "{semi_csv}", "--out", NEW],
        3,
        "comma-separated",
        "--date-col",
    ),
    ("prep-ts-nan", ["prepare", "timeseries", "--input", "{nan_csv}", "--out", NEW], 3, "--fill", None),
    ("prep-ts-duplicate", ["prepare", "timeseries", "--input", "{dup_csv}", "--out", NEW], 3, "duplicate", None),
    ("prep-ts-existing-set", ["prepare", "timeseries", "--input", "{csv}", "--out", "{tdata}"], 2, "--overwrite", None),
    (
        "prep-ts-user-dir",
        ["prepare", "timeseries", "--input", "{csv}", "--out", "{userdir}", "--overwrite"],
        2,
        "not a prepared data set",
        None,
    ),
    ("prep-ts-out-file", ["prepare", "timeseries", "--input", "{csv}", "--out", "{afile}"], 2, "is a file", None),
    ("prep-ts-out-proc", ["prepare", "timeseries", "--input", "{csv}", "--out", "/proc/prep"], 2, "cannot write", None),
    (
        "prep-ts-split",
        ["prepare", "timeseries", "--input", "{csv}", "--out", NEW, "--split", "ratio:0.5,0.5"],
        2,
        "--split",
        None,
    ),
    (
        "prep-ts-format",
        ["prepare", "timeseries", "--input", "{csv}", "--out", NEW, "--format", "tall"],
        2,
        "--format",
        None,
    ),
    (
        "prep-ts-target",
        ["prepare", "timeseries", "--input", "{csv}", "--out", NEW, "--features", "S", "--target", "nope"],
        3,
        "--target",
        None,
    ),
    ("prep-ts-missing", ["prepare", "timeseries", "--input", "{root}/nope.csv", "--out", NEW], 3, "not found", None),
    ("prep-ts-too-short", ["prepare", "timeseries", "--input", "{short_csv}", "--out", NEW], 3, "too few rows", None),
    # prepare dna and recall
    (
        "prep-dna-existing-set",
        ["prepare", "dna", "--train", GUE.joinpath("train.csv").as_posix(), "--out", "{ddata}"],
        2,
        "--overwrite",
        None,
    ),
    (
        "prep-dna-user-dir",
        ["prepare", "dna", "--train", GUE.joinpath("train.csv").as_posix(), "--out", "{userdir}"],
        2,
        "not a prepared data set",
        None,
    ),
    (
        "prep-dna-gzip-reference",
        ["prepare", "dna", "--fasta", "{ref_gz}", "--bed", "{bed_past}:a", "--out", NEW],
        3,
        "gzip",
        "BioPython",
    ),
    (
        "prep-dna-bed-past-end",
        ["prepare", "dna", "--fasta", "{ref}", "--bed", "{bed_past}:a", "--out", NEW],
        3,
        "--skip-invalid",
        None,
    ),
    (
        "prep-dna-out-proc",
        ["prepare", "dna", "--train", GUE.joinpath("train.csv").as_posix(), "--out", "/proc/dna"],
        2,
        "cannot write",
        None,
    ),
    ("prep-recall-existing-set", ["prepare", "recall", "--out", "{rdata}", *RECALL_DATA], 2, "--overwrite", None),
    ("prep-recall-user-dir", ["prepare", "recall", "--out", "{userdir}", "--overwrite"], 2, "not a prepared", None),
    ("prep-recall-out-under-file", ["prepare", "recall", "--out", "{afile}/d"], 2, "is a file", None),
]


@pytest.mark.parametrize(("args", "code", "text", "absent"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(w, args, code, text, absent):
    if ("cuda" in args or "cuda:7" in args) and torch.cuda.device_count() > 7 * ("cuda:7" in args):
        pytest.skip("this machine has that CUDA device")
    if "triton" in args and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")):
        pytest.skip("triton runs here (a GPU, or the interpreter that tests/conftest.py switches on)")
    cwd = Path.cwd()
    os.chdir(w["root"])  # relative outputs (fc.csv, new) land in the watched directory
    try:
        before = snapshot(w["root"])
        argv = [a.format(**{k: str(v) for k, v in w.items()}) for a in args]
        result = invoke(*argv)
        after = snapshot(w["root"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert absent is None or absent not in lines[0], lines[0]
    assert after == before, f"files changed: {set(after) ^ set(before) or 'modified in place'}"
    assert_suggested_options_exist(argv, lines[0])


def test_corpus_size():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def _options(path: list[str]) -> set[str]:
    command = typer.main.get_command(app)  # Typer vendors Click; its command tree
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}


def assert_suggested_options_exist(argv: list[str], line: str) -> None:
    """An option named in an error must exist on the command the message is about: the invoked one, or a
    `titans <command> ...` quoted in backticks."""
    message = line.split(": ", 1)[1]
    for command, rest in re.findall(r"`titans (prepare [a-z]+|[a-z]+)([^`]*)`", message):
        options = _options(command.split())
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            assert flag in options, f"{line!r} suggests {flag}, which `titans {command}` does not have"
    options = _options(argv[:2] if argv[0] == "prepare" else argv[:1])
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", re.sub(r"`[^`]*`", "", message)):
        assert flag in options, f"{' '.join(argv[:2])}: {line!r} names {flag}, which the command does not have"


def test_the_option_check_catches_a_wrong_suggestion():
    with pytest.raises(AssertionError, match="--fill"):
        assert_suggested_options_exist(["forecast"], "error: x.csv: missing value; pass --fill forward")
    with pytest.raises(AssertionError, match="--skip-invalid"):
        assert_suggested_options_exist(["eval"], "error: x: bad; run `titans classify --skip-invalid`")
    assert_suggested_options_exist(["eval"], "error: x: unfinished; `titans train --resume R` continues it")


def test_a_second_writer_is_refused_with_the_holders_pid(w, tmp_path):
    run = tmp_path / "locked"
    with RunLock(run):
        result = invoke(*[a.format(rdata=w["rdata"]) for a in TRAIN_R], "--out", run)
        assert result.exit_code == 2 and f"PID {os.getpid()}" in result.stderr, result.output
    assert list(run.iterdir()) == []  # released: the lock file is removed with the lock
    with RunLock(w["rrun"]):
        resumed = invoke("train", "--resume", w["rrun"], "--max-steps", 9)
        assert resumed.exit_code == 2 and f"PID {os.getpid()}" in resumed.stderr, resumed.output
