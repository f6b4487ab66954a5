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
# libxsmm's small-matrix kernels for the native training step (Debian's libxsmm-dev: a header
# and a static library; rounds ~1.2x faster than on MKL's BLAS, docs/speed.md). Installed where
# this user may install packages, else unpacked into fedcore's cache without root; where
# neither works the step's matrix products are MKL's.
if [ ! -f /usr/include/libxsmm.h ] && command -v apt-get >/dev/null 2>&1; then
    cache="${FEDCORE_CACHE:-$HOME/.cache/fedcore}/libxsmm"
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -qq libxsmm-dev >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libxsmm-dev >/dev/null 2>&1; } \
            || echo "(libxsmm-dev could not be installed: the native step uses MKL's matrix products)"
    elif [ ! -f "$cache/usr/include/libxsmm.h" ]; then
        unpack=$(mktemp -d)
        if (cd "$unpack" && apt-get download -qq libxsmm-dev >/dev/null 2>&1 && dpkg -x libxsmm-dev_*.deb root); then
            mkdir -p "$(dirname "$cache")" && rm -rf "$cache" && mv "$unpack/root" "$cache"
        else
            echo "(libxsmm-dev could not be downloaded: the native step uses MKL's matrix products)"
        fi
        rm -rf "$unpack"
    fi
fi
echo "fedcore installed in .venv ($(.venv/bin/fedcore --version))"
