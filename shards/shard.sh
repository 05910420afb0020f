#!/usr/bin/env bash
# Entry script of the sharding job: `shards/shard.sh INPUT... --out OUT [esmdist shard options]`.
# Uses the project's .venv (scripts/setup.sh) and every core but one unless --workers is given.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
case " $* " in *" --workers "*) exec "$repo/.venv/bin/esmdist" shard "$@" ;; esac
exec "$repo/.venv/bin/esmdist" shard --workers "$workers" "$@"
