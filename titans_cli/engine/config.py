"""Typed run configuration: frozen dataclasses for the model, training and task sections.

`ModelConfig` (`[model]`) is the backbone's own (titans_cli/backbone/config.py) and is re-exported here.
`RunConfig` = `[run]` + `[model]` + `[train]` + `[task]`; `load_config` resolves it with strict keys and types
(precedence: CLI flags > `--set` > `--config FILE` > `--preset` > defaults) and `dumps_toml` writes it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from titans_cli.backbone.config import ConfigError, ModelConfig
from titans_cli.backbone.config import check_fields as _check_fields
from titans_cli.engine.errors import UsageError


def check_fields(section: str, obj: object, checks: list[tuple[str, bool, str]]) -> None:
    """Raise a `UsageError` naming `section.field`, the rule and the value for the first failed (field, ok, rule)."""
    _check_fields(section, obj, checks, UsageError)


Precision = Literal["32", "bf16"]


@dataclass(frozen=True)
class TrainConfig:
    """The training engine (`titans_cli.engine.train`): AdamW, warm-up + cosine schedule, clipping, early stopping."""

    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.01  # applied to matrices only (dim >= 2), never to biases, norms or gates
    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 16
    eval_batch_size: int = 0  # 0: same as batch_size; evaluation never drops the last batch
    epochs: int = 10
    max_steps: int = 0  # > 0: train exactly this many optimizer steps (overrides epochs); also the schedule length
    warmup: float = 0.05  # < 1: fraction of all steps; >= 1: number of steps of linear warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    patience: int = 0  # stop after this many evaluations without improvement; 0 never stops early
    eval_every: int = 0  # evaluate on the validation split every N steps; 0 = at the end of every epoch
    log_every: int = 10  # write a train-loss row to metrics.jsonl every N steps
    seed: int = 0  # seeds Python, NumPy and torch, and the order of training batches
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = "32"  # 32 or bf16 autocast
    init_from: str = ""  # a run directory whose best.pt gives the backbone.* and embed.* weights
    num_workers: int = 0  # DataLoader worker processes
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    # Seconds of training between last.pt saves besides the evaluations: a SIGKILL loses at most this much; 0: at
    # evaluations only
    save_every: float = 300.0
    # Outside a terminal (a log file), one progress line (step, loss, steps/s, ETA) every N seconds; 0: every step
    progress_every: float = 30.0
    # MAC/MAG: for the first N steps the attention-branch weights of model.attn_branch_init are not updated (their
    # gradient is dropped). With attn_branch_init=0 the block trains as its memory alone first (as LMM, which
    # learned recall on the seeds measured) and attention joins after; under Adam zero-initialised weights
    # otherwise reach full size within ~100 steps (a zero W alone did not leave the plateau). 0: off
    memory_warmup: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 0, "must be >= 0"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("max_steps", self.max_steps >= 0, "must be >= 0"),
            ("warmup", self.warmup >= 0, "must be >= 0 (a fraction < 1 or a number of steps)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("patience", self.patience >= 0, "must be >= 0"),
            ("eval_every", self.eval_every >= 0, "must be >= 0"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("num_workers", self.num_workers >= 0, "must be >= 0"),
            ("save_every", self.save_every >= 0, "must be >= 0 seconds (0: save at evaluations only)"),
            ("progress_every", self.progress_every >= 0, "must be >= 0 seconds"),
            ("memory_warmup", self.memory_warmup >= 0, "must be >= 0 (0 disables the warm-up)"),
        ]
        check_fields("train", self, checks)


@dataclass(frozen=True)
class RunSection:
    """`[run]`: which task, which prepared data directory, and an optional run name."""

    task: str = ""  # a key of tasks.TASKS
    data: str = ""  # directory written by `titans prepare`
    name: str = ""  # default run directory name is <task>-<variant>-<UTC time>


@dataclass(frozen=True)
class RunConfig:
    """A whole run: `[run]`, `[model]` (backbone), `[train]` (engine), `[task]` (the task's own config_cls)."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: Any = None  # an instance of the task's `config_cls` (a frozen dataclass)


SECTIONS = ("run", "model", "train", "task")
TaskResolver = Callable[[str], type]  # task name -> its config dataclass (raises UsageError if unknown)


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The four sections as plain nested dicts (field order kept; tuples stay tuples)."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        out[section] = {} if obj is None else {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return out


# ---- TOML writer ------------------------------------------------------------------------------------------
# tomllib only reads, so titans writes its own schema: flat tables of bool, int, float, str and arrays.


def dumps_toml(cfg: RunConfig) -> str:
    """Serialize a RunConfig to TOML that `loads_config` reads back to an equal RunConfig.

    `None` values are omitted (TOML has no null), so a field may be None only when None is its default.
    """
    lines = ["# titans run config (resolved). Re-run with: titans train --config config.toml", ""]
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        defaults = _defaults(type(getattr(cfg, section))) if getattr(cfg, section) is not None else {}
        for key, value in values.items():
            if value is None:
                if defaults.get(key, None) is not None:
                    raise ValueError(f"{section}.{key} is None but its default is not; TOML cannot hold it")
                continue
            lines.append(f"{key} = {_toml_value(value, f'{section}.{key}')}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest exact repr; 'inf' and 'nan' are TOML floats too
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    raise ValueError(f"{path}: cannot write {type(value).__name__} to TOML")


def _toml_escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    body = "".join(escapes.get(c, c if c.isprintable() else _toml_escape(c)) for c in text)
    return f'"{body}"'


# ---- strict loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    value: Any
    source: str  # where it came from, for error messages: a file name, "--set", "--lr", "preset recall_tiny"
    text: bool  # True for strings typed on the command line, parsed against the field's type


def read_toml(path: Path, what: str = "--config") -> dict[str, Any]:
    """Read a TOML file; a missing file or bad syntax is a `UsageError` naming it."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{path}: invalid TOML: {err}") from None


def parse_set(item: str) -> tuple[str, str]:
    """Split one `--set section.key=value` into ("section.key", "value")."""
    path, sep, value = item.partition("=")
    path = path.strip()
    if not sep or path.count(".") != 1 or not all(path.split(".")):
        raise UsageError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=3e-4")
    return path, value.strip()


def load_config(
    *,
    resolve_task: TaskResolver,
    config_file: Path | None = None,
    preset: RunConfig | None = None,
    preset_name: str = "",
    sets: Sequence[str] = (),
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> RunConfig:
    """Resolve a RunConfig from its layers, highest precedence first:

    CLI flags → `--set section.key=value` → `--config FILE.toml` → `--preset NAME` → dataclass defaults.

    Args:
        resolve_task: maps the final `run.task` to its config dataclass (`tasks.get_task(name).config_cls`).
        config_file: a TOML file with any of the sections `[run] [model] [train] [task]`.
        preset: a preset's RunConfig (every field set); `preset_name` names it in errors.
        sets: `section.key=value` strings; the value is parsed against the field's type.
        flags: `{"train.lr": ("--lr", 3e-4), "task.horizon": ("--horizon", "96,192")}` for options that were
            given; a `str` value is parsed against the field's type, anything else is type-checked.

    Returns:
        The frozen RunConfig. Raises `UsageError` naming the field path and the source for an unknown
        section or key, a wrong type, or a value out of range.
    """
    layers: list[tuple[str, dict[str, Any], bool]] = []
    if preset is not None:
        layers.append((f"preset {preset_name or '?'}", config_to_dict(preset), False))
    if config_file is not None:
        layers.append((str(config_file), read_toml(config_file), False))
    set_layer: dict[str, dict[str, Any]] = {}
    for item in sets:
        path, value = parse_set(item)
        section, key = path.split(".")
        set_layer.setdefault(section, {})[key] = value
    layers.append(("--set", set_layer, True))
    return _resolve(layers, flags or {}, resolve_task, preset)


def loads_config(text: str, resolve_task: TaskResolver, source: str = "config.toml") -> RunConfig:
    """Parse the TOML text of a saved config (config.toml, or the copy embedded in a checkpoint)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{source}: invalid TOML: {err}") from None
    model = data.get("model")
    if isinstance(model, dict):
        # A run saved before these fields existed computed Eq. 14 as written; keep its model what it was trained as.
        for key, value in SAVED_BEFORE_STABILITY.items():
            model.setdefault(key, value)
    return _resolve([(source, data, False)], {}, resolve_task, None)


# `[model]` fields added with the memory bounds (docs/design.md §12), and the value that reproduces a saved run that
# has none of them
SAVED_BEFORE_STABILITY = {"eta_max": 1.0, "step_scale": "none"}


def _resolve(
    layers: list[tuple[str, dict[str, Any], bool]],
    flags: Mapping[str, tuple[str, Any]],
    resolve_task: TaskResolver,
    preset: RunConfig | None,
) -> RunConfig:
    # Every value of every layer, in precedence order (later wins); all are validated, even overridden ones,
    # so a typo in a config file is reported although a flag happens to override that key.
    entries: dict[str, list[tuple[str, _Value]]] = {s: [] for s in SECTIONS}
    for source, data, text in layers:
        for section, table in data.items():
            if section not in SECTIONS:
                raise UsageError(f"{source}: [{section}]: unknown section; expected one of {', '.join(SECTIONS)}")
            if not isinstance(table, dict):
                raise UsageError(f"{source}: {section}: expected a table [{section}], got {_tname(table)}")
            for key, value in table.items():
                entries[section].append((key, _Value(value, source, text)))
    for path, (flag, value) in flags.items():
        section, key = path.split(".")
        entries[section].append((key, _Value(value, flag, isinstance(value, str))))

    run = _build(RunSection, "run", entries["run"])
    if not run.task:
        raise UsageError("no task given: pass --task NAME or set [run] task in the config file")
    if preset is not None and preset.run.task != run.task:
        raise UsageError(f"the preset is for task {preset.run.task!r}, not {run.task!r}: drop --preset or --task")
    task_cls = resolve_task(run.task)
    model, train = _build(ModelConfig, "model", entries["model"]), _build(TrainConfig, "train", entries["train"])
    _refuse_a_silent_warmup(model, train)
    task = _build(task_cls, "task", entries["task"], task_name=run.task)
    return RunConfig(run=run, model=model, train=train, task=task)


def _refuse_a_silent_warmup(model: ModelConfig, train: TrainConfig) -> None:
    """MAG with its gated branch W zeroed and no memory residual outputs W(…) = 0 until W moves; `train.memory_warmup`
    holds W, so for the whole warm-up every MAG block outputs 0 and its memory gets zero gradient: warm-up steps
    that train nothing in the memory (the MAC form of this trap is refused by ModelConfig itself)."""
    if model.variant == "mag" and model.attn_branch_init == 0 and not model.memory_residual and train.memory_warmup:
        raise UsageError(
            "train.memory_warmup > 0 with model.attn_branch_init=0 and model.memory_residual=false holds every MAG "
            "block's output at zero (its memory gets no gradient) for the whole warm-up; set "
            "model.memory_residual=true, model.attn_branch_init > 0 or train.memory_warmup=0"
        )


def _build(cls: type, section: str, entries: list[tuple[str, _Value]], task_name: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, val in entries:
        path = f"{section}.{key}"
        if key not in names:
            if val.source.startswith("--") and val.source != "--set":
                raise UsageError(f"{val.source} does not apply to task {task_name}")
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {section}.{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise UsageError(f"{val.source}: {path}: unknown key{hint}")
        try:
            kwargs[key] = _coerce(val.value, hints[key], path, val.text)
        except UsageError as err:
            raise UsageError(f"{val.source}: {err}") from None
    try:
        return cls(**kwargs)
    except UsageError:
        raise
    except ConfigError as err:  # the backbone's ValueError names model.field already
        raise UsageError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise UsageError(f"[{section}]: {err}") from None


def _coerce(value: Any, tp: Any, path: str, text: bool) -> Any:
    """Check (TOML values) or parse (command-line text) one value against a field's type annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (text and value.strip().lower() in ("none", "null"))):
            return None  # None comes from presets (TOML has no null); "none" from the command line
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, path, text)
            except UsageError as err:
                errors.append(str(err))
        raise UsageError(errors[0] if len(errors) == 1 else f"{path}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        for choice in args:
            try:
                candidate = _parse_scalar(value, type(choice), path) if text else value
            except UsageError:
                continue
            if type(candidate) is type(choice) and candidate == choice:
                return choice
        choices = ", ".join(repr(a) for a in args)
        raise UsageError(f"{path}: expected one of {choices}, got {_shown(value)}")
    if origin in (tuple, list):
        items = _split_list(value, path) if text else value
        if not isinstance(items, list | tuple):
            raise UsageError(f"{path}: expected an array of {_describe(args[0])}, got {_tname(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise UsageError(f"{path}: expected {len(args)} items, got {len(items)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(items)
        out = [_coerce(v, t, f"{path}[{i}]", text) for i, (v, t) in enumerate(zip(items, item_types, strict=True))]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if text:
        return _parse_scalar(value, tp, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML `lr = 1` is an int; a float field accepts it
    if tp in (bool, int, float, str) and type(value) is tp:
        return value
    raise UsageError(f"{path}: expected {_describe(tp)}, got {_tname(value)} ({value!r})")


def _parse_scalar(text: str, tp: Any, path: str) -> Any:
    raw = text.strip()
    if tp is str:
        # `--set run.name="a b"` keeps the quotes in some shells; strip one matching pair.
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            return raw[1:-1]
        return text
    if tp is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    try:
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
    except ValueError:
        pass
    raise UsageError(f"{path}: expected {_describe(tp)}, got {raw!r}")


def _split_list(text: str, path: str) -> list[Any]:
    raw = text.strip()
    if raw.startswith("["):
        try:
            items = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{path}: invalid array {raw!r}: {err}") from None
        return [str(v) if not isinstance(v, str) else v for v in items]
    parts = [part.strip() for part in raw.split(",")] if raw else []
    if "" in parts:  # `96,,192` is a typo, not `96,192`
        raise UsageError(f"{path}: empty item in {raw!r}; separate values with single commas, e.g. 96,192")
    return parts


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _tname(value: Any) -> str:
    return {dict: "table", list: "array"}.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    return f"{_tname(value)} {value!r}" if not isinstance(value, str) else repr(value)


def _defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# What `titans train --resume RUN` may change: how long and where to train, never what is trained.
RESUMABLE = frozenset(
    {
        "run.data",
        "train.epochs",
        "train.max_steps",
        "train.patience",
        "train.eval_every",
        "train.log_every",
        "train.device",
        "train.num_workers",
    }
)


def check_resume_changes(saved: RunConfig, new: RunConfig) -> list[str]:
    """The field paths `new` changes relative to a run's saved config; `UsageError` if any is not resumable."""
    old_d, new_d = config_to_dict(saved), config_to_dict(new)
    changed = [f"{s}.{k}" for s in SECTIONS for k in new_d[s] if old_d[s].get(k) != new_d[s][k]]
    frozen = [path for path in changed if path not in RESUMABLE]
    if frozen:
        allowed = ", ".join(sorted(RESUMABLE))
        raise UsageError(f"--resume keeps the run's config; cannot change {', '.join(frozen)} (may change: {allowed})")
    return changed
