#!/usr/bin/env bash
# Installs fedcore and its test tools into .venv (CPU-only torch, pinned).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]" tox
echo "fedcore installed in .venv ($(.venv/bin/fedcore --version))"
