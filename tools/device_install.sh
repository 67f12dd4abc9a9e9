#!/usr/bin/env bash
# Install the carried wheels (tools/device_wheels.sh) on the lent GPU machine, offline,
# into /tmp/site, and put them on PYTHONPATH and PATH. Source it, so the exports stay:
#
#   . tools/device_install.sh [WHEELS_DIR]     # default device_carry/wheels
#
# Snakemake's jobs inherit PYTHONPATH, so `python -m pipeline_src ...` finds jsonschema and
# torchattacks too. A machine whose `python` is missing gets a `python` -> python3 link.
WHEELS=${1:-${WHEELS:-device_carry/wheels}}
SITE=${SITE:-/tmp/site}
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "device_install: no wheels in $WHEELS (run tools/device_wheels.sh here and carry device_carry)" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "$WHEELS"/*.whl || { return 1 2>/dev/null || exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
if ! command -v python >/dev/null 2>&1; then
  mkdir -p /tmp/pybin && ln -sf "$(command -v python3)" /tmp/pybin/python && export PATH="/tmp/pybin:$PATH"
fi
echo "device_install: $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE; snakemake $(snakemake --version)"
