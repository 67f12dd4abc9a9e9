#!/usr/bin/env bash
# Run by `snakemake --use-conda` in the new environment after pipeline.yaml is
# installed: requirements-nodeps.txt's packages, without their dependencies.
set -euo pipefail
pip install --no-deps torchattacks==3.5.1
