"""Benchmark: the long-horizon protocol for Titans and its peers in one harness, ending with one table.

Datasets (bundled in `data/`): ETTh1 and ETTm1 (12/4/4-month borders, lookback 96, horizons 96/192/336/720) and
ILI (70/10/20 split, lookback 36, horizons 24/36/48/60). Models: `titans` and the peers `patchtst`, `rlinear`,
`dlinear` (tasks/forecast_models.py), all through the same splits, scaler, windows, early stopping on validation
MSE and metrics. One model per (dataset, model, horizon); test MSE/MAE on the z-scored scale of the best
validation checkpoint; each (dataset, model) gets its horizon average and wall time. One JSON line per result
goes to stderr and `OUT/results.jsonl`; the table (markdown) goes to stdout at the end and to `OUT/table.md`.

    python bench/forecast.py --datasets ETTh1,ETTm1,ILI --models titans,patchtst,rlinear,dlinear
    python bench/forecast.py --quick          # seconds: a smoke run of every dataset and model
    python bench/forecast.py --val-only ...   # model selection: validation metrics only, test never evaluated

Every model trains with the `forecast_paper` preset's optimiser and early stopping (the peers with MSE loss and
their published sizes: task.loss "auto", tasks/forecast_models.py); per dataset, `DATASETS` sets the lookback,
horizons, patch geometry and evaluation cadence; `--set` / `--titans-set` / `--patchtst-set` ... override last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_recipes import timeseries as ts  # noqa: E402
from tasks import get_task  # noqa: E402
from tasks.forecast import TASK, ForecastTask, window_datasets  # noqa: E402
from tasks.presets import forecast_paper, forecast_tiny  # noqa: E402
from titans_cli.engine.checkpoint import load_run  # noqa: E402
from titans_cli.engine.config import RunConfig, load_config  # noqa: E402
from titans_cli.engine.metrics import ErrorSums  # noqa: E402
from titans_cli.engine.train import run as train_run  # noqa: E402

MODELS = ("titans", "patchtst", "rlinear", "dlinear")


@dataclasses.dataclass(frozen=True)
class Dataset:
    file: str  # under --data-root
    split: str  # titans prepare --split
    lookback: int
    horizons: tuple[int, ...]
    patch: tuple[int, int] = (16, 8)  # patch length and stride (Titans "patch" layout, PatchTST)
    sets: tuple[str, ...] = ()  # --set overrides for every model on this dataset


DATASETS = {
    "ETTh1": Dataset("ETTh1/ETTh1.csv", "ett-hourly", 96, (96, 192, 336, 720)),
    # 34k training windows, 1,070 steps of batch 32 per epoch: validating every 250 steps lets early stopping
    # end a run inside its first epochs instead of after whole ones.
    "ETTm1": Dataset("ETTm1/ETTm1.csv.gz", "ett-minute", 96, (96, 192, 336, 720), sets=("train.eval_every=250",)),
    # 600 training windows: 19 steps per epoch, so more epochs; patches of 12 rows every 6 fit a lookback of 36.
    "ILI": Dataset(
        "ILI/national_illness.csv",
        "ratio:0.7,0.1,0.2",
        36,
        (24, 36, 48, 60),
        patch=(12, 6),
        sets=("train.epochs=30", "train.patience=5"),
    ),
}

# Test MSE / MAE averaged over the four horizons (docs/design.md §6.3, Table 3).
PAPER = {
    "ETTh1": {"titans": (0.420, 0.421), "simba": (0.441, 0.432), "dlinear": (0.456, 0.452)},
    "ETTm1": {"titans": (0.358, 0.387), "simba": (0.383, 0.396), "dlinear": (0.403, 0.407)},
}


def log(record: dict[str, Any], out: Path | None = None) -> None:
    line = json.dumps(record)
    print(line, file=sys.stderr, flush=True)
    if out is not None:
        with open(out / "results.jsonl", "a") as f:
            f.write(line + "\n")


def prepare(data_root: Path, name: str, out: Path, rows: int = 0) -> Path:
    """Prepared folder of dataset `name` under `out/prepared` (reused when present). `rows` > 0 keeps only the
    first rows with a 70/10/20 split (--quick)."""
    spec = DATASETS[name]
    src = data_root / spec.file
    target = out / "prepared" / (f"{name}-{rows}" if rows else name)
    if not (target / ts.MANIFEST).exists():
        split = spec.split
        if rows:
            head = out / "prepared" / f"{name}-{rows}.csv"
            head.parent.mkdir(parents=True, exist_ok=True)
            pl.read_csv(src, infer_schema=False).head(rows).write_csv(head)
            src, split = head, "ratio:0.7,0.1,0.2"
        horizon = spec.horizons[0] if rows else max(spec.horizons)
        ts.prepare(src, target, split=split, lookback=spec.lookback, horizon=horizon)
    return target


def config_for(model: str, dataset: str, data: Path, horizon: int, sets: list[str], quick: bool = False) -> RunConfig:
    """The `forecast_paper` preset for one (dataset, model, horizon); `--set` overrides come last.

    Order of the overrides: the dataset's, then the caller's. `quick` starts from the `forecast_tiny`
    model and trains a few steps.
    """
    base = forecast_paper()
    if quick:
        tiny = forecast_tiny()
        base = dataclasses.replace(base, model=tiny.model, train=dataclasses.replace(base.train, max_steps=3))
    spec = DATASETS[dataset]
    base = dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, data=str(data)),
        task=dataclasses.replace(
            base.task,
            model=model,
            lookback=spec.lookback,
            horizon=(horizon,),
            patch_len=spec.patch[0],
            patch_stride=spec.patch[1],
        ),
    )
    every = [*spec.sets, *sets]
    if quick:
        every.append("train.eval_every=0")
    return load_config(resolve_task=lambda _n: type(base.task), preset=base, preset_name="forecast_paper", sets=every)


class _ValidationOnly(ForecastTask):
    """The forecast task without its test split: selection runs never compute a test metric."""

    def load(self, cfg: Any, data_dir: Path) -> Any:
        return dataclasses.replace(super().load(cfg, data_dir), test=None)


@dataclasses.dataclass(frozen=True)
class Case:
    """One trained model: (dataset, model, horizon) with its prepared data and overrides."""

    dataset: str
    model: str
    horizon: int
    data: str
    sets: list[str]
    quick: bool
    val_only: bool


def run_case(case: Case, out: Path) -> dict[str, Any]:
    """Train and score one case (in this process or a pool worker); its JSON record."""
    cfg = config_for(case.model, case.dataset, Path(case.data), case.horizon, case.sets, quick=case.quick)
    task = _ValidationOnly() if case.val_only else TASK
    t0 = time.perf_counter()
    result = train_run(cfg, task, out / case.dataset / case.model / f"h{case.horizon}", overwrite=True, quiet=True)
    scored = result["val"] if case.val_only else result["test"]
    # A stream-trained model (task.context_train) is scored after reading the whole past; its window-alone
    # metrics come beside.
    window = {f"window_{k}": scored[f"window_{k}_norm"] for k in ("mse", "mae") if f"window_{k}_norm" in scored}
    return {
        "dataset": case.dataset,
        "model": case.model,
        "horizon": case.horizon,
        "split": "val" if case.val_only else "test",
        "mse": scored["mse_norm"],
        "mae": scored["mae_norm"],
        **window,
        "val_mse": result["val"]["mse_norm"],
        "val_mae": result["val"]["mae_norm"],
        "steps": result["steps"],
        "best_step": result["best_step"],
        "stopped_early": result["stopped_early"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """Markdown: one row per (dataset, model), one column per horizon, then the average and wall time."""
    lines = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        horizons = sorted({h for r in mine for h in r["per"]})
        lines += [
            "",
            f"| {name} ({metric}) | " + " | ".join(f"H {h}" for h in horizons) + " | average | wall |",
            "|---" * (len(horizons) + 3) + "|",
        ]
        for r in mine:
            cells = [f"{r['per'][h][0]:.4f} / {r['per'][h][1]:.4f}" if h in r["per"] else "" for h in horizons]
            avg = r["average"]
            lines.append(
                f"| {r['model']} | " + " | ".join(cells) + f" | **{avg[0]:.4f} / {avg[1]:.4f}** | {r['wall_s']:.0f} s |"
            )
    return "\n".join(lines)


@torch.no_grad()
def context_check(run: Path, cutoffs: int, blocks: tuple[int, ...] = ()) -> dict[str, Any]:
    """Test MSE at `cutoffs` evenly spaced test windows: the last `lookback` rows only vs every row of the
    file before the window (read through the memory in pieces, as `titans forecast --context all`); with
    `blocks`, also from the last n·lookback rows for each n (how the error moves with the past read)."""
    loaded = load_run(run, get_task=get_task)
    t, meta = loaded.cfg.task, loaded.meta
    datasets, _, _ = window_datasets(Path(loaded.cfg.run.data), t.lookback, t.pred_len, scaler=meta["scaler"])
    test = datasets["test"]
    contexts = {"window": t.lookback, "all": None, **{f"{n}_blocks": n * t.lookback for n in blocks}}
    sums = {name: ErrorSums(t.pred_len, len(meta["target_columns"])) for name in contexts}
    picks = [round(i * (len(test) - 1) / max(1, cutoffs - 1)) for i in range(cutoffs)]
    started = time.perf_counter()
    for i in picks:
        s = test.starts[i]
        y = test[i]["y"].unsqueeze(0)
        for name, rows in contexts.items():
            x = test.values[max(0, s + t.lookback - rows) if rows else 0 : s + t.lookback]
            sums[name].update(loaded.model(x.unsqueeze(0)).index_select(2, loaded.model.target_idx), y)
    return {
        "run": str(run),
        "cutoffs": cutoffs,
        "context_rows": [int(test.starts[picks[0]] + t.lookback), int(test.starts[picks[-1]] + t.lookback)],
        **{f"test_mse_{k}": v.mse() for k, v in sums.items()},
        **{f"test_mae_{k}": v.mae() for k, v in sums.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=REPO / "data")
    parser.add_argument("--datasets", default="ETTh1,ETTm1,ILI", help=f"comma list of {', '.join(DATASETS)}")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--horizons", default="all", help="all, short (each dataset's first), or a comma list")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-forecast")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads in all (shared out over --jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="cases trained at once, each in its own process")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value (all models)")
    for model in MODELS:
        parser.add_argument(f"--{model}-set", action="append", default=[], help=f"section.key=value for {model}")
    parser.add_argument("--val-only", action="store_true", help="selection: never evaluate the test split")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,200 rows, tiny Titans, 3 steps, short H")
    parser.add_argument("--context-check", type=Path, help="only compare --context window/all on this trained run")
    parser.add_argument("--cutoffs", type=int, default=20, help="test windows for --context-check")
    parser.add_argument("--context-blocks", default="", help="--context-check: also from the last n blocks (n,...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.context_check is not None:
        blocks = tuple(int(n) for n in args.context_blocks.split(",") if n)
        log(context_check(args.context_check, args.cutoffs, blocks))
        return
    unknown = [n for n in args.datasets.split(",") if n not in DATASETS]
    unknown += [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown dataset or model {unknown[0]!r}; datasets {list(DATASETS)}, models {list(MODELS)}")
    args.out = args.out.resolve()  # run.data is read relative to the run directory otherwise
    args.out.mkdir(parents=True, exist_ok=True)
    split = "val" if args.val_only else "test"
    started_all = time.perf_counter()
    plan: list[tuple[str, list[int]]] = []
    for name in args.datasets.split(","):
        spec = DATASETS[name]
        if args.horizons == "all" and not args.quick:
            horizons = list(spec.horizons)
        elif args.horizons in ("short", "all"):
            horizons = [spec.horizons[0]]
        else:
            horizons = [int(h) for h in args.horizons.split(",")]
        plan.append((name, horizons))
    data = {name: prepare(args.data_root, name, args.out, rows=1200 if args.quick else 0) for name, _ in plan}
    cases = [
        Case(name, model, h, str(data[name]), args.sets + getattr(args, f"{model}_set"), args.quick, args.val_only)
        for name, horizons in plan
        for model in args.models.split(",")
        for h in horizons
    ]
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []

    def finished(record: dict[str, Any]) -> None:
        log(record, args.out)
        done[(record["dataset"], record["model"], record["horizon"])] = record
        # A (dataset, model) row is complete once all its horizons are: log it and rewrite the table, so a run
        # stopped part-way still leaves its table.
        for name, horizons in plan:
            for model in args.models.split(","):
                keys = [(name, model, h) for h in horizons]
                if (name, model) in {(r["dataset"], r["model"]) for r in rows} or not all(k in done for k in keys):
                    continue
                per = {h: (done[k]["mse"], done[k]["mae"]) for h, k in zip(horizons, keys, strict=True)}
                average = tuple(sum(v[i] for v in per.values()) / len(per) for i in (0, 1))
                wall = round(sum(done[k]["wall_s"] for k in keys), 1)
                rows.append({"dataset": name, "model": model, "per": per, "average": average, "wall_s": wall})
                summary = {"dataset": name, "model": model, "split": split, "horizons": horizons, "average": average}
                summary |= {"wall_s": wall, "sets": args.sets + getattr(args, f"{model}_set")}
                if len(horizons) == 4 and name in PAPER and not args.val_only:
                    summary["paper"] = {k: {"mse": v[0], "mae": v[1]} for k, v in PAPER[name].items()}
                log(summary, args.out)
                ordered = sorted(rows, key=lambda r: (list(data).index(r["dataset"]), MODELS.index(r["model"])))
                (args.out / "table.md").write_text(table(ordered, f"{split} MSE / MAE") + "\n")

    if args.jobs <= 1:
        for case in cases:
            finished(run_case(case, args.out))
    else:
        # One process per case, `jobs` at a time, threads shared out: the models are small, so two
        # single-thread processes keep two cores busier than one process with two threads. The longest cases
        # (largest dataset, longest horizon) start first so that no worker is left with a long tail.
        order = sorted(cases, key=lambda c: (c.model != "titans", c.dataset != "ETTm1", -c.horizon))
        threads = max(1, args.threads // args.jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=torch.set_num_threads,
                                 initargs=(threads,)) as pool:  # fmt: skip
            for future in as_completed([pool.submit(run_case, c, args.out) for c in order]):
                finished(future.result())
    rows.sort(key=lambda r: (list(data).index(r["dataset"]), MODELS.index(r["model"])))
    print(table(rows, f"{split} MSE / MAE"))
    print(f"\nwall time {time.perf_counter() - started_all:.0f} s, {args.threads} threads, {args.jobs} jobs")


if __name__ == "__main__":
    main()
