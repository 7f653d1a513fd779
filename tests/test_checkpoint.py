"""Checkpoints and the training engine: round trip, refusal of pickle payloads, exact resume, init_from."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from tasks import get_task
from tasks.recall import TASK
from tests.recall_fixtures import tiny_config, tiny_data
from titans_cli.engine.checkpoint import load_run, read_checkpoint, save_checkpoint, transfer_weights
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.runs import read_jsonl
from titans_cli.engine.runtime import rng_state, seed_everything, set_rng_state
from titans_cli.engine.train import TrainingInterrupted, lr_at, run


class Payload:
    """Unpickling this runs a shell command: what a weights-only load must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("recall"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    run(tiny_config(data, epochs=3), TASK, out, quiet=True)
    return out


def test_save_and_read_round_trip_without_leftover_files(tmp_path):
    seed_everything(1)
    payload = {"task": "recall", "config_toml": "", "meta_json": "{}", "model": {"w": torch.randn(3, 2)},
               "rng": rng_state(), "step": 7, "nested": {"betas": (0.9, 0.95), "flag": None}}  # fmt: skip
    save_checkpoint(tmp_path / "c.pt", payload)
    back = read_checkpoint(tmp_path / "c.pt")
    assert back["format"] == "titans-checkpoint/1" and back["step"] == 7 and back["nested"]["betas"] == (0.9, 0.95)
    torch.testing.assert_close(back["model"]["w"], payload["model"]["w"], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    # RNG streams restored from the file continue exactly where they were captured.
    expected = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(back["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_crafted_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"format": "titans-checkpoint/1", "model": Payload(str(marker))}, tmp_path / "evil.pt")
    with open(tmp_path / "raw.pt", "wb") as fh:
        pickle.dump(Payload(str(marker)), fh)
    for name in ("evil.pt", "raw.pt"):
        with pytest.raises(DataError, match=rf"{name}: refused to load"):
            read_checkpoint(tmp_path / name)
    assert not marker.exists()
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(DataError, match="not a titans checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(UsageError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")


def test_run_directory_contract(trained):
    files = sorted(p.name for p in trained.iterdir())
    assert files == ["checkpoints", "config.toml", "env.json", "metrics.csv", "metrics.json", "metrics.jsonl"]
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    umask = os.umask(0)
    os.umask(umask)
    for path in (trained / "env.json", trained / "metrics.json", trained / "checkpoints" / "best.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # atomic writes keep the usual permissions
    env = json.loads((trained / "env.json").read_text())
    assert env["seed"] == 0 and env["device"] == "cpu" and env["torch"] == torch.__version__
    rows = read_jsonl(trained / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 16))  # 5 steps/epoch × 3
    assert [r["step"] for r in rows if r["split"] == "val"] == [5, 10, 15]
    final = json.loads((trained / "metrics.json").read_text())
    best_val = max((r for r in rows if r["split"] == "val"), key=lambda r: r["accuracy"])
    assert final["split"] == "test" and final["step"] == best_val["step"] and final["samples"] == 10
    assert len((trained / "metrics.csv").read_text().splitlines()) == len(rows) + 1


def test_load_run_rebuilds_the_best_model_without_touching_the_global_rng(trained, data):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loaded = load_run(trained, get_task=get_task)
    assert torch.equal(torch.get_rng_state(), before)
    best = read_checkpoint(trained / "checkpoints" / "best.pt")
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, best["model"][name]), name
    assert loaded.task is TASK and loaded.cfg.run.data == str(data) and not loaded.model.training
    assert loaded.meta["n_tokens"] == 24 and loaded.step == json.loads((trained / "metrics.json").read_text())["step"]


def test_resume_reproduces_the_loss_curve_of_an_uninterrupted_run(data, tmp_path):
    cfg = tiny_config(data, epochs=3, eval_every=4, variant="mac")
    run(cfg, TASK, tmp_path / "straight", quiet=True)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        # Step 7 is mid-epoch (5 steps per epoch) and between evaluations: the hardest place to resume.
        run(cfg, TASK, tmp_path / "resumed", quiet=True, should_stop=lambda step: step == 7)
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 7
    run(cfg, TASK, tmp_path / "resumed", resume=True, quiet=True)
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # no step logged twice
    assert resumed == straight  # losses, learning rates and validation metrics, bit for bit
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "resumed" / "metrics.json").read_text()
    )
    with pytest.raises(UsageError, match="nothing to do"):
        run(cfg, TASK, tmp_path / "resumed", resume=True, quiet=True)


def test_new_run_refuses_a_non_empty_directory_unless_overwrite(trained, data, tmp_path):
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        run(tiny_config(data), TASK, trained, quiet=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a titans run directory"):
        run(tiny_config(data), TASK, tmp_path, overwrite=True, quiet=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_init_from_copies_backbone_and_embedding(trained, data, tmp_path):
    cfg = tiny_config(data)
    model = TASK.build_model(cfg, {"n_tokens": 24})
    loaded, skipped = transfer_weights(model, trained)
    source = read_checkpoint(trained / "checkpoints" / "best.pt")["model"]
    assert skipped == [] and all(n.startswith(("backbone.", "embed.")) for n in loaded)
    assert {n for n in source if n.startswith(("backbone.", "embed."))} == set(loaded)
    for name in loaded:
        assert torch.equal(model.state_dict()[name], source[name])
    assert not torch.equal(model.head.weight, source["head.weight"])  # the head is not transferred
    wider = tiny_config(data, variant="lmm")
    wider = type(wider)(wider.run, type(wider.model)(**{**wider.model.__dict__, "dim": 32}), wider.train, wider.task)
    with pytest.raises(UsageError, match="has shape"):
        transfer_weights(TASK.build_model(wider, {"n_tokens": 24}), trained)


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    lrs = [lr_at(s, total=100, warmup_steps=10, base_lr=1.0, min_ratio=0.1) for s in range(1, 101)]
    assert lrs[:10] == pytest.approx([s / 10 for s in range(1, 11)])
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
