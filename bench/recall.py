"""The recall claim: at 1024 tokens with an attention window of 64, memory variants recall, the
attention-only baseline of the same window stays at chance. Prints one JSON line per variant.

Each variant runs the `titans` CLI in two stages (a curriculum; both stages' pairs sit more than the attention
reach before the queries): `recall_256` learns the task on 256-token sequences, then `recall_1k` continues
from its weights (`--init-from`) on 1024-token sequences and is evaluated on the 1024-token test split.
Row fields: variant, accuracy / exact (test, 1024 tokens), stage-1 accuracy at 256, chance, train seconds
(both stages, from the runs' own timers), wall seconds (the stages run by this call; prepare excluded), threads,
and the settings given.

`--hybrid` trains MAC and MAG with `recall_256_hybrid` / `recall_1k_hybrid` instead (memory output on the residual
stream, the gated attention branch held at zero for the first 600 steps; see tasks/presets.py); other variants
keep the plain presets.

`--set` applies to both stages, `--set1` / `--set2` to one (e.g. the inner-loss clamp only at 1024 tokens);
`--seed N` is `train.seed=N` in both. `--stages 1` trains stage 1 only (a row without the 1024 fields);
`--stages 2` continues from the stage-1 run already in OUT (its result is read from the run folder).

    python bench/recall.py --threads 2 [--variants lmm,mac,mag,mal,attn] [--out runs/bench-recall]
                           [--stage1-steps N] [--seed N] [--stages both|1|2] [--hybrid]
                           [--set section.key=value ...] [--set1 ...] [--set2 ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titans_cli.engine.runs import write_json  # noqa: E402

# Stage data: the same vocabulary (so weights transfer), pairs beyond 2 layers x window 64 of the queries.
DATA = {
    "256": ["--seq-len", "256", "--min-gap", "128", "--n-train", "10000", "--n-val", "200", "--n-test", "500"],
    "1024": ["--seq-len", "1024", "--min-gap", "256", "--n-train", "2400", "--n-val", "200", "--n-test", "500"],
}
COMMON_DATA = ["--pairs", "4", "--queries", "4", "--vocab", "16", "--filler-vocab", "1", "--seed", "0"]


HYBRIDS = ("mac", "mag")  # the variants `--hybrid` moves to the recall_*_hybrid presets
STAGE1_RESULT = "bench-stage1.json"  # the stage-1 `titans train --json` result, kept for `--stages 2`


class Failed(Exception):
    """A `titans` command exited non-zero; the message is its error line."""


def titans(args: list[str], threads: int) -> dict[str, Any]:
    """Run `python -m titans_cli ARGS --json` with `threads` intra-op threads; return its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "titans_cli", *args, "--json"]
    print("+ titans " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise Failed(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout)


def as_sets(items: list[str]) -> list[str]:
    """`--set` arguments for the `titans` CLI from section.key=value items."""
    return [arg for item in items for arg in ("--set", item)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="lmm,mac,mag,mal,attn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-recall"))
    parser.add_argument("--stage1-steps", type=int, default=0, help="override recall_256's max_steps")
    parser.add_argument("--seed", type=int, default=None, help="train.seed for both stages")
    parser.add_argument("--stages", choices=("both", "1", "2"), default="both")
    parser.add_argument("--set", action="append", default=[], help="section.key=value for both stages")
    parser.add_argument("--set1", action="append", default=[], help="section.key=value for stage 1 (256) only")
    parser.add_argument("--set2", action="append", default=[], help="section.key=value for stage 2 (1024) only")
    parser.add_argument("--hybrid", action="store_true", help="mac and mag use the recall_*_hybrid presets")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the script only")
    opts = parser.parse_args()

    quick = ["--max-steps", "4", "--set", "train.eval_every=2"] if opts.quick else []
    longer = ["--max-steps", str(opts.stage1_steps)] if opts.stage1_steps and not opts.quick else []
    both = opts.set + ([f"train.seed={opts.seed}"] if opts.seed is not None else [])
    sets1, sets2 = as_sets(both + opts.set1), as_sets(both + opts.set2)
    for size, args in DATA.items():
        if not (opts.out / f"data-{size}" / "manifest.json").is_file():
            titans(["prepare", "recall", "--out", str(opts.out / f"data-{size}"), *args, *COMMON_DATA], 1)
    for variant in opts.variants.split(","):
        stage1, stage2 = opts.out / f"{variant}-256", opts.out / f"{variant}-1024"
        started = time.perf_counter()
        hybrid = "_hybrid" if opts.hybrid and variant in HYBRIDS else ""
        row: dict[str, Any] = {"variant": variant, "seq_len": 1024, "window": 64, "threads": opts.threads}
        if hybrid:
            row["presets"] = [f"recall_256{hybrid}", f"recall_1k{hybrid}"]
        row.update({k: v for k, v in (("seed", opts.seed), ("set", opts.set), ("set1", opts.set1),
                                      ("set2", opts.set2)) if v not in (None, [])})  # fmt: skip
        try:
            if opts.stages == "2":
                first = json.loads((stage1 / STAGE1_RESULT).read_text())
            else:
                first = titans(["train", "--preset", f"recall_256{hybrid}", "--variant", variant, "--data",
                                str(opts.out / "data-256"), "--out", str(stage1), "--overwrite", "--quiet", *sets1,
                                *longer, *quick], opts.threads)  # fmt: skip
                write_json(stage1 / STAGE1_RESULT, first)  # atomically: `--stages 2` reads it back
            if opts.stages == "1":
                row.update(seq_len=256, accuracy_256=round(first["test"]["accuracy"], 4),
                           exact_256=round(first["test"]["exact"], 4), steps=[first["steps"]],
                           train_seconds=round(first["train_seconds"], 1))  # fmt: skip
                print(json.dumps(row), flush=True)
                continue
            second = titans(["train", "--preset", f"recall_1k{hybrid}", "--variant", variant, "--data",
                             str(opts.out / "data-1024"), "--out", str(stage2), "--init-from", str(stage1),
                             "--overwrite", "--quiet", *sets2, *quick], opts.threads)  # fmt: skip
        except (Failed, OSError, ValueError) as err:  # ValueError: an unreadable stage-1 result
            print(json.dumps({**row, "error": str(err)}), flush=True)
            continue
        row.update(
            accuracy=round(second["test"]["accuracy"], 4),
            exact=round(second["test"]["exact"], 4),
            accuracy_256=round(first["test"]["accuracy"], 4),
            chance=second["test"]["chance_accuracy"],
            steps=[first["steps"], second["steps"]],
            train_seconds=round(first["train_seconds"] + second["train_seconds"], 1),
            wall_seconds=round(time.perf_counter() - started, 1),
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
