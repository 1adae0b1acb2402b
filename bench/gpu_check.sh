#!/usr/bin/env bash
# The GPU check (issue 23), on a bare CUDA machine, in under 8 minutes:
#   1. the user path on CUDA: build the tiny base, train the demo recipe (bf16), generate,
#      merge, QLoRA train + generate, estimate, dry run; each prints "<step>: ok" or fails;
#   2. bench/bench_gpu.py: Llama-3-8B shape at seq 4096 (every variant, each in its own
#      process), then 8B and 1B at seq 512 (source and defaults), steady-state steps only;
#      one table, written between the markers of docs/benchmarks.md with card and versions.
# Variants that would start after the deadline are listed as "out of time", not dropped.
#
#   bench/gpu_check.sh                     (or: make gpu-check)
#   GPU_CHECK_TOY=1 bench/gpu_check.sh     (CPU, toy sizes: proves the script runs; a test does this)
#
# Environment: PY (the python with lora's dependencies; default .venv/bin/python, else python3),
# GPU_CHECK_WORK (scratch folder), GPU_CHECK_TINY (a tiny base already built), GPU_CHECK_DOC (the markdown to write the table into;
# default docs/benchmarks.md, or $GPU_CHECK_WORK/benchmarks.md with GPU_CHECK_TOY=1),
# GPU_CHECK_SECONDS (deadline for starting a bench variant, default 420).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WORK=${GPU_CHECK_WORK:-/tmp/lora-gpu-check}
TOY=${GPU_CHECK_TOY:-0}
# toy figures never land in docs/benchmarks.md
if [ "$TOY" = 1 ]; then DOC=${GPU_CHECK_DOC:-$WORK/benchmarks.md}; else DOC=${GPU_CHECK_DOC:-docs/benchmarks.md}; fi
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-420} ))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# lora itself from this checkout, whatever the python (no install needed, nothing fetched)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK"

lora() { "$PY" -c 'import sys; from lora_cli.cli import main; sys.argv[0] = "lora"; sys.exit(main())' "$@"; }
step() { echo "$1: ok"; }

# one torch start-up for both: 1 or 0 (a CUDA GPU or not), then the device's name
DEVICE=$("$PY" -c 'import torch; c = torch.cuda.is_available(); print(int(c), torch.cuda.get_device_name() if c else "no CUDA GPU")')
CUDA=${DEVICE%% *}
echo "== ${DEVICE#* }; python $PY"

# --------------------------------------------------------------------------- 1. the user path
TINY=${GPU_CHECK_TINY:-$WORK/tiny-llama}  # GPU_CHECK_TINY: a tiny base already built (the test's)
[ -f "$TINY/config.json" ] || lora build-tiny --out "$TINY" --data data/demo.jsonl > "$WORK/build-tiny.log"
SHORT=()
if [ "$TOY" = 1 ]; then SHORT=(--set train.max_steps=4); fi
COMMON=(--set "model.name_or_path=$TINY" --set "data.path=$PWD/data/demo.jsonl" --set "data.cache_dir=$WORK/cache")

lora train recipes/demo.yaml "${COMMON[@]}" --set "output_dir=$WORK/runs/demo" "${SHORT[@]}" --overwrite \
    | tee "$WORK/train.log" | grep -E "^(base|batches)"
step train
lora generate --adapter "$WORK/runs/demo" "用一句话解释什么是LoRA" --max-new-tokens 32 > "$WORK/generate.log"
step generate
lora merge --adapter "$WORK/runs/demo" --out "$WORK/merged" --force > "$WORK/merge.log"
step merge
if [ "$CUDA" = 1 ]; then
    lora train recipes/demo.yaml "${COMMON[@]}" --set "output_dir=$WORK/runs/qlora" --set model.quantization=4bit \
        "${SHORT[@]}" --overwrite | tee "$WORK/qlora.log" | grep -E "^(base|batches)"
    lora generate --adapter "$WORK/runs/qlora" "用一句话解释什么是LoRA" --max-new-tokens 32 > "$WORK/qlora-generate.log"
    step qlora
else
    echo "qlora: skipped (no CUDA GPU: bitsandbytes' 4-bit training is checked on CUDA)"
fi
lora estimate recipes/demo.yaml "${COMMON[@]}" > "$WORK/estimate.log"
step estimate
lora train recipes/demo.yaml "${COMMON[@]}" --set "output_dir=$WORK/runs/dry" --dry-run > "$WORK/dry-run.log"
step "dry run"

# --------------------------------------------------------------------------- 2. the bench table
BENCH=(--work "$WORK/bench" --deadline "$DEADLINE")
if [ "$TOY" = 1 ]; then
    # bench_gpu's own quick run (toy shape, seq 32, 3 steps; qlora and liger too: on a CPU their
    # skip reasons show in the table), which tests/bench/test_bench.py checks through this script
    "$PY" bench/bench_gpu.py "${BENCH[@]}" --quick --out "$WORK/out-toy"
    "$PY" bench/bench_gpu.py --merge "$WORK/out-toy" --out "$WORK/out" --doc "$DOC" > /dev/null
else
    "$PY" bench/bench_gpu.py "${BENCH[@]}" --shapes llama3-8b:4096 --steps 5 --warmup-steps 2 --out "$WORK/out-4096"
    "$PY" bench/bench_gpu.py "${BENCH[@]}" --shapes llama3-8b:512,llama-1b:512 --steps 8 --warmup-steps 3 \
        --variants source,defaults --out "$WORK/out-512"
    "$PY" bench/bench_gpu.py --merge "$WORK/out-4096" "$WORK/out-512" --out "$WORK/out" --doc "$DOC" > /dev/null
fi
echo "table written into $DOC (and $WORK/out/bench_gpu.md)"
