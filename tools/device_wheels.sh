#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks (Snakemake and its dependencies,
# jsonschema, torchattacks; pinned in tools/device_wheels.txt) for its Python 3.12 on
# x86_64, into device_carry/wheels/ (git-ignored: never commit wheels). The window
# command installs them there offline (tools/device_install.sh).
#
#   bash tools/device_wheels.sh            # device_carry/wheels/      (cp312, manylinux x86_64)
#   LOCAL=1 bash tools/device_wheels.sh    # also device_carry/wheels-local/: the same pins plus
#                                          # tools/device_present.txt for THIS machine's Python,
#                                          # for a venv that stands in for the GPU machine
#
# Needs pip and PyPI; no other registry.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-device_carry/wheels}
PY=${PY:-python3}
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# Package by package: the few published as source only (connection-pool) are pure Python,
# built into a py3-none-any wheel here.
fetch() {  # fetch DEST PIP-DOWNLOAD-ARGS... < pins
  local dest=$1; shift
  grep -v '^#' | while read -r pin; do
    [ -n "$pin" ] || continue
    "$PY" -m pip download -q --no-deps --only-binary=:all: "$@" -d "$dest" "$pin" 2>/dev/null ||
      "$PY" -m pip wheel -q --no-deps -w "$dest" "$pin" ||
      { echo "device_wheels: no wheel for $pin" >&2; exit 1; }
  done
}
fetch "$DEST" --python-version 3.12 --implementation cp "${platforms[@]}" < tools/device_wheels.txt
# One version of each: two stop the whole install there.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[ -z "$dupes" ] || { echo "device_wheels: several versions of: $dupes (empty $DEST and rerun)" >&2; exit 1; }
echo "device_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
if [ "${LOCAL:-0}" = 1 ]; then
  LOCAL_DEST=${LOCAL_DEST:-device_carry/wheels-local}
  mkdir -p "$LOCAL_DEST"
  cat tools/device_wheels.txt tools/device_present.txt | fetch "$LOCAL_DEST"
  echo "device_wheels: $(ls "$LOCAL_DEST"/*.whl | wc -l) wheels for $("$PY" -V) in $LOCAL_DEST"
fi
