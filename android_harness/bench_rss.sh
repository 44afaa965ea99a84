#!/usr/bin/env bash
# Peak RSS and ms/step of the three drivers training the same program the same steps:
# the native driver, the Python ExecuTorch driver and the eager trainer (BENCHMARKS.md).
#   android_harness/bench_rss.sh PROGRAM_DIR DATA_FILE OUT_DIR [STEPS] [THREADS] [DRIVERS] [TASK]
# DRIVERS: which of "native python-executorch eager" to run (default all three; the eager run
# trains the default model, so leave it out for a program of another model). TASK: the task
# folder or prepared-data name the Python drivers read (prge train --data; default the movie
# reviews): the one DATA_FILE was written from.
# DATA_FILE comes from `prge export-data --program PROGRAM_DIR --steps STEPS --eval-examples 32`.
# Every run ends with one validation eval of 32 rows (eval-every 0) and no test eval.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROGRAM=$1 DATA=$2 OUT=$3 STEPS=${4:-10} THREADS=${5:-2} DRIVERS=${6:-native python-executorch eager} TASK=${7:-}
LR=$("$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["defaults"]["lr"])' "$PROGRAM/manifest.json")
BATCH=$("$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["shapes"]["batch_size"])' "$PROGRAM/manifest.json")
Q=$("$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_queries"])' "$PROGRAM/manifest.json")
NATIVE=$("$ROOT/android_harness/build.sh" host)
mkdir -p "$OUT"
COMMON=(--steps "$STEPS" --lr "$LR" --eps 0.01 --eval-every 0 --threads "$THREADS")
PY=(--batch "$BATCH" --eval-examples 32 --test-examples 0 ${TASK:+--data "$TASK"})
measure() {  # name, command...: /usr/bin/time -v into OUT/name.time, stdout into OUT/name.json
  local name=$1; shift
  rm -rf "$OUT/run-$name"
  /usr/bin/time -v "$@" > "$OUT/$name.json" 2> "$OUT/$name.time"
}
wanted() { [[ " $DRIVERS " == *" $1 "* ]]; }
wanted native && measure native "$NATIVE" --program "$PROGRAM" --data "$DATA" --out "$OUT/run-native" --quiet "${COMMON[@]}"
wanted python-executorch && measure python-executorch "$ROOT/.venv/bin/prge" train --engine executorch --program "$PROGRAM" --out "$OUT/run-python-executorch" "${PY[@]}" "${COMMON[@]}"
wanted eager && measure eager "$ROOT/.venv/bin/prge" train --engine eager --q "$Q" --seq-len 64 --out "$OUT/run-eager" "${PY[@]}" "${COMMON[@]}"
printf "%-20s %14s %14s %10s\n" driver peak_rss_MB median_ms/step wall_s
for name in $DRIVERS; do
  rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$OUT/$name.time")
  wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$OUT/$name.time")
  ms=$("$ROOT/.venv/bin/python" -c 'import json,sys; print(round(json.loads(open(sys.argv[1]).read())["median_step_ms"], 1))' "$OUT/$name.json")
  printf "%-20s %14s %14s %10s\n" "$name" "$(awk -v k="$rss" 'BEGIN{printf "%.1f", k/1024}')" "$ms" "$wall"
done
