"""Settings read once from the environment and overridden in blocks; the experts plan each call follows, pinned
case by case in a table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moefuse.ops import plan as plan_module
from moefuse.ops.gating import SWIGLU, Gating
from moefuse.ops.lora import ExpertsLora, LoraWeights
from moefuse.ops.plan import (
    CUSTOM_DROPOUT,
    NOT_GATED,
    NOT_TRITON,
    SEVERAL_ADAPTERS,
    ExpertsPlan,
    plan_experts,
)
from moefuse.quant import ExpertWeights4bit
from moefuse.settings import Settings, override_settings, parse_overrides, reload_settings, settings


@pytest.fixture
def environment(monkeypatch):
    """Set MOEFUSE_* variables, then read them again; the settings are read again after the test too."""
    yield monkeypatch
    monkeypatch.undo()
    reload_settings()


def test_environment_is_read_once(environment):
    environment.setenv("MOEFUSE_BACKEND", "torch")
    environment.setenv("MOEFUSE_GROUPED_MM_WEIGHT_GRAD_ROWS", "64")
    environment.setenv("MOEFUSE_AUTOTUNE", "0")
    assert reload_settings() == Settings(backend="torch", grouped_mm_weight_grad_rows=64, autotune=False)
    environment.setenv("MOEFUSE_BACKEND", "triton")
    assert settings().backend == "torch"  # not read again on its own
    assert reload_settings().backend == "triton"


@pytest.mark.parametrize(
    "variable,value,message",
    [
        ("MOEFUSE_BACKEND", "cutlass", "unknown moefuse backend 'cutlass'"),
        ("MOEFUSE_AUTOTUNE", "maybe", "MOEFUSE_AUTOTUNE='maybe': expected 1 or 0"),
        ("MOEFUSE_GROUPED_MM_COMBINE_ROWS", "many", "expected an integer"),
    ],
)
def test_bad_environment_is_a_clear_error(environment, variable, value, message):
    environment.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        reload_settings()


def test_overrides_nest_and_restore():
    before = settings()
    with override_settings(backend="torch") as outer:
        assert settings() is outer and outer.backend == "torch"
        with override_settings(autotune=False):
            assert (settings().backend, settings().autotune) == ("torch", False)
        assert settings().autotune == before.autotune
    assert settings() == before


@pytest.mark.parametrize(
    "changes,error",
    [({"backends": "torch"}, TypeError), ({"backend": "cuda"}, ValueError), ({"autotune": 1}, TypeError)],
)
def test_bad_override_is_refused(changes, error):
    with pytest.raises(error):
        with override_settings(**changes):
            pass


def test_parse_overrides():
    assert parse_overrides("backend=torch, grouped_mm_weight_grad_rows=1,autotune=0") == {
        "backend": "torch",
        "grouped_mm_weight_grad_rows": 1,
        "autotune": False,
    }
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_overrides("threshold=3")


# --- the plan -------------------------------------------------------------------------------------------------

E, H, I = 8, 64, 32  # noqa: E741
GELU_TANH = Gating("gelu_tanh")
GPT_OSS = Gating("silu", alpha=1.702, limit=7.0, up_shift=1.0, interleaved=True)


def _lora(down: bool = True, gate_up: bool = True, dropout=None) -> ExpertsLora:
    def weights(out_features: int, in_features: int) -> LoraWeights:
        return LoraWeights(torch.zeros(E, 4, in_features), torch.zeros(E, out_features, 4), 2.0)

    return ExpertsLora(
        gate=weights(I, H) if gate_up else None,
        up=weights(I, H) if gate_up else None,
        down=weights(H, I) if down else None,
        dropout=dropout,
    )


def _custom_dropout(x: torch.Tensor) -> torch.Tensor:
    return x


def _trained_dropout() -> torch.nn.Dropout:
    return torch.nn.Dropout(0.1).train()


# (case, tokens, top-k, on Triton, on Hopper in bf16, base weights trained, 4-bit, activation, adapters) -> plan
PLAN_CASES = [
    ("pytorch backend", 64, 2, False, False, False, False, SWIGLU, (), ExpertsPlan(
        "torch", False, NOT_TRITON, None, "dense", "none", 0.0, False, False, False, False)),
    ("triton, frozen", 64, 2, True, False, False, False, SWIGLU, (), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "none", 0.0, False, False, False, False)),
    ("triton, full fine-tuning", 64, 2, True, False, True, False, SWIGLU, (), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "none", 0.0, True, False, False, False)),
    ("own gate function", 64, 2, True, False, False, False, None, (), ExpertsPlan(
        "triton", False, NOT_GATED, None, "dense", "none", 0.0, False, False, False, False)),
    ("two adapters", 64, 2, True, False, False, False, SWIGLU, (_lora(), _lora()), ExpertsPlan(
        "triton", False, SEVERAL_ADAPTERS, None, "dense", "composed", 0.0, False, False, False, False)),
    ("custom dropout", 64, 2, True, False, False, False, SWIGLU, (_lora(dropout=_custom_dropout),), ExpertsPlan(
        "triton", False, CUSTOM_DROPOUT, None, "dense", "composed", 0.0, False, False, False, False)),
    ("LoRA, nn.Dropout", 64, 2, True, False, False, False, SWIGLU, (_lora(dropout=_trained_dropout()),), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "fused", 0.1, False, False, False, False)),
    ("4-bit, LoRA", 64, 2, True, False, False, True, SWIGLU, (_lora(),), ExpertsPlan(
        "triton", True, "", SWIGLU, "4bit", "fused", 0.0, False, False, False, False)),
    ("hopper, full FT, 1024 rows per expert", 4096, 2, True, True, True, False, SWIGLU, (), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "none", 0.0, True, True, True, True)),
    ("hopper, LoRA on every projection", 4096, 2, True, True, False, False, SWIGLU, (_lora(),), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "fused", 0.0, False, False, False, True)),
    ("hopper, LoRA on down only", 4096, 2, True, True, False, False, SWIGLU, (_lora(gate_up=False),), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "fused", 0.0, False, False, True, True)),
    ("hopper, 512 rows per expert", 2048, 2, True, True, True, False, SWIGLU, (), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "none", 0.0, True, False, False, True)),
    ("hopper, 128 rows per expert", 512, 2, True, True, True, False, SWIGLU, (), ExpertsPlan(
        "triton", True, "", SWIGLU, "dense", "none", 0.0, True, False, False, False)),
    ("GPT-OSS's clamped SwiGLU", 64, 2, True, False, False, False, GPT_OSS, (_lora(),), ExpertsPlan(
        "triton", True, "", GPT_OSS, "dense", "fused", 0.0, False, False, False, False)),
    ("GELU-tanh gate (Gemma 4)", 64, 2, True, False, False, False, GELU_TANH, (_lora(),), ExpertsPlan(
        "triton", True, "", GELU_TANH, "dense", "fused", 0.0, False, False, False, False)),
]  # fmt: skip


@pytest.mark.parametrize(
    "tokens,top_k,triton,hopper,trained,four_bit,gating,lora,expected",
    [pytest.param(*case[1:], id=case[0]) for case in PLAN_CASES],
)
def test_plan(monkeypatch, tokens, top_k, triton, hopper, trained, four_bit, gating, lora, expected):
    monkeypatch.setattr(plan_module, "use_triton", lambda t: triton)
    monkeypatch.setattr(plan_module, "grouped_mm_competes", lambda t, dtype: hopper)
    gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    if four_bit:
        gate_up, down = ExpertWeights4bit.quantize(gate_up), ExpertWeights4bit.quantize(down)
    else:
        gate_up.requires_grad_(trained)
        down.requires_grad_(trained)
    plan = plan_experts(torch.empty(tokens, H), gate_up, down, top_k, gating=gating, lora=lora)
    assert plan == expected
    assert plan.describe()


def test_a_down_bias_keeps_the_routing_weight_out_of_h(monkeypatch):
    """With a bias on the down projection, h is not stored times the routing weight (the bias's rows are scaled
    by it after the GEMM), so the combine stays on the Triton kernel whose epilogue adds the bias."""
    monkeypatch.setattr(plan_module, "use_triton", lambda t: True)
    monkeypatch.setattr(plan_module, "grouped_mm_competes", lambda t, dtype: True)
    gate_up, down = torch.randn(E, 2 * I, H, requires_grad=True), torch.randn(E, H, I, requires_grad=True)
    plain = plan_experts(torch.empty(4096, H), gate_up, down, 2)
    biased = plan_experts(torch.empty(4096, H), gate_up, down, 2, gating=GPT_OSS, biases=True)
    assert plain.prescaled_h and plain.combine_on_grouped_mm
    assert biased.fused and not biased.prescaled_h and not biased.combine_on_grouped_mm
    assert "limit 7" in biased.describe()


def test_plan_follows_the_settings_thresholds(monkeypatch):
    monkeypatch.setattr(plan_module, "use_triton", lambda t: True)
    monkeypatch.setattr(plan_module, "grouped_mm_competes", lambda t, dtype: True)
    gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I, requires_grad=True)
    with override_settings(grouped_mm_combine_rows=16, grouped_mm_weight_grad_rows=1 << 20):
        plan = plan_experts(torch.empty(64, H), gate_up, down, 2)
    assert (plan.combine_on_grouped_mm, plan.input_grad_on_grouped_mm, plan.weight_grad_on_grouped_mm) == (
        True,
        True,
        False,
    )


def test_a_gating_the_kernels_cannot_compute_is_refused_when_built():
    with pytest.raises(ValueError, match="Gating.activation must be one of"):
        Gating("relu")
    with pytest.raises(ValueError, match="Gating.alpha applies to silu only"):
        Gating("gelu_tanh", alpha=1.702)
    with pytest.raises(ValueError, match="Gating.limit must be positive"):
        Gating(limit=0.0)


def test_activation_names():
    from transformers.activations import ACT2FN

    from moefuse.ops.gating import activation_name

    for act_fn in (F.silu, torch.nn.SiLU(), ACT2FN["silu"]):
        assert activation_name(act_fn) == "silu"
    for act_fn in (torch.nn.GELU(approximate="tanh"), ACT2FN["gelu_pytorch_tanh"], ACT2FN["gelu_new"]):
        assert activation_name(act_fn) == "gelu_tanh"
    for act_fn in (torch.nn.GELU(), ACT2FN["gelu"], F.relu, torch.tanh):  # exact GELU is another function
        assert activation_name(act_fn) is None
