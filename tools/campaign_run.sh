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
#   2. builds the data stage; where this checkout lacks the guide's weights, first trains the
#      vanilla stage in CLONE.guide, a clone at the commit the guide's metrics record (bit for
#      bit the pinned guide on the machine kind that made it, not on every processor), and
#      keeps the weights in this checkout; copies them into CLONE and marks the vanilla stage
#      up to date (`snakemake --touch`); stops unless the weights' sha256 is the pinned one;
#   3. runs each RUN's chain (train, certify, pgd, similarity) in the order given, resuming a
#      training from its checkpoint (`--rerun-incomplete`); `controls` as a RUN makes Table 1's
#      control rows instead.
# CAMPAIGN_JOBS=N (default 1) runs N jobs at once instead, all RUNs in one Snakemake invocation,
# the first RUN's chain first (`--prioritize`: give it the longest run). It needs
# N x run.cpu_threads of the clone's params <= the processor's cores. On two cores two runs at one
# thread each did 1.1 to 1.3 times the work of one run at two threads (`benchmark`, nothing else
# running, 2026-12-07: BCP 114 s an epoch alone at two threads, 166 and 178 s side by side at one;
# measured again, BCP 113 s against 205 and 200 s, Duet 138 s against 261 and 252 s), each run
# taking about twice as long: worth it only where the machine outlives the runs (a run unfinished
# when a session ends is lost with the machine). Two runs at two threads each fight for the cores
# (4.3 times slower each). A campaign branch may change params that decide no result
# (run.cpu_threads, seeds, committed_runs) in a commit of its own: Snakemake reruns jobs on
# changed inputs, code and mtimes here, not on changed params, so such a commit leaves finished
# stages (the guide above all) standing; a training's checkpoint still starts afresh where its
# method's params changed (its fingerprint).
# Run it in the background with its output in a log, e.g.
#   (setsid nohup bash tools/campaign_run.sh ../campaign 9d9d3d3 cpu duet-s1 > ../campaign.log 2>&1 &)
# and bring each finished run back with tools/campaign_harvest.py.
set -euo pipefail

# The whole script is one function, read before it runs: editing this file under a running
# campaign (hours long) cannot change what it does next.
main() {
  [ $# -ge 3 ] || { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2; }
  here="$(cd "$(dirname "$0")/.." && pwd)"
  clone="$1" commit="$2" profile="$3"
  shift 3
  guide="results/$profile/vanilla"
  [ -f "$here/$guide/metrics.json" ] || { echo "no committed guide metrics in $here/$guide" >&2; exit 2; }
  recorded() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }
  want=$(recorded "$here/$guide/metrics.json" weights_sha256)
  venv="${CAMPAIGN_VENV:-$here/.venv}"   # none there: snakemake and python from PATH
  jobs="${CAMPAIGN_JOBS:-1}"

  checkout() {   # a clone of this checkout at a commit, with its .venv
    if [ ! -d "$1" ]; then
      git clone -q "$here" "$1"
      git -C "$1" checkout -q -b "$3" "$2"
      if [ -d "$venv" ]; then
        ln -s "$venv" "$1/.venv"
        echo ".venv" >> "$1/.git/info/exclude"
      fi
    fi
    [ "$(git -C "$1" rev-parse HEAD)" = "$(git -C "$1" rev-parse "$2^{commit}")" ] || {
      echo "$1 is at $(git -C "$1" rev-parse --short HEAD), not $2" >&2; exit 2; }
  }
  sm() { snakemake --rerun-triggers mtime input code --cores "$jobs" "$@" --config profile="$profile"; }
  if [ -d "$venv" ]; then . "$venv/bin/activate"; fi

  if [ ! -f "$here/$guide/model.pt" ]; then
    made=$(recorded "$here/$guide/metrics.json" git_commit)
    case "$made" in *+dirty) echo "the guide was made from uncommitted code ($made): no commit rebuilds it" >&2; exit 2;; esac
    echo "== $(date -u) no guide weights in $here/$guide: training the vanilla stage at $made in $clone.guide"
    checkout "$clone.guide" "$made" "guide-$profile"
    (cd "$clone.guide" && { sm --unlock >/dev/null 2>&1 || true; } && sm "$guide/metrics.json")
    have=$(recorded "$clone.guide/$guide/metrics.json" weights_sha256)
    [ "$have" = "$want" ] || { echo "GUIDE MISMATCH: $have, not $want" >&2; exit 1; }
    cp "$clone.guide/$guide/model.pt" "$here/$guide/model.pt"
  fi

  checkout "$clone" "$commit" "campaign-$profile"
  cd "$clone"
  threads=$(python -c "from pipeline_src.config import load_params; print(load_params('$profile')['run']['cpu_threads'])")
  [ $((jobs * threads)) -le "$(nproc)" ] || {
    echo "CAMPAIGN_JOBS=$jobs x run.cpu_threads $threads of config/$profile/params.yaml > $(nproc) cores" >&2; exit 2; }
  sm --unlock >/dev/null 2>&1 || true

  echo "== $(date -u) data and the campaign's guide ($want)"
  sm "results/$profile/data/cifar10.pt"
  if ! cmp -s "$here/$guide/model.pt" "$guide/model.pt"; then
    mkdir -p "$guide"
    cp "$here/$guide/"{model.pt,metrics.json,history.csv} "$guide/"
  fi
  sm --touch "$guide/model.pt" "$guide/history.csv" "$guide/metrics.json"
  have=$(recorded "$guide/metrics.json" weights_sha256)
  [ "$have" = "$want" ] || { echo "GUIDE MISMATCH: $have, not $want" >&2; exit 1; }

  chain() {   # the targets of one RUN
    if [ "$1" = controls ]; then
      echo results/"$profile"/similarity_control/{vanilla_control,random}/metrics.json
    else
      echo results/"$profile"/{certify,pgd,similarity}/"$1"/metrics.json
    fi
  }
  if [ "$jobs" -gt 1 ] && [ $# -gt 0 ]; then
    echo "== $(date -u) $* ($jobs at once, $1 first)"
    all=(); for run in "$@"; do read -ra t <<< "$(chain "$run")"; all+=("${t[@]}"); done
    read -ra first <<< "$(chain "$1")"
    if sm --rerun-incomplete --keep-going "${all[@]}" --prioritize "${first[@]}"; then
      echo "== $(date -u) $* done"
    else
      echo "== $(date -u) some of $* FAILED (rc $?): see above"
    fi
    set --
  fi
  for run in "$@"; do
    echo "== $(date -u) $run"
    read -ra targets <<< "$(chain "$run")"
    if sm --rerun-incomplete "${targets[@]}"; then
      echo "== $(date -u) $run done"
    else
      echo "== $(date -u) $run FAILED (rc $?)"
    fi
  done
  echo "== $(date -u) all done"
}
main "$@"
exit
