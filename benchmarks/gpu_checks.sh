#!/usr/bin/env bash
# On a GPU machine, from the repository root, moefuse uninstalled (PYTHONPATH=src):
#   bash benchmarks/gpu_checks.sh tests OUT [TEST_PATH...]
#        the GPU-marked tests; their summary to OUT/gpu-tests-<commit>.txt (given paths, only those tests, to
#        OUT/gpu-tests-<commit>-part.txt: the header names them)
#   bash benchmarks/gpu_checks.sh block OUT N    N runs of the MoE block, eager and compiled, moefuse and grouped_mm
#   bash benchmarks/gpu_checks.sh families OUT N N runs of the MoE block of other families' published shapes
#        (gpt-oss-20b: clamped SwiGLU, biases, interleaved rows; mixtral-8x7b, olmoe-1b-7b; moonlight-16b-a3b:
#        DeepSeek-V3's routing and shared experts; qwen3.5-35b-a3b: a gated shared expert; gemma-4-26b-a4b: GeGLU
#        experts, router and experts on the decoder layer), moefuse and grouped_mm, eager
#   bash benchmarks/gpu_checks.sh model OUT N    N runs of a 4-layer LoRA step at 16384 tokens: moefuse with its loss and
#        norms, the same with its RoPE, and grouped_mm with the same loss and norms
#   bash benchmarks/gpu_checks.sh train48 OUT NAME [moefuse train keys...]
#        one 48-layer moefuse train run at Qwen3-30B-A3B dims (LoRA r16, packed 2048-token rows, checkpointing;
#        the keys given are added, e.g. --per_device_train_batch_size 4 --experts_implementation grouped_mm);
#        its summary kept as OUT/NAME_<commit>_run<n>.json
# Every file is OUT/<name>_<commit>_run<n>.json, n the first number not yet taken: runs are kept.
# A copy of the tree without .git names its commit by the stamp written here first:
#   python -m moefuse.bench.provenance   (then carry .moefuse-provenance.json with the tree)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
what=$1 out=$2
mkdir -p "$out"
commit=$(python -c "from moefuse.bench.provenance import commit_label, source_provenance as s; print(commit_label(s()))")
# In file names '-dirty', not '+dirty': the GPU machines' output folder hands back letters, digits, '_' and '-' only.
label=${commit:0:7}
if [[ $commit == *+dirty ]]; then label+=-dirty; fi

next_run() {  # OUT/$1_<commit>_run<n>.json, n the first number not yet taken
    local n=1
    while [[ -e "$out/${1}_${label}_run$n.json" ]]; do n=$((n + 1)); done
    echo "$out/${1}_${label}_run$n.json"
}

case "$what" in
tests)
    shift 2
    paths=("${@:-tests}")
    name=gpu-tests-$label
    if (($#)); then name+=-part; fi
    log="$out/$name.txt"
    command="python -m pytest -q -m gpu -n 8 --dist loadgroup -p no:cacheprovider ${paths[*]}"
    { echo "commit: $commit"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
      python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
      echo "command: $command"; } >"$log"
    # Each worker takes a slice of the card; the largest tests compare in chunks to fit beside the others, and
    # the cases at a real model's expert dims run on one worker, one after another (xdist_group "card-sized").
    # The summary's tail goes in the results file; the whole output (failures' tracebacks) beside it.
    $command >"$out/$name.log" 2>&1 || true
    tail -n 40 "$out/$name.log" | tee -a "$log"
    ;;
block)
    runs=${3:-3}
    for _ in $(seq "$runs"); do
        python -m moefuse.cli bench --level block --config qwen3-30b-a3b --tokens 4096,16384 --modes fwd+bwd \
            --implementations moefuse,grouped_mm,moefuse+compile,grouped_mm+compile --quiet \
            --output "$(next_run block_compile_qwen3-30b-a3b)"
    done
    ;;
families)
    runs=${3:-3}
    for _ in $(seq "$runs"); do
        for config in gpt-oss-20b mixtral-8x7b olmoe-1b-7b moonlight-16b-a3b qwen3.5-35b-a3b gemma-4-26b-a4b; do
            python -m moefuse.cli bench --level block --config "$config" --tokens 4096,16384 --modes fwd+bwd \
                --implementations moefuse,grouped_mm --quiet --output "$(next_run "block_$config")"
        done
    done
    ;;
model)
    runs=${3:-3}
    for _ in $(seq "$runs"); do
        python -m moefuse.cli bench --level model --config qwen3-30b-a3b --layers 4 --tokens 16384 --setups lora \
            --implementations moefuse+loss+norm,moefuse+loss+norm+rope,grouped_mm+loss+norm --quiet \
            --output "$(next_run model_lora_rope_qwen3-30b-a3b)"
    done
    ;;
train48)
    name=$3
    shift 3
    rows=/tmp/moefuse-rows.jsonl  # the built-in rows ten times over: packs into enough 2048-token sequences
    python -c "from moefuse.train.builtin import DATASET; open('$rows', 'w').write(DATASET.read_text() * 10)"
    work=$(mktemp -d)
    python -m moefuse.cli train --model_name_or_path config:qwen3-30b-a3b --dataset "$rows" --packing true \
        --max_length 2048 --per_device_train_batch_size 1 --lora_rank 16 --learning_rate 1e-4 \
        --gradient_checkpointing true --max_steps 12 --logging_steps 3 --gpu_busy_steps 2 --save_strategy no \
        --save_base_model false "$@" --output_dir "$work"
    cp "$work/moefuse_train_summary.json" "$(next_run "$name")"
    rm -rf "$work"
    ;;
*)
    echo "usage: $0 tests|block|families|model|train48 OUT [RUNS | NAME KEYS...]" >&2
    exit 2
    ;;
esac
