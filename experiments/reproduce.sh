#!/usr/bin/env bash
# make compare: every table of the README from one build (docs/development.md §9), two processes side by side
# with one thread each (two torch processes with default threads share 2 cores 5-25x slower, not 2x).
# Resumable: a finished run's model and results are reused (compare.py keeps each in its run folder), so
# running it again continues where it stopped. Stages (each one argument; none: all five in order):
#   stage1  worlds 1 and 2: every row, training seeds 0 1 2 (one process per world; the world built first)
#   stage2  world 0, its rows split over two processes
#   stage3  one comparison from the four parts: results/compare.json and its plot (.png)
#   stage4  calibration (base and aligned, with sampling), the position profiles, the white-box attacks
#   stage5  the HTML report of it all: results/report.html
# Each process's log: runs/parts/<part>.log. The commands are the README's, each part one world's share.
set -euo pipefail
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
PARTS=runs/parts
mkdir -p "$PARTS"
ROWS=(targeted augment insertion rto "targeted, data anchor" "targeted, lam 0.5"
  "targeted, lam 0.5, no penalty")
SUITE=(--train-seeds 0 1 2 --samples 0 --prefill 0 10 40)
part() {  # one compare.py process, its log beside its --out (the last argument)
  local log; log="$PARTS/$(basename "${@: -1}" .json).log"
  "$PY" -m experiments.compare "${SUITE[@]}" "$@" > "$log" 2>&1 || { echo "failed: $log" >&2; return 1; }
}
all_of() {  # wait for every process given; fail (after all have ended) if any failed: a stage never goes on
  local pid failed=0  # from a part that did not finish (a bare `wait` returns 0 whatever its children did)
  for pid in "$@"; do wait "$pid" || failed=1; done
  return "$failed"
}

stage1() {
  part --seeds 1 --rows "${ROWS[@]}" --out "$PARTS/world1.json" & local one=$!
  part --seeds 2 --rows "${ROWS[@]}" --out "$PARTS/world2.json" & local two=$!
  all_of "$one" "$two"
}
stage2() {
  # both parts evaluate world 0's aligned model after their training unless the other has finished it first
  # (its results are cached in runs/seed-0/aligned/, written atomically and the same either way)
  part --seeds 0 --rows augment targeted insertion "targeted, lam 0.5" \
    --out "$PARTS/world0a.json" & local one=$!
  part --seeds 0 --rows rto "targeted, data anchor" "targeted, lam 0.5, no penalty" --no-contrastive \
    --out "$PARTS/world0b.json" & local two=$!
  all_of "$one" "$two"
}
stage3() {
  "$PY" -m experiments.compare --merge "$PARTS"/world0a.json "$PARTS"/world0b.json "$PARTS"/world1.json \
    "$PARTS"/world2.json --out results/compare.json
}
stage4() {
  {
    "$PY" eval.py --seeds 0 1 2 --samples 16 --out results/calibration.json
    "$PY" -m experiments.profile profile --seeds 0 1 2 --out results/profile_aligned.json \
      --plot results/profile_aligned.png
    "$PY" -m experiments.profile profile --seeds 0 1 2 --models "aligned={world}/aligned" \
      "augment=runs/seed-{seed}/augment" "insertion=runs/seed-{seed}/insertion" \
      "rto=runs/seed-{seed}/rto" "targeted=runs/seed-{seed}/targeted" \
      --out results/profile_trained.json --plot results/profile_trained.png
    whitebox 0
  } > "$PARTS/stage4a.log" 2>&1 & local one=$!
  whitebox 1 2 > "$PARTS/stage4b.log" 2>&1 & local two=$!
  all_of "$one" "$two"
  "$PY" -m experiments.compare --merge "$PARTS"/whitebox-0.json "$PARTS"/whitebox-1-2.json \
    --out results/whitebox.json
}
whitebox() {  # GCG and refusal-direction ablation on the aligned model and training seed 0's runs
  local name; name=whitebox-$(IFS=-; echo "$*")
  "$PY" eval.py --seeds "$@" --model "aligned={world}/aligned" "augment=runs/seed-{seed}/augment" \
    "insertion=runs/seed-{seed}/insertion" "targeted=runs/seed-{seed}/targeted" \
    --prefill 0 10 --insertion-len 0 --ablate --gcg --out "$PARTS/$name.json"
}
stage5() {
  "$PY" -m lab.report results/compare.json results/whitebox.json --profile results/profile_trained.json \
    --tokens-world data/worlds/seed-0 --tokens-model augment=runs/seed-0/augment \
    targeted=runs/seed-0/targeted \
    --budget-mb 2.5 --out results/report.html
}
if [ $# -eq 0 ]; then set -- stage1 stage2 stage3 stage4 stage5; fi
for stage in "$@"; do
  start=$SECONDS
  "$stage"
  echo "$stage: $((SECONDS - start)) s" | tee -a "$PARTS/times.txt"
done
