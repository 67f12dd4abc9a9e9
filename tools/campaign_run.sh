#!/usr/bin/env bash
# Train runs of a campaign in a clone at the campaign's code, against the campaign's guide.
#
#   bash tools/campaign_run.sh CLONE COMMIT PROFILE [RUN ...]   (no RUN: the clone and its guide only)
#
# A campaign's seeds are trained at one commit (results/cpu/README.md, "Code: one commit's
# stages for every seed"), while main's code moves on. Its guide is pinned by the weights'
# sha256 in the committed results/<PROFILE>/vanilla/metrics.json; the weights themselves are
# a pipeline output (git-ignored, DVC's), not committed. This script:
#   1. clones this checkout into CLONE at COMMIT (branch campaign-<PROFILE>) unless CLONE
#      exists, and uses this checkout's .venv there;
#   2. builds the data stage; where this checkout holds the guide's weights, copies them in
#      and marks the vanilla stage up to date (`snakemake --touch`), else trains the vanilla
#      stage at COMMIT (bit for bit the pinned guide on the machine kind that made it, not on
#      every processor); either way it stops unless the weights' sha256 is the pinned one;
#   3. runs each RUN's chain (train, certify, pgd, similarity) in the order given, resuming a
#      training from its checkpoint (`--rerun-incomplete`); `controls` as a RUN makes Table 1's
#      control rows instead.
# Run it in the background with its output in a log, e.g.
#   (setsid nohup bash tools/campaign_run.sh ../campaign 9d9d3d3 cpu duet-s1 > ../campaign.log 2>&1 &)
# and bring each finished run back with tools/campaign_harvest.py.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,21p "$0"; exit 2; }
here="$(cd "$(dirname "$0")/.." && pwd)"
clone="$1" commit="$2" profile="$3"
shift 3
guide="results/$profile/vanilla"
[ -f "$here/$guide/metrics.json" ] || { echo "no committed guide metrics in $here/$guide" >&2; exit 2; }
want=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['weights_sha256'])" "$here/$guide/metrics.json")

venv="${CAMPAIGN_VENV:-$here/.venv}"   # none there: snakemake and python from PATH
if [ ! -d "$clone" ]; then
  git clone -q "$here" "$clone"
  git -C "$clone" checkout -q -b "campaign-$profile" "$commit"
  if [ -d "$venv" ]; then
    ln -s "$venv" "$clone/.venv"
    echo ".venv" >> "$clone/.git/info/exclude"
  fi
fi
cd "$clone"
[ "$(git rev-parse HEAD)" = "$(git rev-parse "$commit^{commit}")" ] || {
  echo "$clone is at $(git rev-parse --short HEAD), not $commit" >&2; exit 2; }
if [ -d .venv ]; then . .venv/bin/activate; fi
sm() { snakemake --cores 1 "$@" --config profile="$profile"; }
sm --unlock >/dev/null 2>&1 || true

echo "== $(date -u) data and the campaign's guide ($want)"
sm "results/$profile/data/cifar10.pt"
if [ -f "$here/$guide/model.pt" ]; then
  if ! cmp -s "$here/$guide/model.pt" "$guide/model.pt"; then
    mkdir -p "$guide"
    cp "$here/$guide/"{model.pt,metrics.json,history.csv} "$guide/"
  fi
  sm --touch "$guide/model.pt" "$guide/history.csv" "$guide/metrics.json"
else
  echo "no guide weights in $here/$guide: training the vanilla stage at $commit"
  sm "$guide/metrics.json"
fi
have=$(python -c "import json; print(json.load(open('$guide/metrics.json'))['weights_sha256'])")
[ "$have" = "$want" ] || { echo "GUIDE MISMATCH: $have, not $want" >&2; exit 1; }

for run in "$@"; do
  echo "== $(date -u) $run"
  if [ "$run" = controls ]; then
    targets=(results/"$profile"/similarity_control/{vanilla_control,random}/metrics.json)
  else
    targets=(results/"$profile"/{certify,pgd,similarity}/"$run"/metrics.json)
  fi
  if sm --rerun-incomplete "${targets[@]}"; then
    echo "== $(date -u) $run done"
  else
    echo "== $(date -u) $run FAILED (rc $?)"
  fi
done
echo "== $(date -u) all done"
