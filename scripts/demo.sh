#!/usr/bin/env bash
# The main job on the bundled real-protein default (data/demo_4k.fasta):
#   1. shard it (5% held out for validation),
#   2. train the debug ESM-2 for 250 steps on 2 processes (torchrun, gloo on CPU / NCCL on GPU),
#   3. evaluate the trained model: held-out perplexity against the unigram baseline, then the
#      paper's measurements on the bundled sets (data/eval: contacts, a DMS assay, a secondary-
#      structure probe, SCOP homology) and the emergence curve of contacts over its checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,s3,deepspeed,wandb,eval
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out=out/demo
rm -rf "$out"
esmdist shard data/demo_4k.fasta --out "$out/shards" --split valid=0.05 --shard-size 64KB \
    --workers 2
torchrun --standalone --nproc_per_node 2 launcher/pretrain.py --config configs/debug-cpu.toml
esmdist eval perplexity --model "$out/run/final" --shards "$out/shards" --crop-length 512 \
    | tee "$out/perplexity.txt"
esmdist eval perplexity --checkpoints "$out/run" --shards "$out/shards" --crop-length 512 \
    --out "$out/report" > "$out/perplexity_curve.txt"
esmdist eval contacts --checkpoints "$out/run" data/eval/structures/test \
    --fit data/eval/structures/fit --out "$out/report" > "$out/contacts_curve.txt"
esmdist eval report --model "$out/run/final" --shards "$out/shards" --crop-length 512 \
    --out "$out/report" 2> "$out/report.log" | tee "$out/report.txt"
echo "report: $out/report/report.md; over the checkpoints: $out/report/{perplexity,contacts}_curve.png"
