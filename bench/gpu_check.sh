#!/usr/bin/env bash
# Everything this project checks on a GPU, in one call of the lent device machine (which has
# torch, triton, pyarrow but nothing from the network; webdataset/braceexpand travel as wheels
# in .whl/, see docs/PERFORMANCE.md). Results go to $OUT (default out/gpu_check):
#   1. correctness of the fused paths (bench/gpu_check.py correctness),
#   2. training-step throughput: padded vs packed per-sequence SDPA vs packed-varlen
#      (… throughput); esmdist vs Hugging Face EsmForMaskedLM for 650M, and peak memory per
#      token at crop 1,024/2,048/4,096 (bench/train_bench.py: the "hf" section),
#   3. the trainer loop as a user runs it (bench/loop_bench.py): 35M and 150M against the step
#      alone, 650M (plain and compiled) and 3B (every block recomputed, and every other one:
#      89 GB on paper at 16k tokens) for their MFU,
#   4. the main job on one GPU: shard the bundled proteins → train esm2_35M in bf16 with
#      checkpoints → resume from the checkpoint → evaluate held-out perplexity; then FSDP2
#      under torchrun resuming the same run; torch.compile'd blocks on the varlen path.
# Arguments pick sections (default: all): correctness throughput hf loop e2e. All of them take
# more than one call's 10 minutes: run `correctness loop` in one call, `throughput hf e2e` in
# the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
logs=/tmp/esmdist-gpu-logs
mkdir -p "$logs"
step() {  # name, command...: run, log to $logs/name.txt and $OUT/steps.log, remember a failure
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$OUT/steps.log"
    local start=$SECONDS
    if ! "$@" > >(tee "$logs/$name.txt") 2>&1; then echo "=== $name FAILED"; status=1; fi
    sleep 1
    cat "$logs/$name.txt" >> "$OUT/steps.log"
    echo "=== $name took $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
}
sections=" ${*:-correctness throughput hf loop e2e} "
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [[ $sections == *" correctness "* ]]; then
    step correctness python3 bench/gpu_check.py correctness
fi
if [[ $sections == *" throughput "* ]]; then
    step throughput python3 bench/gpu_check.py throughput --out "$OUT/throughput.json"
fi
if [[ $sections == *" hf "* ]]; then
    step hf python3 bench/train_bench.py --model esm2_650M --device cuda --tokens 16384 \
        --rounds 3 --steps 3 --json "$OUT/hf_650M.json"
    step memory python3 bench/train_bench.py --memory --model esm2_650M --device cuda \
        --tokens 16384 --json "$OUT/memory_650M.json"
fi
if [[ $sections == *" loop "* ]]; then
    loop=(python3 bench/loop_bench.py --device cuda --tokens 16384 --workers 4 --rounds 1
          --log-every 10)
    for size in esm2_35M esm2_150M; do
        step "loop_$size" "${loop[@]}" --model "$size" --steps 60 --step-level \
            --json "$OUT/loop_$size.json"
    done
    step loop_650M "${loop[@]}" --model esm2_650M --steps 40 --step-level \
        --json "$OUT/loop_650M.json"
    step loop_650M_compiled "${loop[@]}" --model esm2_650M --steps 40 --compile \
        --json "$OUT/loop_650M_compiled.json"
    step loop_3B "${loop[@]}" --model esm2_3B --steps 30 --activation-checkpointing \
        --json "$OUT/loop_3B.json"
    step loop_3B_every2 "${loop[@]}" --model esm2_3B --steps 30 --activation-checkpointing \
        --set=--train.recompute_every=2 --json "$OUT/loop_3B_every2.json"
fi
if [[ $sections != *" e2e "* ]]; then exit $status; fi

work=/tmp/esmdist-gpu
rm -rf "$work"
run=(--config configs/debug-cpu.toml --model.size=esm2_35M --train.dtype=bf16
     --data.path="$work/shards" --data.num_workers=2 --data.max_tokens=16384
     --data.crop_length=1024 --train.tokens_per_step=16384 --optim.lr=1e-3
     --optim.warmup_steps=50 --train.valid_every=100 --train.log_every=50
     --checkpoint.every=100 --train.output_dir="$work/run")
step shard python3 -m esmdist.cli shard data/demo_4k.fasta --out "$work/shards" \
    --split valid=0.05 --shard-size 1MB --workers 4
step train python3 launcher/pretrain.py "${run[@]}" --parallel.backend=single \
    --train.max_steps=300
step resume python3 launcher/pretrain.py "${run[@]}" --parallel.backend=single \
    --train.max_steps=400
grep -q "resumed from .*step_000000300 at step 300" "$logs/resume.txt" || { echo "no resume"; status=1; }
step fsdp python3 -m torch.distributed.run --standalone --nproc_per_node 1 launcher/pretrain.py "${run[@]}" \
    --parallel.backend=fsdp --train.max_steps=500
grep -q "resumed from .*step_000000400 at step 400" "$logs/fsdp.txt" || { echo "no fsdp resume"; status=1; }
step perplexity python3 -m esmdist.cli eval perplexity --model "$work/run/final" \
    --shards "$work/shards"
step compile python3 launcher/pretrain.py "${run[@]}" --parallel.backend=single \
    --train.compile=true --train.max_steps=60 --train.output_dir="$work/compiled"
cp "$work/run/metrics.jsonl" "$OUT/" 2>/dev/null
echo "gpu_check: $([ $status = 0 ] && echo all passed || echo FAILURES)"
exit $status
