#!/usr/bin/env bash
# Every layers benchmark of issue 22 on the shipped parent, in order, each resumable: run it again after a kill and it
# goes on (finished searches are reused, the ground-truth table is appended to). Hours on 2 CPU cores; each step's
# markdown goes to results/bench-layers/*.md for benchmarks/RESULTS.md.
#   benchmarks/layers_all.sh [PARENT]        (default fmnist-vit)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PARENT=${1:-fmnist-vit}
OUT=results/bench-layers
mkdir -p "$OUT"
step() {  # step NAME ARGS...: skipped when its markdown is already there (a finished step)
    local name=$1; shift
    [ -s "$OUT/$name.md" ] && { echo "$name: done before ($OUT/$name.md)"; return; }
    echo "$name: $(date -u +%H:%M:%S) started"
    PYTHONUNBUFFERED=1 $PY benchmarks/bench_layers.py "$@" > "$OUT/$name.part" 2> "$OUT/$name.log"
    mv "$OUT/$name.part" "$OUT/$name.md"
    echo "$name: $(date -u +%H:%M:%S) done"
}
step compare compare --parent "$PARENT" --shares 50 65 80 --trials 200 --score-images 2000 --seed 0 \
    --finetune-epochs 1 --train-subset 10000 --runs "$OUT/runs" --out-csv benchmarks/layers_compare.csv
step differentiable differentiable --parent "$PARENT" --shares 50 65 80 --runs "$OUT/runs" \
    --compare-runs "$OUT/runs" --out-csv benchmarks/layers_differentiable.csv
step speed speed --parent "$PARENT" --from-csv benchmarks/layers_compare.csv
step ground-truth ground-truth --parent "$PARENT" --share 50 --n 2000 --score-images 1000 --seed 0 \
    --out benchmarks/ground_truth_layers50.csv
# a live TPE search scored on the same 1,000 validation images as the table (make search's command), for replay --live
LIVE="$OUT/live/tpe"
if [ ! -s "$LIVE/summary.md" ]; then
    if [ -f "$LIVE/search.yaml" ]; then ARGS=(--resume "$LIVE"); else ARGS=(--space layers --parent "$PARENT"
        --flops 50% --trials 200 --seed 0 --out "$LIVE"); fi
    .venv/bin/tokennas search "${ARGS[@]}" --quiet
fi
step replay replay --table benchmarks/ground_truth_layers50.csv --seeds 20 --evals 300 --live "$LIVE"
