#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) once the environment exists, inside it, from the
# workflow's directory: the repository root, whatever Snakemake did with the env file.
set -euo pipefail
test -f pyproject.toml && grep -q '^name = "phantom-grad-pipeline"' pyproject.toml \
    || { echo "post-deploy: run from the repository root (found $(pwd))" >&2; exit 1; }
pip install --no-deps -e "$(pwd)"
