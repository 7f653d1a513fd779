#!/usr/bin/env bash
# The main job for DNA: prepare → train → classify → eval on the bundled GUE prom_300_tata
# (human TATA promoters, 300 bp; data/GUE_prom_300_tata/SOURCE.md) with a small Titans (LMM) classifier,
# a few minutes on 2 CPU cores. EPOCHS=N trains longer (the benchmark preset trains up to 12 epochs).
# TITANS="python -m titans_cli" runs from a checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo-dna}
TITANS=${TITANS:-titans}
EPOCHS=${EPOCHS:-1}
GUE=data/GUE_prom_300_tata

$TITANS prepare dna --train $GUE/train.csv --val $GUE/dev.csv --test $GUE/test.csv --out "$OUT/data"
$TITANS train --task dna --preset dna_tata --data "$OUT/data" --out "$OUT/run" --epochs "$EPOCHS" \
    --overwrite --no-progress
$TITANS classify --run "$OUT/run" --input $GUE/test.csv --out "$OUT/predictions.tsv"
head -4 "$OUT/predictions.tsv"
$TITANS eval --run "$OUT/run"
