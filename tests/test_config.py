"""Run config: strict keys and types, layer precedence, `--set` parsing, TOML round trip, resume rules."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from titans_cli.engine.config import (
    ModelConfig,
    RunConfig,
    RunSection,
    TrainConfig,
    check_resume_changes,
    dumps_toml,
    load_config,
    loads_config,
)
from titans_cli.engine.errors import UsageError


@dataclass(frozen=True)
class DemoTaskConfig:
    """A [task] section with every supported field type."""

    horizon: tuple[int, ...] = (96,)
    model: Literal["titans", "dlinear"] = "titans"
    rc_aug: bool = False
    scale: float = 1.0
    label: str = ""
    limit: int | None = None


def resolve(name: str) -> type:
    if name != "demo":
        raise UsageError(f"unknown task {name!r}")
    return DemoTaskConfig


def load(**kwargs: object) -> RunConfig:
    flags = {"run.task": ("--task", "demo"), **kwargs.pop("flags", {})}  # type: ignore[dict-item]
    return load_config(resolve_task=resolve, flags=flags, **kwargs)  # type: ignore[arg-type]


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_wrong_type_in_file_names_file_and_field(tmp_path):
    path = write(tmp_path, '[train]\nlr = "3e-4"\n')
    with pytest.raises(UsageError, match=r"run.toml: train.lr: expected float, got str"):
        load(config_file=path)
    with pytest.raises(UsageError, match=r"train.epochs: expected int, got bool"):
        load(config_file=write(tmp_path, "[train]\nepochs = true\n"))
    with pytest.raises(UsageError, match=r"task.horizon\[1\]: expected int, got str"):
        load(config_file=write(tmp_path, '[task]\nhorizon = [96, "x"]\n'))


def test_unknown_keys_and_sections_are_errors_with_a_suggestion(tmp_path):
    with pytest.raises(UsageError, match=r"train.lrr: unknown key; did you mean train.lr\?"):
        load(config_file=write(tmp_path, "[train]\nlrr = 0.1\n"))
    with pytest.raises(UsageError, match=r"\[optim\]: unknown section"):
        load(config_file=write(tmp_path, "[optim]\nlr = 0.1\n"))
    with pytest.raises(UsageError, match="--set: model.nope: unknown key"):
        load(sets=["model.nope=1"])
    # Even a key that a flag overrides must be valid in the file.
    with pytest.raises(UsageError, match="train.lrr"):
        load(config_file=write(tmp_path, "[train]\nlrr = 0.1\n"), flags={"train.lr": ("--lr", 0.2)})


def test_flag_for_a_field_the_task_lacks_is_rejected():
    with pytest.raises(UsageError, match="^--lookback does not apply to task demo$"):
        load(flags={"task.lookback": ("--lookback", 96)})


def test_precedence_flags_over_set_over_file_over_preset(tmp_path):
    preset = RunConfig(RunSection(task="demo"), ModelConfig(), TrainConfig(lr=0.1, epochs=7), DemoTaskConfig())
    path = write(tmp_path, "[train]\nlr = 0.2\n")
    layers = {
        "preset": {"preset": preset},
        "file": {"config_file": path},
        "set": {"sets": ["train.lr=0.3"]},
        "flag": {"flags": {"train.lr": ("--lr", 0.4)}},
    }
    expected = {"preset": 0.1, "file": 0.2, "set": 0.3, "flag": 0.4}
    names = list(layers)
    for top in range(len(names)):
        kwargs: dict[str, object] = {}
        for name in names[: top + 1]:
            kwargs.update(layers[name])
        cfg = load(**kwargs)
        assert cfg.train.lr == expected[names[top]]
        assert cfg.train.epochs == 7 if "preset" in kwargs else cfg.train.epochs == TrainConfig().epochs
    assert load().train.lr == TrainConfig().lr


def test_preset_of_another_task_is_refused():
    preset = RunConfig(RunSection(task="other"), ModelConfig(), TrainConfig(), DemoTaskConfig())
    with pytest.raises(UsageError, match="preset is for task 'other', not 'demo'"):
        load(preset=preset)


def test_command_line_text_is_parsed_against_the_field_type():
    cfg = load(
        sets=["task.horizon=96,192", "task.rc_aug=yes", "task.limit=none", "train.warmup=100", "run.name='a b'"],
        flags={"task.model": ("--model", "dlinear"), "train.precision": ("--precision", "bf16")},
    )
    assert cfg.task == DemoTaskConfig(horizon=(96, 192), model="dlinear", rc_aug=True, limit=None)
    assert (cfg.train.warmup, cfg.train.precision, cfg.run.name) == (100.0, "bf16", "a b")
    assert load(sets=["task.horizon=[336, 720]", "task.limit=5"]).task.horizon == (336, 720)
    for bad, message in [
        ("train.lr=abc", "train.lr: expected float, got 'abc'"),
        ("train.precision=16", "train.precision: expected one of '32', 'bf16', got '16'"),
        ("model.variant=rnn", "model.variant: expected one of 'lmm', 'mac'"),
        ("model.memory_norm=rms", "model.memory_norm: expected one of 'none', 'ln', got 'rms'"),
        ("lr=3", "expected section.key=value"),
        ("train.lr", "expected section.key=value"),
    ]:
        with pytest.raises(UsageError, match=message):
            load(sets=[bad])


def test_memory_norm_defaults_to_none_takes_ln_and_names_itself_when_wrong():
    """model.memory_norm (docs/design.md §2.4): "none" by default, "ln" from the command line; a wrong value, from
    the command line or in the Python API, is a one-line error naming the field and the allowed values."""
    assert load().model.memory_norm == "none"
    assert load(sets=["model.memory_norm=ln"]).model.memory_norm == "ln"
    with pytest.raises(ValueError, match=r"^model\.memory_norm: expected one of 'none', 'ln', got 'LN'$"):
        ModelConfig(memory_norm="LN")


def test_values_out_of_range_name_the_field():
    with pytest.raises(UsageError, match=r"train.lr: must be > 0, got -1.0"):
        load(flags={"train.lr": ("--lr", -1.0)})
    with pytest.raises(UsageError, match="no task given"):
        load_config(resolve_task=resolve)


def test_toml_round_trip_of_a_resolved_config():
    cfg = load(sets=["task.horizon=96,192,336", "model.variant=mac", "train.lr=3e-4", "task.limit=3"])
    text = dumps_toml(cfg)
    assert tomllib.loads(text)["model"]["variant"] == "mac"
    assert loads_config(text, resolve) == cfg


@given(
    name=st.text(max_size=40),
    lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False),
    scale=st.floats(allow_nan=False),
    horizon=st.lists(st.integers(-(2**62), 2**62), max_size=5),
)
def test_toml_round_trip_is_exact_for_any_string_and_float(name, lr, scale, horizon):
    cfg = RunConfig(
        RunSection(task="demo", name=name),
        ModelConfig(),
        TrainConfig(lr=lr),
        DemoTaskConfig(scale=scale, horizon=tuple(horizon), label=name[::-1]),
    )
    assert loads_config(dumps_toml(cfg), resolve) == cfg


def test_resume_may_extend_training_but_not_change_the_model():
    saved = load()
    longer = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=20))
    assert check_resume_changes(saved, longer) == ["train.epochs"]
    other = dataclasses.replace(saved, model=dataclasses.replace(saved.model, dim=256))
    with pytest.raises(UsageError, match="cannot change model.dim"):
        check_resume_changes(saved, other)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.dim=-3", r"model.dim: must be >= 1, got -3"),
        ("model.heads=3", r"model.heads: must divide dim 128, got 3"),
        ("model.chunk_size=0", r"model.chunk_size: must be >= 1, got 0"),
        ("model.inner_clip=-1.0", r"model.inner_clip: must be >= 0"),
        ("model.memory_piece_len=-5", r"model.memory_piece_len: must be >= 0"),
        ("model.attn_branch_init=-0.5", r"model.attn_branch_init: must be >= 0"),
        ("model.eta_max=1.5", r"model.eta_max: must be in \(0, 1\]"),
        ("model.theta_max=0", r"model.theta_max: must be > 0"),
        ("model.theta_init=1.0", r"model.theta_init: must be in \(0, 1\)"),
    ],
)
def test_out_of_range_model_values_name_the_field(setting, message):
    """A value of the right type but out of range is a one-line usage error naming the field, not a crash later
    (a zero chunk divided by zero deep in the memory update) or a silent no-op (a negative clamp)."""
    with pytest.raises(UsageError, match=message):
        load(sets=[setting])


def test_a_mac_block_that_cannot_learn_is_refused():
    """MAC with the attention branch zeroed and no memory residual outputs 0 with zero gradient everywhere."""
    with pytest.raises(UsageError, match=r"model.attn_branch_init=0 with model.memory_residual=false"):
        load(sets=["model.variant=mac", "model.attn_branch_init=0", "model.memory_residual=false"])
    load(sets=["model.variant=mac", "model.attn_branch_init=0", "model.memory_residual=true"])  # learns: accepted


def test_a_mag_warmup_that_trains_nothing_in_the_memory_is_refused():
    """MAG with W zeroed and no memory residual learns (W gets the gradient of y ⊙ σ(M) at once), unless the
    warm-up holds W at zero: then every block outputs 0 and the memory gets no gradient for the whole warm-up."""
    zeroed = ["model.variant=mag", "model.attn_branch_init=0", "model.memory_residual=false"]
    with pytest.raises(UsageError, match=r"train.memory_warmup > 0 with model.attn_branch_init=0"):
        load(sets=[*zeroed, "train.memory_warmup=100"])
    load(sets=zeroed)  # W moves at the first step: accepted
    load(sets=["model.variant=mag", "model.attn_branch_init=0", "train.memory_warmup=100"])  # residual on: accepted


def test_a_config_saved_before_the_memory_bounds_loads_as_it_was_trained():
    """Runs saved without model.eta_max / model.step_scale computed Eq. 14 as written: loading their config (or a
    checkpoint's copy) keeps that model instead of switching it to the new defaults."""
    from titans_cli.engine.config import dumps_toml, loads_config

    text = dumps_toml(load())
    old = "\n".join(line for line in text.splitlines() if not line.startswith(("eta_max", "step_scale")))
    cfg = loads_config(old, resolve_task=lambda _: type(load().task))
    assert (cfg.model.eta_max, cfg.model.step_scale) == (1.0, "none")
    assert loads_config(text, resolve_task=lambda _: type(load().task)).model.step_scale == "gram"
