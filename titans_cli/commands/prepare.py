"""`titans prepare <recipe>`: the sub-app that turns raw data into validated Parquet splits plus a manifest.

Each recipe is one subcommand, registered in `titans_cli/cli.py` on `prepare_app`; its wiring lives in a
command module and its pipeline in `data_recipes/<recipe>.py`.
"""

from __future__ import annotations

import typer

prepare_app = typer.Typer(
    name="prepare",
    help="Turn raw data into validated Parquet splits plus a manifest (one subcommand per recipe).",
    no_args_is_help=True,
    epilog="Example: titans prepare timeseries --input data/ETTh1/ETTh1.csv --split ett-hourly --out prepared/etth1",
)
