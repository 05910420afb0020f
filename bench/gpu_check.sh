#!/usr/bin/env bash
# Everything this project checks on a GPU, in one call of the lent device machine (torch,
# triton, pyarrow, transformers there, nothing from the network). Into $OUT (default
# out/gpu_check; a lent machine returns at most 8 files): summary.md and summary.json (every
# bench's result, bench/gpu_summary.py), steps.log (every step's output), the main job's
# metrics.jsonl.
#
#   bash bench/gpu_check.sh prepare        # here, with network: wheels into .whl/, the
#                                          # reference checkout into .gpu_ref/ (carry both)
#   bash bench/gpu_check.sh [sections]     # there, all sections by default
#
# Sections, run in this order of priority (a lent machine gives 15 minutes in all, one call at
# most 10), each step only while GPU_CHECK_BUDGET_S (default 540) has room for its estimate
# (the times of 2026-12-04 plus compilation; GPU_CHECK_SKIP="loop_650M hf …" skips steps an
# earlier call measured, so a second call picks up where the first stopped):
#   correctness  the fused paths, bf16 compute weights vs autocast, compiled vs eager with no
#                recompilation, the step without device reads (bench/gpu_check.py)
#   loop         the trainer loop as a user runs it: the shipped configs (configs/SIZE.toml:
#                micro-batch "auto", compiled, bf16 weights) through launcher/pretrain.py
#                (bench/loop_bench.py --shipped, MFU from metrics.jsonl): 650M twice (start-up
#                with a cold, then a warm compile cache), 3B, 35M and 150M against the step alone
#   curve        the main job's bf16 loss curve (35M, 300 steps) against .gpu_ref's — the code
#                before issue 16's speed changes — within the seed-to-seed spread
#   profile      where the compiled 650M step's GPU time goes, by kernel kind
#   ab           each change against its absence on the 650M shipped run: compile off; autocast
#                instead of bf16 weights
#   hf           esmdist vs Hugging Face EsmForMaskedLM at 650M, HF length-grouped and random,
#                each at its largest micro-batch that fits (bench/train_bench.py)
#   memory       peak memory per token at crop 1,024/2,048/4,096 (650M, compiled)
#   e2e          shard → train 35M → resume → under torchrun → perplexity
#   throughput   one step in three layouts: padded, packed per-sequence SDPA, packed varlen
set -uo pipefail
cd "$(dirname "$0")/.."
REF_COMMIT=b2d591c  # the last commit before issue 16's GPU-side speed changes (dd66f82 on)
if [[ ${1:-} == prepare ]]; then
    # What esmdist needs at training time that the image lacks (python-hostlist: an sdist,
    # built into a wheel here; it is pure Python).
    python3 -m pip wheel -q --no-deps -w .whl webdataset==1.0.2 braceexpand==0.1.7 \
        python-hostlist==2.3.0 || exit 1
    rm -rf .gpu_ref && mkdir .gpu_ref
    git archive "$REF_COMMIT" esmdist launcher configs | tar -x -C .gpu_ref || exit 1
    echo "prepared: carry [\".whl\", \".gpu_ref\"]"
    exit 0
fi
OUT="${OUT:-out/gpu_check}"
raw=/tmp/esmdist-gpu-results  # each bench's JSON; $OUT gets the few files a lent machine returns
rm -rf "$raw" && mkdir -p "$OUT" "$raw"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-540}))
status=0
logs=/tmp/esmdist-gpu-logs
mkdir -p "$logs"
skip() {  # name, why
    echo "=== $1 skipped: $2" | tee -a "$OUT/steps.log"
    printf '%s\tskipped\t0\n' "$1" >> "$raw/times.tsv"
}
step() {  # name, estimated seconds, command...: run within the budget, log, remember a failure
    local name=$1 estimate=$2; shift 2
    local left=$((deadline - SECONDS))
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        skip "$name" GPU_CHECK_SKIP; return
    fi
    if ((left < estimate)); then
        skip "$name" "$left s of the budget left, needs ~$estimate s"; return
    fi
    echo "=== $name: $*" | tee -a "$OUT/steps.log"
    local start=$SECONDS outcome=ok
    timeout --kill-after=10 "$left" "$@" > >(tee "$logs/$name.txt") 2>&1
    case $? in
        0) ;;
        124|137) outcome="out of budget"; status=1 ;;
        *) outcome=FAILED; status=1 ;;
    esac
    sleep 1
    cat "$logs/$name.txt" >> "$OUT/steps.log"
    echo "=== $name: $outcome, $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
    printf '%s\t%s\t%d\n' "$name" "$outcome" $((SECONDS - start)) >> "$raw/times.tsv"
}
sections=" ${*:-correctness loop curve profile ab hf memory e2e throughput} "
want() { [[ $sections == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$raw/gpu.txt"
: > "$raw/times.tsv"
: > "$OUT/steps.log"
# One compile cache for every step: the first 650M run starts cold, the second warm.
export TORCHINDUCTOR_CACHE_DIR=/tmp/esmdist-gpu-cache
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
shipped=(python3 bench/loop_bench.py --device cuda --shipped --workers 4 --log-every 1)
want correctness && step correctness 60 python3 bench/gpu_check.py correctness
want loop && step loop_650M 150 "${shipped[@]}" --model esm2_650M --steps 8 --rounds 2 \
    --json "$raw/loop_650M.json"
want loop && step loop_3B 140 "${shipped[@]}" --model esm2_3B --steps 5 --rounds 1 \
    --step-tokens 131072 --json "$raw/loop_3B.json"
if want curve && [[ -d .gpu_ref ]]; then
    step curve 160 python3 bench/loop_bench.py --device cuda --tokens 16384 --workers 4 \
        --rounds 1 --log-every 10 --model esm2_35M --steps 300 --compare .gpu_ref --loss-check \
        --set=--optim.lr=1e-3 --set=--optim.warmup_steps=50 --json "$raw/curve_35M.json"
elif want curve; then
    skip curve "no .gpu_ref (bash bench/gpu_check.sh prepare)"
fi
want loop && step loop_35M 70 "${shipped[@]}" --model esm2_35M --steps 30 --rounds 1 \
    --step-level --json "$raw/loop_35M.json"
want loop && step loop_150M 75 "${shipped[@]}" --model esm2_150M --steps 16 --rounds 1 \
    --step-level --json "$raw/loop_150M.json"
want profile && step profile 70 python3 bench/step_profile.py --model esm2_650M --device cuda \
    --tokens 32768 --json "$raw/profile_650M_compiled.json"
want ab && step ab_eager 80 "${shipped[@]}" --model esm2_650M --steps 6 --rounds 1 \
    --set=--train.compile=false --json "$raw/ab_650M_eager.json"
want ab && step ab_autocast 70 "${shipped[@]}" --model esm2_650M --steps 6 --rounds 1 \
    --set=--parallel.low_precision_weights=false --json "$raw/ab_650M_autocast.json"
want hf && step hf 120 python3 bench/train_bench.py --model esm2_650M --device cuda \
    --tokens 65536 --micro-tokens 32768 --rounds 2 --steps 3 --json "$raw/hf_650M.json"
want memory && step memory 90 python3 bench/train_bench.py --memory --model esm2_650M \
    --device cuda --tokens 16384 --json "$raw/memory_650M.json"
if want e2e; then
    work=/tmp/esmdist-gpu
    rm -rf "$work"
    run=(--config configs/debug-cpu.toml --model.size=esm2_35M --train.dtype=bf16
         --data.path="$work/shards" --data.num_workers=2 --data.max_tokens=16384
         --data.crop_length=1024 --train.tokens_per_step=16384 --optim.lr=1e-3
         --optim.warmup_steps=50 --train.valid_every=100 --train.log_every=50
         --checkpoint.every=100 --train.output_dir="$work/run")
    step shard 15 python3 -m esmdist.cli shard data/demo_4k.fasta --out "$work/shards" \
        --split valid=0.05 --shard-size 1MB --workers 4
    step train 60 python3 launcher/pretrain.py "${run[@]}" --parallel.backend=single \
        --train.max_steps=300
    step resume 45 python3 launcher/pretrain.py "${run[@]}" --parallel.backend=single \
        --train.max_steps=400
    grep -q "resumed from .*step_000000300 at step 300" "$logs/resume.txt" 2>/dev/null ||
        { echo "=== no resume at step 300" | tee -a "$OUT/steps.log"; status=1; }
    step torchrun 50 python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
        launcher/pretrain.py "${run[@]}" --parallel.backend=fsdp --train.max_steps=500
    grep -q "resumed from .*step_000000400 at step 400" "$logs/torchrun.txt" 2>/dev/null ||
        { echo "=== no resume under torchrun at step 400" | tee -a "$OUT/steps.log"; status=1; }
    step perplexity 20 python3 -m esmdist.cli eval perplexity --model "$work/run/final" \
        --shards "$work/shards"
    cp "$work/run/metrics.jsonl" "$OUT/" 2>/dev/null
    tail -n 5 "$logs/perplexity.txt" > "$raw/perplexity.txt" 2>/dev/null
fi
want throughput && step throughput 80 python3 bench/gpu_check.py throughput \
    --out "$raw/throughput.json"
python3 bench/gpu_summary.py "$raw" "$OUT" || status=1
echo "gpu_check: $([ $status = 0 ] && echo all passed || echo FAILURES)"
exit $status
