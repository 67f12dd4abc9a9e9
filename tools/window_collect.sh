#!/usr/bin/env bash
# Here, after a GPU window (tools/gpu_window.sh): unpack what came back, mark the runs
# that finished as committed and name the next seed (tools/window.py next-seed),
# regenerate the profile's dvc.yaml, and print the commit to make.
#
#   bash tools/window_collect.sh FILES_DIR [PROFILE]
#
# FILES_DIR holds window.tar.gz and any ckpt-<run>.part-NN (checkpoints of runs a
# window left unfinished: they go to device_carry/checkpoints/, git-ignored, for the
# next window to carry; weights are never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:?usage: tools/window_collect.sh FILES_DIR [PROFILE]}
PROFILE=${2:-window}
[ -e "$FILES/window.tar.gz" ] || { echo "no $FILES/window.tar.gz" >&2; exit 1; }
run_dir=$(python -c "from pipeline_src.config import load_params; print('results/' + load_params('$PROFILE')['run']['name'])")
# A previous window's checkpoints are stale once this one has come back.
rm -rf device_carry/checkpoints
tar -xzf "$FILES/window.tar.gz"
if ls "$FILES"/ckpt-*.part-* >/dev/null 2>&1; then
  mkdir -p device_carry/checkpoints && cp "$FILES"/ckpt-*.part-* device_carry/checkpoints/
  echo "checkpoints for the next window: $(ls device_carry/checkpoints | sed 's/\.part-.*//' | sort -u | tr '\n' ' ')"
fi
python tools/window.py next-seed --profile "$PROFILE"
python -m pipeline_src export-dvc --profiles "$PROFILE"
cat <<MSG
Now commit the window (metrics, histories, tables, figures, REPORT.md, WINDOW.md, benchmark;
no weights, no data cache; results/ is git-ignored, hence -f):
  git add -f \$(cd . && find $run_dir -type f ! -name '*.pt' ! -path '*/.snakemake/*') config/$PROFILE/params.yaml config/$PROFILE/dvc.yaml
  git commit -m "window: ..." -- $run_dir config/$PROFILE
MSG
