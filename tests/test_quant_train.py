"""moefuse train --finetuning_type qlora: the built-in tiny run with 4-bit experts and bitsandbytes linears."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

import moefuse.quant
from conftest import trained_precision
from moefuse.quant import ExpertWeights4bit
from moefuse.train import run_train

pytest.importorskip("bitsandbytes")


def test_qlora_run_trains_saves_and_reloads(tmp_path, capsys):
    import bitsandbytes as bnb

    out = tmp_path / "run"
    result = run_train(
        None,
        ["--finetuning_type", "qlora", "--max_steps", "4", "--logging_steps", "1", "--output_dir", str(out)],
    )
    layer = result.model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(layer.mlp.experts.get_base_layer().gate_up_proj, ExpertWeights4bit)
    assert len(result.losses) >= 1 and all(math.isfinite(loss) for loss in result.losses)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and result.per_expert_adapter is not None
    base = out / "base-model"  # the 4-bit random weights the adapter was trained on
    assert "moefuse_quantization" in json.loads((base / "config.json").read_text())
    printed = capsys.readouterr().out
    assert f'moefuse.quant.from_pretrained("{base}")' in printed and "4-bit random weights" in printed

    trained = result.model.eval()
    reloaded = PeftModel.from_pretrained(
        moefuse.quant.from_pretrained(base, device=trained.device), out / "adapter"
    )
    ids = torch.randint(0, 100, (1, 12), device=trained.device)
    with torch.no_grad(), trained_precision(trained):
        torch.testing.assert_close(reloaded(ids).logits.float(), trained(ids).logits.float(), rtol=0, atol=0)


def test_qlora_trains_with_every_memory_saver(tmp_path, capsys):
    """The savers qlora.py measured, as moefuse train keys, on the 4-bit tiny run: the loss still falls from the
    frozen model's (the first log: LoRA's B factors start at zero)."""
    result = run_train(
        None,
        ["--finetuning_type", "qlora", "--max_steps", "6", "--logging_steps", "1", "--max_samples", "48"]
        + ["--gradient_checkpointing", "true", "--optim", "paged_adamw_8bit", "--step_in_backward", "true"]
        + ["--offload_activations", "true", "--save_steps", "1000", "--output_dir", str(tmp_path)],
    )
    assert result.losses[-1] < result.losses[0] - 0.1, result.losses
    out = capsys.readouterr().out
    assert "paged_adamw_8bit: bitsandbytes' paged 8-bit AdamW; stepped in the backward" in out
    assert "gradient checkpointing, optimizer step in backward, activations offloaded to CPU" in out
