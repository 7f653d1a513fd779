"""Benchmark: the Table 3 protocol (spec §6.2) for Titans and DLinear in one run, one JSON line per result.

Lookback 96; one model per horizon in 96, 192, 336, 720; test MSE/MAE on the z-scored scale from the best
validation checkpoint; each (dataset, model) ends with the four-horizon average beside the paper's numbers.

    python bench/forecast.py --data-root ../shared/data --datasets ETTh1 --out runs/bench

ETTh1 is also bundled in `data/ETTh1`; ETTm1 is read from `--data-root` (`ETTm1/ETTm1.csv.gz`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_recipes import timeseries as ts  # noqa: E402
from tasks.forecast import TASK, window_datasets  # noqa: E402
from tasks.presets import forecast_paper  # noqa: E402
from titans_cli.checkpoint import load_run  # noqa: E402
from titans_cli.config import RunConfig, load_config  # noqa: E402
from titans_cli.metrics import ErrorSums  # noqa: E402
from titans_cli.train import run as train_run  # noqa: E402

# Test MSE / MAE averaged over the four horizons (spec §6.3, Table 3).
PAPER = {
    "ETTh1": {"titans": (0.420, 0.421), "simba": (0.441, 0.432), "dlinear": (0.456, 0.452)},
    "ETTm1": {"titans": (0.358, 0.387), "simba": (0.383, 0.396), "dlinear": (0.403, 0.407)},
}
FILES = {"ETTh1": ("ETTh1/ETTh1.csv", "ett-hourly"), "ETTm1": ("ETTm1/ETTm1.csv.gz", "ett-minute")}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def prepare(data_root: Path, name: str, out: Path) -> Path:
    rel, split = FILES[name]
    src = data_root / rel
    if name == "ETTh1" and not src.exists():
        src = REPO / "data" / "ETTh1" / "ETTh1.csv"
    target = out / "prepared" / name
    if not (target / ts.MANIFEST).exists():
        ts.prepare(src, target, split=split)
    return target


def config_for(model: str, data: Path, horizon: int, sets: list[str]) -> RunConfig:
    """The `forecast_paper` preset for one horizon; `model` picks Titans or DLinear; `--set` overrides last."""
    base = forecast_paper()
    base = dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, data=str(data)),
        task=dataclasses.replace(
            base.task, model=model, horizon=(horizon,), revin=base.task.revin and model != "dlinear"
        ),
    )
    return load_config(resolve_task=lambda _n: type(base.task), preset=base, preset_name="forecast_paper", sets=sets)


@torch.no_grad()
def context_check(run: Path, cutoffs: int) -> dict[str, Any]:
    """Test MSE at `cutoffs` evenly spaced test windows: the last `lookback` rows only vs every row of the
    file before the window (read through the memory in pieces, as `titans forecast --context all`)."""
    loaded = load_run(run)
    t, meta = loaded.cfg.task, loaded.meta
    datasets, _, _ = window_datasets(Path(loaded.cfg.run.data), t.lookback, t.pred_len, scaler=meta["scaler"])
    test = datasets["test"]
    sums = {
        "window": ErrorSums(t.pred_len, len(meta["target_columns"])),
        "all": ErrorSums(t.pred_len, len(meta["target_columns"])),
    }
    picks = [round(i * (len(test) - 1) / max(1, cutoffs - 1)) for i in range(cutoffs)]
    started = time.perf_counter()
    for i in picks:
        s = test.starts[i]
        y = test[i]["y"].unsqueeze(0)
        for name, x in (("window", test.values[s : s + t.lookback]), ("all", test.values[: s + t.lookback])):
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
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", default="ETTh1", help="comma list of ETTh1, ETTm1")
    parser.add_argument("--models", default="titans,dlinear")
    parser.add_argument("--horizons", default="96,192,336,720")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-forecast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value (all models)")
    parser.add_argument("--titans-set", action="append", default=[], help="section.key=value for Titans only")
    parser.add_argument("--dlinear-set", action="append", default=[], help="section.key=value for DLinear only")
    parser.add_argument("--context-check", type=Path, help="only compare --context window/all on this trained run")
    parser.add_argument("--cutoffs", type=int, default=20, help="test windows for --context-check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.context_check is not None:
        emit(context_check(args.context_check, args.cutoffs))
        return
    horizons = [int(h) for h in args.horizons.split(",")]
    for name in args.datasets.split(","):
        data = prepare(args.data_root, name, args.out)
        for model in args.models.split(","):
            per: dict[int, dict[str, Any]] = {}
            started = time.perf_counter()
            extra = args.titans_set if model == "titans" else args.dlinear_set
            for h in horizons:
                cfg = config_for(model, data, h, args.sets + extra)
                t0 = time.perf_counter()
                result = train_run(cfg, TASK, args.out / name / model / f"h{h}", overwrite=True, quiet=True)
                per[h] = {
                    "dataset": name,
                    "model": model,
                    "horizon": h,
                    "test_mse": result["test"]["mse_norm"],
                    "test_mae": result["test"]["mae_norm"],
                    "val_mse": result["val"]["mse_norm"],
                    "val_mae": result["val"]["mae_norm"],
                    "steps": result["steps"],
                    "best_step": result["best_step"],
                    "stopped_early": result["stopped_early"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
                emit(per[h])
            avg = {
                k: sum(r[k] for r in per.values()) / len(per) for k in ("test_mse", "test_mae", "val_mse", "val_mae")
            }
            record = {
                "dataset": name,
                "model": model,
                "horizons": horizons,
                "average": avg,
                "wall_s": round(time.perf_counter() - started, 1),
                "config": {"sets": args.sets + extra},
            }
            if len(horizons) == 4 and name in PAPER:
                record["paper"] = {k: {"mse": v[0], "mae": v[1]} for k, v in PAPER[name].items()}
                record["beats_paper_dlinear_mse"] = avg["test_mse"] < PAPER[name]["dlinear"][0]
                record["beats_simba_mse"] = avg["test_mse"] < PAPER[name]["simba"][0]
                record["reaches_paper_titans_mse"] = avg["test_mse"] <= PAPER[name]["titans"][0]
            emit(record)


if __name__ == "__main__":
    main()
