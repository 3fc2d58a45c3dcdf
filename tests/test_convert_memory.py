"""Streaming conversion: a 2 GB checkpoint converts with peak RSS under one layer's experts above the baseline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

LAYERS, EXPERTS, HIDDEN, INTER, VOCAB = 11, 64, 1024, 512, 4096
LAYER_EXPERT_BYTES = EXPERTS * 3 * INTER * HIDDEN * 2  # bf16: 192 MiB per layer, 2.2 GB in all

# Runs in a fresh interpreter: RSS is measured from after the imports (their memory is no conversion's), the
# peak (VmHWM) reset to it through /proc/self/clear_refs.
_CONVERT = """
import json, sys, time
from pathlib import Path
import moefuse

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

Path("/proc/self/clear_refs").write_text("5")
before, start = status("VmRSS:"), time.perf_counter()
moefuse.convert_model(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, max_shard_size="1GB")
print(json.dumps({"before": before, "peak": status("VmHWM:"), "seconds": time.perf_counter() - start}))
"""


def _write_synthetic_checkpoint(path: Path) -> None:
    """A Qwen3-MoE-shaped checkpoint in the per-expert Hub layout, one shard per layer, bf16."""
    path.mkdir()
    config = dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        num_experts=EXPERTS,
        vocab_size=VOCAB,
    )
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    # One random layer of experts, marked per layer so that every layer differs (random bytes cost time).
    experts = torch.randn(EXPERTS, 3, INTER, HIDDEN, generator=g, dtype=torch.bfloat16)
    weight_map = {}
    for layer in range(LAYERS):
        experts[0, 0, 0, 0] = layer
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.mlp.experts.{e}.{proj}_proj.weight": experts[e, i]
            if proj != "down"
            else experts[e, i].view(HIDDEN, INTER)
            for e in range(EXPERTS)
            for i, proj in enumerate(("gate", "up", "down"))
        }
        tensors[f"{p}.mlp.gate.weight"] = torch.randn(EXPERTS, HIDDEN, generator=g).to(torch.bfloat16)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        if layer == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN, generator=g).to(torch.bfloat16)
        shard = f"model-{layer + 1:05d}-of-{LAYERS:05d}.safetensors"
        save_file(tensors, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def big_dir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path)  # 4.4 GB: not kept among pytest's last runs


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_peak_memory_does_not_grow_with_the_model(big_dir):
    source, target = big_dir / "hub", big_dir / "fused"
    _write_synthetic_checkpoint(source)
    size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    assert size > 2e9

    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(source), str(target), "transformers"],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    extra = measured["peak"] - measured["before"]
    print(
        f"converted {size / 2**30:.2f} GiB in {measured['seconds']:.1f} s ({time.perf_counter() - start:.1f} s with imports); "
        "peak RSS "
        f"{extra / 2**20:.0f} MiB above the interpreter's {measured['before'] / 2**20:.0f} MiB "
        f"(one layer's experts: {LAYER_EXPERT_BYTES / 2**20:.0f} MiB)"
    )
    # The whole model is 11 layers; the conversion may hold less than one layer's experts at a time.
    assert extra < LAYER_EXPERT_BYTES

    out_size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    assert abs(out_size - size) < 2**20  # the same bytes, regrouped (headers differ)
    with safe_open(_shard_of(target, "model.layers.10.mlp.experts.gate_up_proj"), "pt") as f:
        gate_up = f.get_slice("model.layers.10.mlp.experts.gate_up_proj")[5:6]
    with safe_open(source / f"model-00011-of-{LAYERS:05d}.safetensors", "pt") as f:
        gate = f.get_tensor("model.layers.10.mlp.experts.5.gate_proj.weight")
        up = f.get_tensor("model.layers.10.mlp.experts.5.up_proj.weight")
    assert torch.equal(gate_up[0], torch.cat([gate, up]))


def _shard_of(path: Path, name: str) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
