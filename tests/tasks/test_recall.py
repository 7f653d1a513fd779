"""The recall recipe and task: exact sequence layout, seeding, validation errors, batch-size invariance."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch

from data_recipes.recall import IGNORE, RecallSpec, generate, prepare
from tasks.recall import TASK
from tests.recall_fixtures import TINY_SPEC, tiny_config, tiny_data
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.evaluate import evaluate_split


def test_every_query_asks_a_distinct_key_placed_beyond_the_gap():
    spec = RecallSpec(seq_len=200, pairs=6, queries=4, vocab=10, min_gap=50, filler_vocab=3)
    tokens, targets = generate(spec, 40, np.random.default_rng(1))
    F, V, T = spec.filler_vocab, spec.vocab, spec.seq_len
    first_query = T - 2 * spec.queries
    for seq, tgt in zip(tokens.astype(int), targets.astype(int), strict=True):
        is_key = (seq >= F) & (seq < F + V)
        context_keys = np.flatnonzero(is_key[:first_query])
        assert len(context_keys) == spec.pairs  # exactly P pairs, none overlapping
        assert len(set(seq[context_keys])) == spec.pairs  # distinct keys
        assert context_keys.max() + 1 < first_query - spec.min_gap  # value ends more than min_gap before queries
        assert np.all(seq[context_keys + 1] >= F + V)  # each key is followed by its value
        pair_value = dict(zip(seq[context_keys], seq[context_keys + 1], strict=True))
        answer_pos = np.flatnonzero(tgt != IGNORE)
        assert answer_pos.tolist() == list(range(first_query, T, 2))
        assert len(set(seq[answer_pos])) == spec.queries  # distinct keys asked
        for pos in answer_pos:
            assert tgt[pos] == pair_value[seq[pos]] == seq[pos + 1]
        assert np.all(seq[~np.isin(np.arange(T), np.r_[context_keys, context_keys + 1, first_query:T])] < F)


def test_splits_are_seeded_and_independent_of_other_split_sizes(tmp_path):
    a = prepare(TINY_SPEC, tmp_path / "a")
    prepare(RecallSpec(**{**a["params"], "n_train": 30}), tmp_path / "b")
    prepare(TINY_SPEC, tmp_path / "c")
    read = lambda d, s: pl.read_parquet(tmp_path / d / f"{s}.parquet")  # noqa: E731
    assert read("a", "test").equals(read("b", "test")) and read("a", "val").equals(read("b", "val"))
    assert read("a", "train").equals(read("c", "train"))
    assert not read("a", "train").equals(read("a", "test").head(TINY_SPEC.n_train))
    assert a["chance_accuracy"] == 1 / 8 and a["splits"]["train"]["rows"] == 24


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"queries": 4}, "--queries must be between 1 and --pairs"),
        ({"seq_len": 27}, "--seq-len 27 is too short"),
        ({"pairs": 9, "queries": 3}, "needs --vocab >= 9"),
    ],
)
def test_impossible_parameters_name_the_option(tmp_path, change, message):
    with pytest.raises(UsageError, match=message):
        prepare(RecallSpec(**{**TINY_SPEC.__dict__, **change}), tmp_path / "x")


def test_prepare_refuses_to_overwrite_without_flag(tmp_path):
    prepare(TINY_SPEC, tmp_path / "d")
    with pytest.raises(UsageError, match="--overwrite"):
        prepare(TINY_SPEC, tmp_path / "d")
    prepare(TINY_SPEC, tmp_path / "d", overwrite=True)


def test_bad_data_is_a_data_error_naming_file_column_and_row(tmp_path):
    data = tiny_data(tmp_path)
    cfg = tiny_config(data)
    frame = pl.read_parquet(data / "val.parquet")
    tokens = frame["tokens"].to_numpy().copy()
    tokens[5, 3] = 999
    frame.with_columns(pl.Series("tokens", tokens)).write_parquet(data / "val.parquet")
    with pytest.raises(DataError, match=r"val.parquet: column tokens, row 5: id outside \[0, 24\)"):
        TASK.load(cfg, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "recipe": "timeseries"}))
    with pytest.raises(DataError, match="not 'recall'"):
        TASK.load(cfg, data)
    (data / "manifest.json").unlink()
    with pytest.raises(DataError, match="titans prepare recall"):
        TASK.load(cfg, data)


def test_metrics_count_every_answer_once_whatever_the_batch_size(tmp_path):
    cfg = tiny_config(tiny_data(tmp_path))
    data = TASK.load(cfg, tmp_path / "data")
    torch.manual_seed(0)
    model = TASK.build_model(cfg, data.meta)
    results = [
        evaluate_split(TASK, model, data.test, data.meta, batch_size=bs, device=torch.device("cpu"))
        for bs in (1, 3, 10)
    ]
    assert {r["answers"] for r in results} == {TINY_SPEC.n_test * TINY_SPEC.queries}
    assert {r["samples"] for r in results} == {TINY_SPEC.n_test}
    assert len({r["accuracy"] for r in results}) == 1 and len({r["exact"] for r in results}) == 1
    assert max(r["loss"] for r in results) - min(r["loss"] for r in results) < 1e-5
    assert results[0]["chance_accuracy"] == 1 / TINY_SPEC.vocab


def test_loss_is_cross_entropy_on_answer_positions_only(tmp_path):
    cfg = tiny_config(tiny_data(tmp_path))
    data = TASK.load(cfg, tmp_path / "data")
    model = TASK.build_model(cfg, data.meta)
    batch = {k: torch.stack([data.train[i][k] for i in range(4)]) for k in ("tokens", "targets")}
    logits = model.head(model(batch["tokens"]))  # [B, T, n_tokens]
    mask = batch["targets"] != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[mask], batch["targets"][mask])
    torch.testing.assert_close(TASK.loss(model, batch), expected)
    # Changing a token after the last answer position leaves the loss unchanged (causal model, answers only).
    changed = {**batch, "tokens": batch["tokens"].clone()}
    changed["tokens"][:, -1] = 0
    torch.testing.assert_close(TASK.loss(model, changed), expected)


def test_cli_defaults_are_the_recipe_defaults():
    import inspect

    from titans_cli.commands.prepare_recall import recall

    params = inspect.signature(recall).parameters
    for name, value in dataclasses.asdict(RecallSpec()).items():
        assert params[name].default == value, name
