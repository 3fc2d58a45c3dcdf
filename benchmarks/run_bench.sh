#!/usr/bin/env bash
# The `moefuse bench` runs the README quotes, on one GPU (a few minutes in all): each writes its JSON (and PNGs)
# to benchmarks/results/, named after the GPU. Then the README's tables are made from them:
#   moefuse bench --report benchmarks/results/{block,op,model}_qwen3-30b-a3b_<gpu>.json --readme docs/benchmarks.md
# A run whose outputs disagree with Transformers' eager exits non-zero and is not quoted.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(''.join(c if c.isalnum() else '_' for c in torch.cuda.get_device_name()).strip('_'))")
out=benchmarks/results
bench() { PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" python -m moefuse.cli bench "$@"; }  # installed or not

# The MoE block (router + experts), forward and forward+backward, 4096 and 16384 tokens.
bench --level block --tokens 4096,16384 --output "$out/block_qwen3-30b-a3b_$gpu.json" --plots
# One grouped GEMM (gate_up and down projections) and its backward.
bench --level op --tokens 4096,16384 --output "$out/op_qwen3-30b-a3b_$gpu.json" --plots
# 4 decoder layers at full dims, one AdamW step: full fine-tune and LoRA r=16 on attention + experts; '+loss' and
# '+norm': moefuse's causal-LM loss and RMSNorm instead of Transformers' (what moefuse's model class and moefuse
# train use; on grouped_mm they show what those kernels alone give).
bench --level model --layers 4 --tokens 4096 --setups full,lora,qlora --lora-rank 16 \
    --implementations moefuse+loss+norm,moefuse+loss,moefuse,grouped_mm+loss+norm,grouped_mm+loss,grouped_mm,eager \
    --output "$out/model_qwen3-30b-a3b_$gpu.json" --plots
