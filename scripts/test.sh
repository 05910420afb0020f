#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs lint, format check, the import layers, the size
# limits, the Dockerfiles' lint and the whole test suite (the Slurm tests start a two-node
# cluster on this machine when it is root; deselect them with: scripts/test.sh -m "not slurm").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,s3,deepspeed,wandb,eval
. .venv/bin/activate
ruff check .
ruff format --check .
lint-imports                      # the layers of pyproject.toml: imports flow down, no cycles
python scripts/check_structure.py # no module over 500 lines, no function over 80
hadolint Dockerfile docker/*.Dockerfile
# OMP threads fixed: results of the determinism tests must not depend on the machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# DeepSpeed builds its CPU communication op once (~100 s); keep it at a stable path.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/esmdist/torch_extensions}"
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
