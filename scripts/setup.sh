#!/usr/bin/env bash
# Creates .venv and installs esmdist with the extras given (default: dev,s3).
# torch goes in first, pinned to the local CPU wheel, so that no later requirement
# can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,s3}"
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[${extras}]"
