#!/usr/bin/env bash
# The main job on the bundled real-protein default (data/demo_4k.fasta): set up .venv, shard the
# FASTA (5% held out for validation), then evaluate the held-out masked-LM perplexity and
# per-sequence pseudo-perplexity against the unigram baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,s3
. .venv/bin/activate
out="${ESMDIST_DEMO_OUT:-out/demo}"
rm -rf "$out"
mkdir -p "$out"
esmdist shard data/demo_4k.fasta --out "$out/shards" --split valid=0.05 --shard-size 64KB \
    --workers 2
esmdist eval perplexity --model debug --shards "$out/shards" | tee "$out/perplexity.txt"
esmdist eval pppl --model debug --fasta data/demo_4k.fasta --limit 4 | tee "$out/pppl.txt"
