#!/usr/bin/env bash
# The main job: prepare → train → forecast → eval on the bundled ETTh1 with a small Titans (LMM)
# forecaster, a few minutes on 2 CPU cores. Ends with the metrics table; the forecast plot is $OUT/forecast.png.
# Needs `pip install -e '.[plot]'` (matplotlib for the plot). TITANS="python -m titans_cli" runs from a checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo-forecast}
TITANS=${TITANS:-titans}

$TITANS prepare timeseries --input data/ETTh1/ETTh1.csv --split ett-hourly --out "$OUT/prepared" --overwrite
$TITANS train --task forecast --preset forecast_small --data "$OUT/prepared" --out "$OUT/run" --overwrite \
    --no-progress
$TITANS forecast --run "$OUT/run" --input data/ETTh1/ETTh1.csv \
    --out "$OUT/forecast.csv" --plot "$OUT/forecast.png"
$TITANS eval --run "$OUT/run" --season-length 24
