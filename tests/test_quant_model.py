"""4-bit experts in a model (QLoRA): quantize in place, LoRA through PEFT on top, checkpointing, saving and reloading.

References are the same model with dense experts holding the dequantised 4-bit values, so every difference is
the 4-bit path's own.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import moefuse.lora
from conftest import randomize_, tiny_config
from moefuse.ops.backend import use_backend
from moefuse.quant import ExpertWeights4bit, from_pretrained, quantize_experts, save_pretrained
from moefuse.quant.model import experts_modules

pytest.importorskip("bitsandbytes")
NF4 = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)


def _model(dtype: torch.dtype = torch.float32, seed: int = 0):
    config = tiny_config("qwen3_moe", num_experts=8, top_k=2)
    config._experts_implementation = "moefuse"
    return randomize_(AutoModelForCausalLM.from_config(config), seed=seed).to(dtype)


def _dense_twin(model) -> torch.nn.Module:
    """A copy of ``model`` (4-bit experts) whose experts are dense, holding the dequantised values."""
    twin = copy.deepcopy(model)
    for _, experts in experts_modules(twin):
        for name in ("gate_up_proj", "down_proj"):
            setattr(
                experts, name, torch.nn.Parameter(getattr(experts, name).dequantize(), requires_grad=False)
            )
    return twin


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_quantize_experts_in_place():
    model = _model()
    dense = {key: experts.gate_up_proj.detach().clone() for key, experts in experts_modules(model)}
    quantize_experts(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"))
    for key, experts in experts_modules(model):
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name)
            assert isinstance(weight, ExpertWeights4bit) and not weight.requires_grad
            assert weight.quant_type == "fp4" and not weight.nested  # bnb_4bit_use_double_quant=False
        assert torch.equal(
            experts.gate_up_proj.packed, ExpertWeights4bit.quantize(dense[key], "fp4", 64, False).packed
        )
    assert model.config.moefuse_quantization == {
        "experts": "bitsandbytes-4bit",
        "quant_type": "fp4",
        "blocksize": 64,
        "compress_statistics": False,
    }
    ids = _tokens()
    with torch.no_grad():
        logits = model(ids).logits
        reference = _dense_twin(model)
        reference.set_experts_implementation("eager")  # Transformers' own loop on the dequantised weights
        torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_quantize_experts_refusals():
    model = _model()
    model.set_experts_implementation("grouped_mm")
    with pytest.raises(ValueError, match="experts_implementation='moefuse'"):
        quantize_experts(model)
    with pytest.raises(ValueError, match="load_in_4bit"):
        quantize_experts(_model(), BitsAndBytesConfig(load_in_8bit=True))
    skipped = quantize_experts(
        _model(), BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["layers.1."])
    )
    kinds = [type(experts.down_proj) for _, experts in experts_modules(skipped)]
    assert kinds == [ExpertWeights4bit, torch.nn.Parameter]
    with pytest.raises(ValueError, match="no 4-bit experts"):
        save_pretrained(_model(), "unused")


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_qlora_forward_backward_matches_dequantised_reference(backend):
    """LoRA (PEFT, attention + experts) on 4-bit experts: loss and every adapter gradient equal those of the same
    adapters on dense experts holding the dequantised weights; the 4-bit weights stay frozen."""
    model = quantize_experts(_model())
    reference = _dense_twin(model)
    torch.manual_seed(0)
    peft_model = moefuse.lora.get_peft_model(model, r=4, init_lora_weights=False)
    torch.manual_seed(0)
    peft_reference = moefuse.lora.get_peft_model(reference, r=4, init_lora_weights=False)
    ids = _tokens()
    with use_backend(backend):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
    loss_ref = peft_reference(ids, labels=ids).loss
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    grads, grads_ref = _lora_grads(peft_model), _lora_grads(peft_reference)
    assert grads.keys() == grads_ref.keys() and any("experts.gate_proj" in k for k in grads)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[key], rtol=1e-4, atol=1e-6, msg=key)
    assert all(
        isinstance(experts.gate_up_proj, ExpertWeights4bit) for _, experts in experts_modules(peft_model)
    )


def test_qlora_gradient_checkpointing():
    model = quantize_experts(_model())
    torch.manual_seed(0)
    peft_model = moefuse.lora.get_peft_model(model, r=4, init_lora_weights=False)
    ids = _tokens()
    peft_model(ids, labels=ids).loss.backward()
    plain = {k: g.clone() for k, g in _lora_grads(peft_model).items()}
    peft_model.zero_grad()
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.enable_input_require_grads()
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    for key, grad in _lora_grads(peft_model).items():
        torch.testing.assert_close(grad, plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_adapter_saves_alone_and_reloads_onto_a_4bit_base(tmp_path):
    peft_model = moefuse.lora.get_peft_model(quantize_experts(_model()), r=4, init_lora_weights=False)
    ids = _tokens()
    with torch.no_grad():
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # the adapter alone
    reloaded = PeftModel.from_pretrained(quantize_experts(_model()), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def _checkpoint(tmp_path):
    path = tmp_path / "bf16"
    _model(torch.bfloat16).save_pretrained(path)
    return path


def test_from_pretrained_with_bitsandbytes_then_save_and_reload(tmp_path):
    model = from_pretrained(_checkpoint(tmp_path), NF4, device="cpu", dtype=torch.bfloat16)
    import bitsandbytes as bnb

    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)  # bitsandbytes for the linear layers
    # Its portable CPU path: the AVX512-BF16 one repacks narrow layers wrongly and fetches a Hub kernel.
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    assert isinstance(layer.mlp.experts.gate_up_proj, ExpertWeights4bit)  # moefuse for the experts
    assert layer.mlp.experts.gate_up_proj.nested and layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ids = _tokens()
    with torch.no_grad():
        logits = model(ids).logits

    out = tmp_path / "4bit"
    save_pretrained(model, out, max_shard_size="20KB")  # several shards and an index
    config = json.loads((out / "config.json").read_text())
    assert (
        config["moefuse_quantization"]["quant_type"] == "nf4"
        and config["quantization_config"]["load_in_4bit"]
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj.quant_state.moefuse__nf4" in index
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in index
    assert len(set(index.values())) > 1

    reloaded = from_pretrained(out, device="cpu")
    experts = reloaded.model.layers[0].mlp.experts
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert torch.equal(experts.gate_up_proj.packed, layer.mlp.experts.gate_up_proj.packed)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    # The reloaded model trains LoRA like the first.
    peft_model = moefuse.lora.get_peft_model(reloaded, r=4)
    peft_model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_from_config_builds_random_4bit_model(tmp_path):
    """Random weights at a config's dims, 4-bit experts and bitsandbytes linears, trainable with LoRA, and it
    round-trips through save/reload; quantize_linears matches what Transformers' integration loads."""
    import bitsandbytes as bnb

    from moefuse.quant.model import from_config, quantize_linears

    config = tiny_config("qwen3_moe", num_experts=8, top_k=2)
    model = from_config(config, NF4, device="cpu", dtype=torch.bfloat16)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.o_proj, bnb.nn.Linear4bit) and isinstance(
        model.lm_head, torch.nn.Linear
    )
    assert isinstance(layer.mlp.experts.down_proj, ExpertWeights4bit)
    assert not any(p.device.type == "meta" for p in model.parameters())
    std = layer.mlp.experts.down_proj.dequantize().float().std().item()
    assert 0.5 * config.initializer_range < std < 1.5 * config.initializer_range
    ids = _tokens()
    save_pretrained(model, tmp_path / "random")
    reloaded = from_pretrained(tmp_path / "random", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    peft_model = moefuse.lora.get_peft_model(model, r=4)
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="PEFT adapter layers"):
        save_pretrained(model, tmp_path / "with-lora")

    # In memory, the same bitsandbytes layers as loading with the config gives.
    dense = _model(torch.bfloat16)
    dense.save_pretrained(tmp_path / "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", quantization_config=NF4, device_map="cpu"
    )
    quantize_linears(dense, NF4)
    assert torch.equal(
        dense.model.layers[0].self_attn.q_proj.weight, loaded.model.layers[0].self_attn.q_proj.weight
    )
