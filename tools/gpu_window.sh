#!/usr/bin/env bash
# One GPU window (issue 12): the `window` profile's whole DAG under Snakemake in one
# command on a lent GPU machine, the certified runs sharing the card, and what comes
# back packed into $OUT. Each window trains the next seed not yet committed
# (config/window/params.yaml: `seeds`, `committed_runs`; docs/gpu-window.md).
#
# Here, once per session (wheels and data travel in device_carry/, git-ignored):
#   bash tools/device_wheels.sh && cp ../shared/data/cifar10-jpeg.tar.gz device_carry/
# There (device tool `run`, timeout_s 600, carry ["device_carry/wheels",
# "device_carry/cifar10-jpeg.tar.gz", "device_carry/checkpoints"]: ~33 MB of the 64 MiB):
#   PIPELINE_GIT_COMMIT=<git rev-parse HEAD here> bash tools/gpu_window.sh
# Here again, with the folder the files came back to:
#   bash tools/window_collect.sh <files_at>
#
# MODE      auto (default): `benchmark` when results/<run>/benchmark/ holds no committed
#           benchmark, else `window`.
#           benchmark: every method's seconds per epoch alone and 1, 2, 4, 6 BCP trainings
#             at once (benchmark.concurrency; again under CUDA MPS where the machine has
#             it), then tools/window_fit.py fits the schedules to BUDGET_S and writes them
#             into the profile; nothing is trained (about 3-4 minutes; the first command
#             of the first window session, the window itself is the second).
#           window: the DAG: data -> vanilla -> SVD -> the certified runs at once ->
#             certify, PGD, similarity -> tables, figures, REPORT.md.
#           dry-run: the window's `snakemake -n` (no GPU needed).
# BUDGET_S  the window the schedules are fitted to, first stage to REPORT.md (540)
# DEADLINE_S  the whole command stops Snakemake at this many seconds (575), leaving time
#           to pack: a window cut short keeps every finished stage's outputs
# JOBS      GPU jobs sharing the card (Snakemake --resources gpu_jobs=JOBS; default 8)
# MPS       1: run the window under CUDA MPS; auto (default): when the benchmark measured
#           it faster at JOBS jobs (benchmark/concurrency_mps.json); 0: never
# CARRY     the carried folder: wheels/ (tools/device_wheels.sh), the data archive,
#           checkpoints/ (parts carried back from a window cut short)
# OUT       what comes back (at most 8 files of 16 MiB): window.tar.gz (results/<run>/
#           without weights or data cache, WINDOW.md, the logs, the profile's params.yaml)
#           and checkpoint parts of runs left unfinished (ckpt-<run>.part-NN), at most
#           CKPT_PARTS (2: what the 64 MiB carry has room for beside wheels and data)
set -u -o pipefail
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
PROFILE=${PROFILE:-window}
MODE=${MODE:-auto}
BUDGET_S=${BUDGET_S:-540}
DEADLINE_S=${DEADLINE_S:-575}
JOBS=${JOBS:-8}
MPS=${MPS:-auto}
CARRY=${CARRY:-device_carry}
OUT=${OUT:-/tmp/gpu_window}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# -- what the machine lacks -------------------------------------------------------------
if ! command -v snakemake >/dev/null 2>&1 || ! python3 -c "import jsonschema, torchattacks" 2>/dev/null; then
  . tools/device_install.sh "${WHEELS:-$CARRY/wheels}" || exit 1
fi
command -v python >/dev/null 2>&1 || { mkdir -p /tmp/pybin; ln -sf "$(command -v python3)" /tmp/pybin/python; export PATH="/tmp/pybin:$PATH"; }
value() { python3 -c "import sys; sys.path.insert(0, '.')
from pipeline_src.config import load_params
from pipeline_src.paths import RunLayout
p = load_params('$PROFILE'); L = RunLayout.of(p); print($1)"; }
run_dir=$(value "L.root") || exit 1
data_path=$(value "p['data']['path']")
if [ ! -e "$data_path" ] && [ -e "$CARRY/$(basename "$data_path")" ]; then
  mkdir -p "$(dirname "$data_path")" && cp "$CARRY/$(basename "$data_path")" "$data_path"
fi
machine="$OUT/machine.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "$(nproc) CPU cores"
} > "$machine" 2>&1
cat "$machine"
benchmark_file=$(value "L.benchmark_result(p['model']['arch'])")
if [ "$MODE" = auto ]; then
  if [ -e "$benchmark_file" ]; then MODE=window; else MODE=benchmark; fi
fi
echo "== [$(elapsed)s] mode $MODE, profile $PROFILE"

start_mps() {
  command -v nvidia-cuda-mps-control >/dev/null 2>&1 || { echo "no nvidia-cuda-mps-control: MPS off"; return 1; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && export PIPELINE_MPS=1 && echo "MPS on"
}
stop_mps() { [ "${PIPELINE_MPS:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control; unset PIPELINE_MPS; }

pack() {  # results without weights or data cache, the profile, the logs; checkpoint parts
  if [ "$MODE" = window ]; then
    python3 tools/window.py record --profile "$PROFILE" --out "$run_dir/WINDOW.md" --machine "$machine" \
      --status "${1:-0}" --started "$started" ${vanilla_before:+--vanilla-before "$vanilla_before"} || true
  else
    cp "$machine" "$run_dir/benchmark/machine.txt" 2>/dev/null
  fi
  mkdir -p "$run_dir/logs" && mv "$OUT"/machine.txt "$OUT"/snakemake.log "$run_dir/logs/" 2>/dev/null
  tar -czf "$OUT/window.tar.gz" --exclude='*.pt' "$run_dir" "config/$PROFILE/params.yaml"
  # Unfinished runs' checkpoints, Duet first (the critical path), while CKPT_PARTS allows
  # (the 8 files back, and the 64 MiB the next window can carry).
  local slots=${CKPT_PARTS:-2}
  for ckpt in $(ls -S "$run_dir"/train/duet*/checkpoint.pt "$run_dir"/train/*/checkpoint.pt 2>/dev/null | awk '!seen[$0]++'); do
    local name size parts
    name=$(basename "$(dirname "$ckpt")"); size=$(stat -c %s "$ckpt")
    parts=$(( (size + 15728639) / 15728640 ))
    [ "$parts" -le "$slots" ] || { echo "checkpoint of $name: $parts parts of 15 MiB, $slots slots left: stays"; continue; }
    split -b 15M -d "$ckpt" "$OUT/ckpt-$name.part-" && slots=$(( slots - parts ))
  done
  ls -la "$OUT"
}

# -- benchmark: once, before the first window --------------------------------------------
if [ "$MODE" = benchmark ]; then
  mkdir -p "$run_dir/logs"
  snakemake --cores "$(nproc)" --scheduler greedy --config profile="$PROFILE" -- "$(value "L.svd_factors")" \
    > "$run_dir/logs/benchmark-prerequisites.log" 2>&1 || { tail -n 30 "$run_dir/logs/benchmark-prerequisites.log"; exit 1; }
  echo "== [$(elapsed)s] data, vanilla, SVD done; benchmark"
  python3 -m pipeline_src benchmark --profile "$PROFILE" --log "$run_dir/logs/benchmark.log" | grep -v '%|' || exit 1
  if [ "$MPS" != 0 ] && start_mps; then
    python3 -c "import json, sys; sys.path.insert(0, '.')
from pathlib import Path
from pipeline_src.benchmark import concurrency_benchmark
from pipeline_src.report.benchmark_tables import concurrency_markdown_table
from pipeline_src.config import load_params
p = load_params('$PROFILE'); c = p['benchmark']
r = concurrency_benchmark(p, Path('.'), c['concurrency'], c['warmup_steps'], c['steps'])
Path('$run_dir/benchmark/concurrency_mps.json').write_text(json.dumps(r, indent=1)); print(concurrency_markdown_table(r))"
    stop_mps
  fi
  echo "== [$(elapsed)s] fitting the schedules to $BUDGET_S s"
  python3 tools/window_fit.py --profile "$PROFILE" --seconds "$BUDGET_S" --write > "$run_dir/logs/window_fit.log"
  fit=$?
  [ "$fit" -eq 0 ] || echo "!! the schedules were not fitted (exit $fit): the profile keeps its estimate"
  rm -rf "$run_dir/benchmarks" "$run_dir/svd" "$run_dir/vanilla" "$run_dir/data/cifar10.pt"  # the window remakes them
  pack "$fit"
  exit "$fit"
fi

# -- the window ------------------------------------------------------------------------------
# Checkpoints carried back from a window cut short continue where they stopped.
for first in "$CARRY"/checkpoints/ckpt-*.part-00; do
  [ -e "$first" ] || continue
  name=$(basename "$first" .part-00); name=${name#ckpt-}
  mkdir -p "$run_dir/train/$name" && cat "${first%00}"* > "$run_dir/train/$name/checkpoint.pt"
  echo "resuming $name from its carried checkpoint"
done
vanilla_before=$( [ -e "$run_dir/vanilla/metrics.json" ] && python3 -c "import json; print(json.load(open('$run_dir/vanilla/metrics.json'))['weights_sha256'])" )
if [ "$MPS" = auto ]; then
  MPS=$(python3 -c "import json, sys; sys.path.insert(0, '.')
from pipeline_src.schedule_fit import concurrency_slowdown
try:
    plain = json.load(open('$benchmark_file')); mps = json.load(open('$run_dir/benchmark/concurrency_mps.json'))
    print(int(concurrency_slowdown({'concurrency': mps}, $JOBS) < concurrency_slowdown(plain, $JOBS)))
except (OSError, KeyError):
    print(0)")
fi
[ "$MPS" = 1 ] && start_mps
dry=(); [ "$MODE" = dry-run ] && dry=(-n)
priority=$(python3 tools/window.py targets --profile "$PROFILE")
left=$(( DEADLINE_S - $(elapsed) ))
echo "== [$(elapsed)s] snakemake: $JOBS GPU jobs at once, stopped at $DEADLINE_S s (in $left s)"
timeout --signal=TERM --kill-after=15 "$left" \
  snakemake "${dry[@]}" --cores "$(nproc)" --resources gpu_jobs="$JOBS" --scheduler greedy --keep-going \
    --rerun-incomplete ${priority:+--prioritize $priority} --config profile="$PROFILE" -- all \
  > "$OUT/snakemake.log" 2>&1
status=$?
grep -E "^(Finished|Error|\[|rule |Job stats|Nothing)|of [0-9]+ steps" "$OUT/snakemake.log" | tail -n 40
stop_mps
[ "$status" -eq 124 ] && echo "!! stopped at the deadline ($DEADLINE_S s): finished stages are kept"
echo "== [$(elapsed)s] snakemake exit status $status"
if [ "$MODE" = dry-run ]; then cat "$OUT/snakemake.log" | tail -n 25; exit $status; fi
pack "$status"
echo "== [$(elapsed)s] done"
exit $status
