#!/usr/bin/env bash
# One command on a lent GPU machine: a profile's whole DAG as the pipeline's plain
# `python -m pipeline_src <stage>` commands (that machine has no snakemake or dvc),
# in DAG order, fitted to the minutes the command may take, then the run's
# results folder without weights packed into $OUT.
#
#   PROFILE=gpu_bcp BUDGET_S=540 PIPELINE_GIT_COMMIT=$(git rev-parse HEAD) bash tools/gpu_session.sh
#
# PROFILE     config/<name>/params.yaml (default gpu_bcp)
# BUDGET_S    seconds the whole command may take; training gets what the other
#             stages leave (RESERVE_S, default 200), split among the trained methods
#             (one run each: no seeds, no Duet grid), and `fit-epochs` shrinks each
#             method's schedule to it from the benchmark; a method it cannot fit is skipped
# CARRY       a folder sent along: the data archive (put where data.path says when it
#             is missing) and wheels of packages the machine lacks (torchattacks,
#             jsonschema and its dependencies)
# OUT         where results.tar.gz, the params used and the logs go
# A stage that fails is logged and the stages that do not need it still run;
# the exit status is that of the first failure.
set -u -o pipefail
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
PROFILE=${PROFILE:-gpu_bcp}
BUDGET_S=${BUDGET_S:-540}
RESERVE_S=${RESERVE_S:-200}
CARRY=${CARRY:-device_carry}
OUT=${OUT:-/tmp/gpu_session}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
status=0

stage() {  # stage NAME [ARGS...]: one stage, its output in $OUT/logs, its last lines shown
  local name=$1 log="$OUT/logs/$1${3:+-$3}.log"
  echo "== [$(elapsed)s] $*"
  if "$PY" -m pipeline_src "$@" --profile "$PROFILE" >"$log" 2>&1; then
    tr '\r' '\n' <"$log" | grep -v '%|' | tail -n 4
    return 0
  else
    echo "!! $name failed:"; tr '\r' '\n' <"$log" | grep -v '%|' | tail -n 15
    [ "$status" -ne 0 ] || status=1
    return 1
  fi
}
time_left() { [ $(( BUDGET_S - $(elapsed) )) -gt "$1" ]; }

params_value() { "$PY" -c "from pipeline_src.config import load_params; from pipeline_src.runs import method_runs
p = load_params('$PROFILE'); print($1)"; }

# -- what the machine lacks ---------------------------------------------------------------
if ! "$PY" -c "import torchattacks, jsonschema" 2>/dev/null && ls "$CARRY"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
data_path=$(params_value "p['data']['path']") || exit 1
if [ ! -e "$data_path" ] && [ -e "$CARRY/$(basename "$data_path")" ]; then
  mkdir -p "$(dirname "$data_path")" && cp "$CARRY/$(basename "$data_path")" "$data_path"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
} | tee "$OUT/machine.txt"

run_name=$(params_value "p['run']['name']")
methods=$(params_value "' '.join(p['methods'])")
runs=$(params_value "' '.join(method_runs(p))")

# -- the DAG --------------------------------------------------------------------------------
stage data || { echo "no data, nothing else can run"; exit 1; }
stage benchmark
n=$(echo "$methods" | wc -w)
train_budget=$(( (BUDGET_S - $(elapsed) - RESERVE_S) / n ))
fitted="" trained=""
for method in $methods; do
  stage fit-epochs --method "$method" --seconds "$train_budget" && fitted="$fitted $method"
done
cp "config/$PROFILE/params.yaml" "$OUT/params.yaml"
for run in $runs; do
  method=$(params_value "method_runs(p)['$run'].method")
  # An unfitted schedule could outrun the budget and lose everything: skip it.
  case " $fitted " in *" $method "*) ;; *) echo "!! $run: no fitted schedule, not trained"; status=1; continue;; esac
  stage train --method "$run" && trained="$trained $run" && stage certify --method "$run" && stage pgd --method "$run"
done
if time_left 90; then
  stage vanilla && stage svd && for run in $trained; do stage similarity --method "$run"; done
  stage tables; stage figures; stage report
else
  echo "!! $(elapsed)s of $BUDGET_S: no time left for the vanilla model and the report"; status=1
fi

# -- what comes back: the results folder, no weights, no data cache -----------------------------
tar -czf "$OUT/results.tar.gz" --exclude='*.pt' "results/$run_name"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "== [$(elapsed)s] done, status $status"
exit $status
