"""The "moefuse" experts implementation gives the logits and gradients of Transformers' eager experts."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moefuse
from conftest import FAMILIES, randomize_, tiny_config


def _model(family, implementation, **cfg):
    config = tiny_config(family, **cfg)
    config._experts_implementation = implementation
    model = AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
    return randomize_(model)


def _logits_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("intermediate", [16, 6])  # 6: feature sizes grouped_mm cannot take (loop path)
def test_matches_eager(family, intermediate):
    eager = _model(family, "eager", intermediate=intermediate)
    fused = _model(family, "moefuse", intermediate=intermediate)
    assert fused.config._experts_implementation == "moefuse"
    ids = torch.randint(0, 128, (2, 3))  # 12 assignments over 16 experts: some experts get no token
    lo_e, g_e = _logits_and_grads(eager, ids)
    lo_f, g_f = _logits_and_grads(fused, ids)
    torch.testing.assert_close(lo_f, lo_e, rtol=1e-5, atol=1e-5)
    assert g_f.keys() == g_e.keys()
    expert_grads = [n for n in g_e if "experts" in n]
    assert expert_grads
    for name in g_e:
        torch.testing.assert_close(g_f[name], g_e[name], rtol=1e-4, atol=1e-5, msg=name)
    # some experts really received no token: their gradient rows are zero in both
    gate_up = next(g_e[n] for n in expert_grads if "gate_up" in n)
    assert (gate_up.flatten(1).abs().sum(1) == 0).any()


def test_set_experts_implementation_switches_both_ways():
    model = _model("qwen3_moe", "eager")
    ids = torch.randint(0, 128, (1, 9))
    ref = model(ids).logits
    model.set_experts_implementation("moefuse")
    assert model.config._experts_implementation == "moefuse"
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    model.set_experts_implementation("eager")
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_from_pretrained_with_moefuse(tmp_path):
    model = _model("mixtral", "eager")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moefuse")
    assert loaded.config._experts_implementation == "moefuse"
    ids = torch.randint(0, 128, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_experts_name_the_family():
    model = _model("qwen3_moe", "moefuse")
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True
    with pytest.raises(
        moefuse.UnsupportedExpertsError, match="model type 'qwen3_moe'.*have biases.*grouped_mm"
    ):
        model(torch.randint(0, 128, (1, 4)))


@pytest.mark.gpu
def test_matches_eager_fp32_at_model_level_on_the_triton_path():
    """Beside the bf16 bench's noise-floor check: two decoder layers in fp32 (no TF32) on the GPU, moefuse's
    Triton experts against Transformers' eager, logits and every gradient within a tight tolerance."""
    from moefuse.ops.backend import use_backend, use_triton

    assert not torch.backends.cuda.matmul.allow_tf32  # fp32 products in full precision on both sides
    config = tiny_config("qwen3_moe", num_experts=32, top_k=4, intermediate=128)
    config.hidden_size, config.intermediate_size = 256, 512
    ids = torch.randint(0, 128, (4, 64), device="cuda")  # 256 tokens: every expert gets rows, some many
    results = {}
    with use_backend("triton"):
        assert use_triton(torch.empty(0, device="cuda"))
        for implementation in ("eager", "moefuse"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
            results[implementation] = _logits_and_grads(randomize_(model, std=0.05).cuda().float(), ids)
    (lo_e, g_e), (lo_f, g_f) = results["eager"], results["moefuse"]
    torch.testing.assert_close(lo_f, lo_e, rtol=1e-4, atol=1e-5)
    assert g_f.keys() == g_e.keys()
    for name in g_e:
        error = ((g_f[name] - g_e[name]).norm() / g_e[name].norm()).item()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
