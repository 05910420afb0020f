#!/usr/bin/env bash
# The main job on the bundled real-protein default (data/demo_4k.fasta):
# set up .venv, then evaluate per-sequence pseudo-perplexity against the unigram baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,s3
. .venv/bin/activate
out="${ESMDIST_DEMO_OUT:-out/demo}"
mkdir -p "$out"
esmdist eval pppl --model debug --fasta data/demo_4k.fasta --limit 8 | tee "$out/pppl.txt"
