"""moefuse train --finetuning_type qlora: the built-in tiny run with 4-bit experts and bitsandbytes linears."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

import moefuse.quant
from conftest import current_orientation, trained_precision
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


@pytest.fixture(scope="module")
def qlora_on_dense(tmp_path_factory):
    """A dense random checkpoint (with its tokenizer) and a QLoRA adapter trained on its 4-bit copy."""
    tmp = tmp_path_factory.mktemp("qlora-on-dense")
    dense = run_train(None, ["--max_steps", "1", "--max_samples", "16", "--output_dir", str(tmp / "d")])
    base = dense.output_dir / "base-model"
    qlora = run_train(
        None,
        ["--finetuning_type", "qlora", "--model_name_or_path", str(base), "--max_steps", "4"]
        + ["--max_samples", "16", "--learning_rate", "0.01", "--output_dir", str(tmp / "q")],
    )
    return base, qlora.final_dir


def _adapted_logits(base, adapter, ids, **kwargs):
    from moefuse import Qwen3MoeFusedForCausalLM

    model = PeftModel.from_pretrained(
        Qwen3MoeFusedForCausalLM.from_pretrained(base, **kwargs), adapter
    ).eval()
    with torch.no_grad():
        return model, model(ids).logits


IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def test_qlora_adapter_merges_into_the_dense_model(qlora_on_dense, tmp_path):
    """The deployment path: the adapter QLoRA trained on a 4-bit copy goes onto the dense weights, merges into
    them and is saved as a plain checkpoint with the same outputs, as a bf16 LoRA adapter does."""
    from moefuse import Qwen3MoeFusedForCausalLM

    base, adapter = qlora_on_dense
    model, adapted = _adapted_logits(base, adapter, IDS)
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(IDS).logits, adapted)  # the adapter changes the dense model's outputs
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        reloaded = Qwen3MoeFusedForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits
    torch.testing.assert_close(reloaded, adapted, rtol=1e-5, atol=1e-5)


@current_orientation
def test_qlora_adapter_converts_like_lora(qlora_on_dense, tmp_path):
    """Converted to vLLM's 3-D format, the QLoRA adapter gives the same outputs on Transformers' own experts."""
    from moefuse.convert import convert_lora

    base, adapter = qlora_on_dense
    _, adapted = _adapted_logits(base, adapter, IDS)
    vllm = convert_lora(adapter, tmp_path / "vllm_3d", "vllm_3d", progress=False)
    _, converted = _adapted_logits(base, vllm, IDS, experts_implementation="grouped_mm")
    torch.testing.assert_close(converted, adapted, rtol=1e-5, atol=1e-5)
