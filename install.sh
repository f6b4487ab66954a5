#!/usr/bin/env bash
# Installs fedcore and its test tools into .venv (CPU-only torch, pinned).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,fabric,deploy,mlflow]" tox
# CrypTen (secure aggregation) cannot be an extra: it must be installed --no-deps.
.venv/bin/python -m pip install --quiet --no-deps -r requirements/crypten.txt
.venv/bin/python -m pip install --quiet onnx==1.18.0 omegaconf==2.4.0
echo "(pip's notes that crypten requires sklearn, torchvision, tensorboard or future are expected: the secure sum needs none of them)"
echo "fedcore installed in .venv ($(.venv/bin/fedcore --version))"
