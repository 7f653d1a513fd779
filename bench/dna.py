"""Benchmark (issue 4 §7): Titans and the GenomicBenchmarks CNN on GUE `prom_300_tata` in one run, JSON lines.

The given train/dev/test files (bundled in `data/GUE_prom_300_tata`) are prepared once; each model trains with
early stopping on validation MCC and is scored on test from its best checkpoint. One line per model with test
MCC, AUROC, accuracy, macro-F1, AUPRC and wall time; a final line checks the targets: Titans beats the CNN, test
AUROC >= 0.81 (HyenaDNA 0.808, NT-v2 0.779, DNABERT-2 0.765 with frozen embeddings, Nature Communications 2025),
and Titans training <= 20 minutes.

    python bench/dna.py --out runs/bench-dna                 # dna_tata (Titans) and dna_cnn presets
    python bench/dna.py --out runs/bench-dna --quick         # a smoke run of a few steps each
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_recipes.dna import DnaPrepareOptions, prepare  # noqa: E402
from tasks.dna import TASK  # noqa: E402
from tasks.presets import PRESETS  # noqa: E402
from titans_cli.checkpoint import load_run  # noqa: E402
from titans_cli.config import RunConfig, load_config  # noqa: E402
from titans_cli.train import run as train_run  # noqa: E402

GUE = REPO / "data" / "GUE_prom_300_tata"
AUROC_TARGET = 0.81
MINUTES_TARGET = 20.0
METRICS = ("mcc", "auroc", "accuracy", "f1_macro", "auprc")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def config_for(preset: str, data: Path, sets: list[str], quick: bool) -> RunConfig:
    """A preset pointed at the prepared data; `--set` overrides; `--quick` trains 3 steps."""
    base = PRESETS[preset]()
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, data=str(data)))
    if quick:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, max_steps=3, eval_every=0))
    return load_config(resolve_task=lambda _: type(base.task), preset=base, preset_name=preset, sets=sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dna"), help="prepared data and run folders")
    parser.add_argument("--titans", default="dna_tata", help="preset of the Titans run")
    parser.add_argument("--cnn", default="dna_cnn", help="preset of the CNN run")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override for the Titans run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="3 training steps per model (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = args.out / "prom_300_tata"
    manifest = prepare(DnaPrepareOptions(train=GUE / "train.csv", val=GUE / "dev.csv", test=GUE / "test.csv"), data)
    emit({"data": str(data), "splits": {k: v["rows"] for k, v in manifest["splits"].items()}})
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name()}
    results = {}
    for name, preset, sets in (("cnn", args.cnn, []), ("titans", args.titans, args.sets)):
        cfg = config_for(preset, data, sets, args.quick)
        started = time.perf_counter()
        out = train_run(cfg, TASK, args.out / name, overwrite=True, quiet=True, progress=False)
        wall = time.perf_counter() - started
        results[name] = record = {
            "model": name,
            "preset": preset,
            "variant": cfg.model.variant if cfg.task.model == "titans" else "cnn",
            "params": sum(p.numel() for p in load_run(args.out / name).model.parameters()),
            "steps": out["steps"],
            "best_step": out["best_step"],
            "train_seconds": out["train_seconds"],
            "wall_seconds": round(wall, 1),
            "test": {k: out["test"][k] for k in METRICS},
            "val": {k: out["val"][k] for k in METRICS},
            "sets": sets,
            **env,
        }
        emit(record)
    titans, cnn = results["titans"], results["cnn"]
    minutes = titans["train_seconds"] / 60
    emit(
        {
            "summary": {
                "titans_test_mcc": titans["test"]["mcc"],
                "cnn_test_mcc": cnn["test"]["mcc"],
                "titans_test_auroc": titans["test"]["auroc"],
                "cnn_test_auroc": cnn["test"]["auroc"],
                "beats_cnn_mcc": titans["test"]["mcc"] > cnn["test"]["mcc"],
                "beats_cnn_auroc": titans["test"]["auroc"] > cnn["test"]["auroc"],
                "auroc_at_least_0.81": titans["test"]["auroc"] >= AUROC_TARGET,
                "titans_train_minutes": round(minutes, 2),
                "within_20_minutes": minutes <= MINUTES_TARGET,
            }
        }
    )


if __name__ == "__main__":
    main()
