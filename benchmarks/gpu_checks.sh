#!/usr/bin/env bash
# On a GPU machine, from the repository root, moefuse uninstalled (PYTHONPATH=src):
#   bash benchmarks/gpu_checks.sh tests OUT      the GPU-marked tests; their summary to OUT/gpu-tests-<commit>.txt
#   bash benchmarks/gpu_checks.sh block OUT N    N runs of the MoE block, eager and compiled, moefuse and grouped_mm
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

case "$what" in
tests)
    log="$out/gpu-tests-$label.txt"
    { echo "commit: $commit"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
      python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
      echo "command: python -m pytest -q -m gpu -n 8 -p no:cacheprovider tests"; } >"$log"
    # Each worker takes a slice of the card; the largest tests compare in chunks to fit beside the others.
    # The summary's tail goes in the results file; the whole output (failures' tracebacks) beside it.
    python -m pytest -q -m gpu -n 8 -p no:cacheprovider tests >"$out/gpu-tests-$label.log" 2>&1 || true
    tail -n 40 "$out/gpu-tests-$label.log" | tee -a "$log"
    ;;
block)
    runs=${3:-3}
    for i in $(seq "$runs"); do
        python -m moefuse.cli bench --level block --config qwen3-30b-a3b --tokens 4096,16384 --modes fwd+bwd \
            --implementations moefuse,grouped_mm,moefuse+compile,grouped_mm+compile --quiet \
            --output "$out/block_compile_qwen3-30b-a3b_${label}_run$i.json"
    done
    ;;
*)
    echo "usage: $0 tests|block OUT [RUNS]" >&2
    exit 2
    ;;
esac
