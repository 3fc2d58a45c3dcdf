"""moefuse.ops.lora_linear and moefuse.lora.linear: PEFT's LoRA Linear as one autograd function."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLinear
from torch import nn
from transformers import AutoModelForCausalLM

import moefuse
from conftest import tiny_config
from moefuse.lora import linear as lora_linear_module
from moefuse.lora.linear import LoraLinear, PlainLinear, use_fused_lora_linear
from moefuse.ops.lora_linear import lora_linear, lora_linear_reference


def _inputs(dtype, bias, lead=(3, 5), contiguous=True, weight_grad=False):
    torch.manual_seed(0)
    x = torch.randn(*lead, 24, dtype=torch.float64)
    if not contiguous:  # every other column of a wider tensor
        x = torch.randn(*lead, 48, dtype=torch.float64)[..., ::2]
    tensors = [
        x,
        torch.randn(40, 24, dtype=torch.float64) * 0.2,
        torch.randn(40, dtype=torch.float64) if bias else None,
        torch.randn(4, 24, dtype=torch.float64) * 0.2,
        torch.randn(40, 4, dtype=torch.float64) * 0.2,
    ]
    trained = [True, weight_grad, bias, True, True]
    return [
        None if t is None else t.to(dtype).requires_grad_(g) for t, g in zip(tensors, trained, strict=True)
    ]


def _grads(fn, tensors, scaling):
    for t in tensors:
        if t is not None:
            t.grad = None
    out = fn(*tensors, scaling)
    out.backward(torch.ones_like(out).mul_(torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)))
    return out.detach(), [None if t is None or t.grad is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("lead", [(3, 5), (1,), (0,)], ids=["3x5", "one-token", "no-token"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_lora_linear_matches_its_reference_with_gradients(bias, contiguous, lead, weight_grad):
    tensors = _inputs(torch.float64, bias, lead, contiguous, weight_grad)
    out, grads = _grads(lora_linear, tensors, 0.5)
    ref, ref_grads = _grads(lora_linear_reference, tensors, 0.5)
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected)


def test_lora_linear_under_autocast_computes_in_its_dtype_and_returns_factor_grads_in_theirs():
    """bf16 weights, float32 factors (PEFT's default) under bf16 autocast: the output in bf16, each gradient in
    its tensor's dtype, within bf16 rounding of the fp64 reference."""
    x, w, b, a, lb = _inputs(torch.float64, True)
    half = [t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in (x, w, b)]
    factors = [t.detach().float().requires_grad_() for t in (a, lb)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(lora_linear, [*half, *factors], 2.0)
    ref, ref_grads = _grads(lora_linear_reference, [x, w, b, a, lb], 2.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for got, expected, tensor in zip(grads, ref_grads, [*half, *factors], strict=True):
        if expected is None:
            continue
        assert got.dtype == tensor.dtype
        torch.testing.assert_close(got.double(), expected, rtol=3e-2, atol=3e-2)


def test_plain_linear_matches_nn_linear_itself_only():
    class Quantized(nn.Linear):  # as bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear
        pass

    assert isinstance(nn.Linear(2, 2), PlainLinear)
    assert not isinstance(Quantized(2, 2), PlainLinear)
    assert not isinstance(nn.Conv1d(2, 2, 1), PlainLinear)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("qwen3_moe", num_experts=4), experts_implementation=moefuse.EXPERTS_IMPLEMENTATION
    )
    return model.float()


def _peft_pair(**lora):
    """The same model and adapter twice: with PEFT's Linear layers, and with moefuse's."""
    config = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], **lora
    )
    plain = get_peft_model(_model(), LoraConfig(**config))
    fused = get_peft_model(_model(), use_fused_lora_linear(LoraConfig(**config)))
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
        fused.load_state_dict(plain.state_dict())
    return plain, fused


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_peft_builds_moefuse_lora_linear_and_trains_as_its_own(monkeypatch):
    """Attention projections become LoraLinear (the experts keep moefuse's experts layer); the state dict's keys are
    PEFT's; loss and every adapter gradient equal PEFT's own layers'; the fused path ran once per projection."""
    calls = []
    monkeypatch.setattr(lora_linear_module, "lora_linear", lambda *a: calls.append(1) or lora_linear(*a))
    plain, fused = _peft_pair()
    attention = [m for n, m in fused.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert attention and all(type(m) is LoraLinear for m in attention)
    assert not any(type(m) is LoraLinear for n, m in plain.named_modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    loss, grads = _step(fused, ids)
    ref_loss, ref_grads = _step(plain, ids)
    assert len(calls) == len(attention)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any("q_proj.lora_A" in n for n in grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_linear_falls_back_to_peft_where_not_plain(monkeypatch, tmp_path):
    """Dropout while training, a disabled adapter: PEFT's forward, same results as
    PEFT's layers; the adapter saved from LoraLinear layers loads into PEFT's own and merges alike."""
    calls = []
    monkeypatch.setattr(lora_linear_module, "lora_linear", lambda *a: calls.append(1) or lora_linear(*a))
    plain, fused = _peft_pair(lora_dropout=0.5)
    ids = torch.randint(0, plain.config.vocab_size, (1, 7))
    torch.manual_seed(3)
    loss, _ = _step(fused.train(), ids)
    torch.manual_seed(3)
    ref, _ = _step(plain.train(), ids)
    assert not calls
    torch.testing.assert_close(loss, ref)

    fused.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits)  # eval: dropout off, the fused path
        assert calls
        calls.clear()
        with fused.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(fused(ids).logits, plain(ids).logits)
        assert not calls
    fused.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_model(), str(tmp_path / "adapter"))
    assert any(type(m) is PeftLinear for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, fused(ids).logits)
        merged = copy.deepcopy(fused).merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, fused(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_linear_against_peft_under_bf16_autocast_gpu():
    """Qwen3-30B-A3B's q_proj widths, bf16 weights, float32 factors (PEFT's default), bf16 autocast as the Trainer
    runs it: output and every gradient within bf16 rounding of PEFT's own layer on the same adapter."""
    torch.manual_seed(0)
    base = nn.Linear(2048, 4096, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q"])
    layers = []
    for fused in (False, True):
        module = nn.ModuleDict({"q": copy.deepcopy(base)})
        module = get_peft_model(module, use_fused_lora_linear(copy.deepcopy(config)) if fused else config)
        layers.append(module.base_model.model["q"])
    plain, fused = layers
    assert type(fused) is LoraLinear and type(plain) is PeftLinear
    with torch.no_grad():
        plain.lora_B["default"].weight.normal_(std=0.02)
        fused.load_state_dict(plain.state_dict())
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    results = []
    for layer in (plain, fused):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(xi)
        out.backward(g)
        results.append(
            [out, xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
        )
    for name, got, ref in zip(["out", "x", "lora_A", "lora_B"], results[1], results[0], strict=True):
        assert got.dtype == ref.dtype, name
        scale = ref.float().abs().max()
        assert (got.float() - ref.float()).abs().max() <= 2e-2 * scale, name
