"""CLI round trip on tiny recall data: prepare → train → eval; exit codes and one-line errors."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from titans_cli import __version__
from titans_cli.cli import app

runner = CliRunner()
TINY_DATA = ["--seq-len", "48", "--pairs", "3", "--queries", "3", "--vocab", "8", "--min-gap", "16"]
TINY_SIZES = ["--n-train", "20", "--n-val", "6", "--n-test", "9"]
TINY_MODEL = ["--preset", "recall_tiny", "--set", "model.dim=16", "--set", "train.batch_size=4"]


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "data"
    result = invoke("prepare", "recall", "--out", out, *TINY_DATA, *TINY_SIZES, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "out": str(out), "rows": {"train": 20, "val": 6, "test": 9}, "chance_accuracy": 0.125
    }  # fmt: skip
    return out


@pytest.fixture(scope="module")
def trained(data):
    out = data.parent / "run"
    result = invoke("train", "--task", "recall", "--data", data, "--out", out, *TINY_MODEL, "--max-steps", 3,
                    "--variant", "mag", "--json", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --quiet: nothing on stderr; results only on stdout
    summary = json.loads(result.stdout)
    assert summary["steps"] == 3 and summary["variant"] == "mag" and summary["test"]["samples"] == 9
    return out


def test_eval_prints_the_metrics_train_recorded(trained):
    result = invoke("eval", "--run", trained, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    recorded = json.loads((trained / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["answers"] == 27
    for key in ("accuracy", "exact", "samples"):
        assert metrics[key] == recorded[key]
    assert metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-6)
    val = json.loads(invoke("eval", "--run", trained, "--split", "val", "--json").stdout)
    assert val["split"] == "val" and val["samples"] == 6


def test_predictions_do_not_depend_on_batch_size(trained):
    results = [json.loads(invoke("eval", "--run", trained, "--batch-size", bs, "--json").stdout) for bs in (1, 4, 9)]
    assert len({(r["accuracy"], r["exact"], r["answers"]) for r in results}) == 1


def test_saved_config_reruns_the_same_experiment(trained, data):
    saved = (trained / "config.toml").read_text()
    result = invoke("train", "--config", trained / "config.toml", "--print-config")
    assert result.exit_code == 0 and result.stdout == saved
    parsed = tomllib.loads(saved)
    assert parsed["run"]["data"] == str(data) and parsed["model"]["variant"] == "mag"
    assert parsed["model"]["dim"] == 16 and parsed["train"]["max_steps"] == 3


def test_resume_extends_a_finished_run(trained, tmp_path):
    result = invoke("train", "--resume", trained, "--max-steps", 5, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 5
    assert_one_line_error(invoke("train", "--resume", trained, "--lr", 0.5), 2, "cannot change train.lr")


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--set", "train.lr=fast"], 2, "train.lr: expected float, got 'fast'"),
        (["--horizon", "96"], 2, "--horizon does not apply to task recall"),
        (["--variant", "rnn"], 2, "model.variant: expected one of"),
        (["--preset", "nope"], 2, "--preset 'nope': unknown"),
        (["--device", "cuda:7"], 2, "train.device"),
    ],
)
def test_bad_options_exit_2_with_one_line(data, tmp_path, args, code, text):
    result = invoke("train", "--task", "recall", "--data", data, "--out", tmp_path / "r", *TINY_MODEL, *args)
    assert_one_line_error(result, code, text)


def test_bad_config_file_names_file_and_field(data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[run]\ntask = "recall"\n[train]\nlr = "3e-4"\n')
    result = invoke("train", "--config", config, "--data", data, "--out", tmp_path / "r")
    assert_one_line_error(result, 2, "run.toml: train.lr: expected float, got str")


def test_existing_run_directory_needs_overwrite(trained, data):
    result = invoke("train", "--task", "recall", "--data", data, "--out", trained, *TINY_MODEL)
    assert_one_line_error(result, 2, "pass --overwrite")


def test_missing_and_invalid_data(tmp_path):
    result = invoke("train", "--task", "recall", "--data", tmp_path / "nope", "--out", tmp_path / "r", *TINY_MODEL)
    assert_one_line_error(result, 2, "no such directory")
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--task", "recall", "--data", tmp_path / "empty", "--out", tmp_path / "r2", *TINY_MODEL)
    assert_one_line_error(result, 3, "manifest.json: missing")
    assert not (tmp_path / "r2").exists()  # a failed start creates nothing
    assert_one_line_error(invoke("eval", "--run", tmp_path / "nope"), 2, "no such run directory")


def test_unknown_task_lists_the_known_ones(data, tmp_path):
    result = invoke("train", "--task", "recal", "--data", data, "--out", tmp_path / "r")
    assert_one_line_error(result, 2, "unknown task 'recal': choose one of")
    assert "recall" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "eval", "--run", tmp_path / "nope")
    assert result.exit_code == 2 and "Traceback" in result.stderr
    result = invoke("eval", "--run", tmp_path / "nope", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_version_and_help_examples():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"titans {__version__}"
    for command in ([], ["prepare"], ["train"], ["eval"], ["forecast"], ["classify"], ["prepare", "recall"],
                    ["prepare", "timeseries"], ["prepare", "dna"]):  # fmt: skip
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and result.stdout.rindex("Example: titans") > result.stdout.rindex("--help")
    # forecast serves one horizon: its example points at a sub-run, not a multi-horizon parent
    assert "--run runs/etth1/h96" in " ".join(invoke("forecast", "--help").stdout.split())
    # rich markup would eat [brackets] in help texts: the words must all be there
    flowed = re.sub(r"[\s│]+", " ", invoke("classify", "--help").stdout)  # the option table's cells, rejoined
    assert "Output TSV: id, chrom/start/end/strand (BED input), label (if known), pred, prob_*" in flowed


def test_a_run_works_from_any_directory(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    result = invoke("train", "--task", "recall", "--data", data.name, "--out", tmp_path / "r", *TINY_MODEL,
                    "--max-steps", 2, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert tomllib.loads((tmp_path / "r" / "config.toml").read_text())["run"]["data"] == str(data)
    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "--run", "r", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 9


def test_json_output_is_strict_json_even_for_nan(capsys):
    from titans_cli.commands.common import emit_result

    emit_result({"loss": float("nan"), "nested": {"mse": float("inf")}, "accuracy": 0.5}, json_out=True)
    assert json.loads(capsys.readouterr().out) == {"loss": None, "nested": {"mse": None}, "accuracy": 0.5}
