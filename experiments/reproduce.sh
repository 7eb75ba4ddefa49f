#!/usr/bin/env bash
# make compare: every table of the README from one build, two processes side by side (one thread each:
# two torch processes with default threads share 2 cores 5-25x slower, not 2x). Resumable: a finished
# run's model and results are reused (compare.py keeps each in its run folder), so rerunning continues.
#   stage 1  worlds 1 and 2, every row, training seeds 0 1 2        (one process per world)
#   stage 2  world 0, the rows split over two processes
#   stage 3  one comparison from the parts (results/compare.json, its report and plot)
#   stage 4  calibration (base and aligned), the position profiles, the white-box attacks
set -euo pipefail
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
PARTS=runs/parts
mkdir -p "$PARTS"
ROWS=(targeted augment "targeted, data anchor" "targeted, lam 0.5" "targeted, lam 0.5, no penalty")
SUITE=(--train-seeds 0 1 2 --samples 0 --prefill 0 10 40)
part() { "$PY" -m experiments.compare "${SUITE[@]}" "$@" > "$PARTS/$(basename "${@: -1}" .json).log" 2>&1; }

stage1() {
  part --seeds 1 --rows "${ROWS[@]}" --out "$PARTS/world1.json" &
  part --seeds 2 --rows "${ROWS[@]}" --out "$PARTS/world2.json" &
  wait
}
stage2() {
  part --seeds 0 --rows augment targeted "targeted, lam 0.5" --out "$PARTS/world0a.json" &
  sleep 60  # the first process evaluates the world's aligned model; the second reuses it when it is done
  part --seeds 0 --rows "targeted, data anchor" "targeted, lam 0.5, no penalty" --no-contrastive \
    --out "$PARTS/world0b.json" &
  wait
}
stage3() {
  "$PY" -m experiments.compare --merge "$PARTS"/world0a.json "$PARTS"/world0b.json "$PARTS"/world1.json \
    "$PARTS"/world2.json --out results/compare.json --report
}
"${@:-stage1}"
