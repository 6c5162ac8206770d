#!/usr/bin/env bash
# Creates .venv (once) and installs pytorch2jax into it, editable, with the worker, client,
# test and dev extras, every version pinned by constraints.txt. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e ".[server,client,test,dev]"
