"""Benchmark: Titans and the GenomicBenchmarks CNN on GUE `prom_300_tata` in one run, JSON lines.

The given train/dev/test files (bundled in `data/GUE_prom_300_tata`) are prepared once; each model trains with
early stopping on validation MCC and is scored on test from its best checkpoint. One line per model with test
MCC, AUROC, accuracy, macro-F1, AUPRC and wall time; a final line checks the targets: Titans beats the CNN, test
AUROC >= 0.81 (HyenaDNA 0.808, NT-v2 0.779, DNABERT-2 0.765 with frozen embeddings, Nature Communications 2025),
and Titans training <= 20 minutes.

    python bench/dna.py --out runs/bench-dna                  # dna_tata (Titans) and dna_cnn presets, seed 0
    python bench/dna.py --out runs/bench-dna --seeds 0,1,2    # three seeds each, mean ± std in the summary
    python bench/dna.py --out runs/bench-dna --quick          # a smoke run of a few steps each
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_name  # noqa: E402
from data_recipes.dna import DnaPrepareOptions, prepare  # noqa: E402
from tasks import get_task  # noqa: E402
from tasks.dna import TASK  # noqa: E402
from tasks.presets import PRESETS  # noqa: E402
from titans_cli.engine.checkpoint import load_run  # noqa: E402
from titans_cli.engine.config import RunConfig, load_config  # noqa: E402
from titans_cli.engine.train import run as train_run  # noqa: E402

GUE = REPO / "data" / "GUE_prom_300_tata"
AUROC_TARGET = 0.81
MINUTES_TARGET = 20.0
METRICS = ("mcc", "auroc", "accuracy", "f1_macro", "auprc")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def config_for(preset: str, data: Path, sets: list[str], quick: bool) -> RunConfig:
    """A preset pointed at the prepared data; `--set` overrides; `--quick` trains 3 steps."""
    base = PRESETS[preset]()
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, data=str(data)))
    if quick:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, max_steps=3, eval_every=0))
    return load_config(resolve_task=lambda _: type(base.task), preset=base, preset_name=preset, sets=sets)


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": round(float(arr.mean()), 4), "std": round(float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dna"), help="prepared data and run folders")
    parser.add_argument("--titans", default="dna_tata", help="preset of the Titans run")
    parser.add_argument("--cnn", default="dna_cnn", help="preset of the CNN run")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override for the Titans run")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values; every model runs each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="3 training steps per model (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    data = args.out / "prom_300_tata"
    manifest = prepare(DnaPrepareOptions(train=GUE / "train.csv", val=GUE / "dev.csv", test=GUE / "test.csv"), data)
    emit({"data": str(data), "splits": {k: v["rows"] for k, v in manifest["splits"].items()}})
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name()}
    results: dict[str, list[dict[str, Any]]] = {"cnn": [], "titans": []}
    for seed in seeds:
        for name, preset, sets in (("cnn", args.cnn, []), ("titans", args.titans, args.sets)):
            cfg = config_for(preset, data, [*sets, f"train.seed={seed}"], args.quick)
            run_dir = args.out / f"{name}-seed{seed}"
            started = time.perf_counter()
            out = train_run(cfg, TASK, run_dir, overwrite=True, quiet=True, progress=False)
            record = {
                "model": name,
                "preset": preset,
                "seed": seed,
                "variant": cfg.model.variant if cfg.task.model == "titans" else "cnn",
                "params": sum(p.numel() for p in load_run(run_dir, get_task=get_task).model.parameters()),
                "steps": out["steps"],
                "best_step": out["best_step"],
                "train_seconds": out["train_seconds"],
                "wall_seconds": round(time.perf_counter() - started, 1),
                "test": {k: out["test"][k] for k in METRICS},
                "val": {k: out["val"][k] for k in METRICS},
                "sets": sets,
                **env,
            }
            results[name].append(record)
            emit(record)
    summary: dict[str, Any] = {"seeds": seeds}
    for name, records in results.items():
        summary[name] = {f"test_{k}": mean_std([r["test"][k] for r in records]) for k in METRICS}
        summary[name]["train_minutes"] = mean_std([r["train_seconds"] / 60 for r in records])
    titans, cnn = summary["titans"], summary["cnn"]
    summary["beats_cnn_mcc"] = titans["test_mcc"]["mean"] > cnn["test_mcc"]["mean"]
    summary["beats_cnn_auroc"] = titans["test_auroc"]["mean"] > cnn["test_auroc"]["mean"]
    summary["auroc_at_least_0.81"] = titans["test_auroc"]["mean"] >= AUROC_TARGET
    summary["titans_within_20_minutes"] = max(r["train_seconds"] for r in results["titans"]) / 60 <= MINUTES_TARGET
    emit({"summary": summary})


if __name__ == "__main__":
    main()
