"""Every experts class of the installed Transformers that takes an ``experts_implementation`` runs on moefuse with
the forward and every gradient of ``eager``, or is refused with :class:`moefuse.UnsupportedExpertsError` naming
its model type.

The classes are found at run time (those ``@use_experts_implementation`` decorated) and built from their own
family's config at toy sizes, so a new Transformers release is swept without editing this file.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from types import CodeType

import pytest
import torch
import transformers.models
from huggingface_hub.errors import StrictDataclassError
from transformers.configuration_utils import PreTrainedConfig
from transformers.integrations import moe as transformers_moe

import moefuse
from conftest import randomize_
from moefuse.experts import check_lora_supported, experts_structure, lora_refusal, stacked_expert_weights
from moefuse.ops.backend import use_backend
from moefuse.ops.gating import SWIGLU, Gating, gating_of
from moefuse.ops.lora import ExpertsLora, LoraWeights
from moefuse.quant import quantize_experts
from moefuse.quant.model import PROJECTIONS

TOY = {"experts": 4, "hidden": 16, "intermediate": 8}
TOP_K = 2
TOKENS = 16
# The names Transformers' configs give the experts' sizes, set before building: some default to None (the
# family dense by default) or to a list (one size per modality). Sizes under other names are shrunk by value.
SIZE_NAMES = {
    "num_experts": "experts",
    "num_local_experts": "experts",
    "n_routed_experts": "experts",
    "moe_num_experts": "experts",
    "hidden_size": "hidden",
    "intermediate_size": "intermediate",
    "moe_intermediate_size": "intermediate",
}


def _decorated_forward() -> CodeType:
    """The code of the forward that ``@use_experts_implementation`` puts on a class: what marks one."""

    class Probe(torch.nn.Module):
        def forward(self) -> None:
            pass

    return transformers_moe.use_experts_implementation(Probe).forward.__code__


def discover() -> list[tuple[str, type[torch.nn.Module], list[type[PreTrainedConfig]]]]:
    """``(family, experts class, config classes)`` for every decorated experts class in ``transformers.models``.

    A family that builds a subclass of its decorated class (Ergo adds a per-route norm around its projections)
    is swept through that subclass, as its model calls it. Only modeling modules naming the decorator are
    imported: importing every model in Transformers would dominate the sweep.
    """
    marker = _decorated_forward()
    found = []
    for path in sorted(Path(transformers.models.__file__).parent.glob("*/modeling_*.py")):
        if "use_experts_implementation" not in path.read_text(encoding="utf-8"):
            continue
        family = path.parent.name
        module = importlib.import_module(f"transformers.models.{family}.{path.stem}")
        classes = [
            c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__
        ]
        configs = sorted(
            (
                c
                for c in vars(module).values()
                if isinstance(c, type)
                and issubclass(c, PreTrainedConfig)
                and c.__module__.startswith(f"transformers.models.{family}.")
            ),
            key=lambda c: c.__name__,
        )
        for decorated in classes:
            if getattr(decorated.__dict__.get("forward"), "__code__", None) is not marker:
                continue
            subclasses = [c for c in classes if c is not decorated and issubclass(c, decorated)]
            found.extend((family, cls, configs) for cls in subclasses or [decorated])
    return found


EXPERTS_CLASSES = discover()


def _build(cls: type[torch.nn.Module], config: PreTrainedConfig) -> torch.nn.Module:
    # Constructor arguments past the config without a default are a layer index: the first layer's.
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return cls(config, **{p.name: 0 for p in params if p.default is p.empty and p.kind not in variadic})


def _sizes(experts: torch.nn.Module) -> dict[str, int]:
    gate_up, down = stacked_expert_weights(experts)
    return {"experts": gate_up.shape[0], "hidden": gate_up.shape[2], "intermediate": down.shape[2]}


def _toy_config(cls: type[torch.nn.Module], config_class: type[PreTrainedConfig]) -> PreTrainedConfig:
    config = config_class()
    for name, role in SIZE_NAMES.items():
        if hasattr(config, name):
            try:
                setattr(config, name, TOY[role])
            except StrictDataclassError:
                # A size per modality (a list): the family's model hands the experts one of them.
                vars(config)[name] = TOY[role]
    with torch.device("meta"):
        sizes = _sizes(_build(cls, config))
    # A size the names above missed (e.g. a separate hidden size for the experts): every config attribute
    # holding it takes the toy value of its role.
    for role, size in sizes.items():
        if size != TOY[role]:
            for name, value in list(vars(config).items()):
                if type(value) is int and value == size:
                    setattr(config, name, TOY[role])
    return config


def toy_experts(
    cls: type[torch.nn.Module], config_classes: list[type[PreTrainedConfig]]
) -> tuple[torch.nn.Module, PreTrainedConfig]:
    """``cls`` built at toy sizes from the first of its family's config classes it builds from (the one its
    ``config`` argument names first), random fp32 weights."""
    annotated = inspect.signature(cls.__init__).parameters["config"].annotation
    ordered = sorted(config_classes, key=lambda c: c is not annotated)
    errors = []
    for config_class in ordered:
        try:
            config = _toy_config(cls, config_class)
        except Exception as error:  # a config of another part of the model (vision, audio): not the experts'
            errors.append(f"{config_class.__name__}: {type(error).__name__}: {error}")
            continue
        with torch.device("meta"):
            sizes = _sizes(_build(cls, config))
        assert sizes == TOY, f"{cls.__name__} from a toy {config_class.__name__} has sizes {sizes}, not {TOY}"
        return randomize_(_build(cls, config).float(), std=1.0), config
    pytest.fail(f"no config class of its family builds {cls.__name__}: {errors}")


def _forward_backward(
    experts: torch.nn.Module,
    implementation: str,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    hidden_states, top_k_index, top_k_weights = inputs
    hidden_states = hidden_states.detach().requires_grad_()
    top_k_weights = top_k_weights.detach().requires_grad_()
    out = experts(hidden_states, top_k_index, top_k_weights)
    out.backward(grad_out)
    grads = {"hidden_states": hidden_states.grad, "top_k_weights": top_k_weights.grad}
    grads.update((name, p.grad) for name, p in experts.named_parameters())
    return out.detach(), grads


def test_the_sweep_finds_the_decorated_experts():
    assert EXPERTS_CLASSES, "no @use_experts_implementation experts class found in transformers.models"


@pytest.mark.parametrize(
    "family, experts_class, config_classes",
    EXPERTS_CLASSES,
    ids=[f"{f}-{c.__name__}" for f, c, _ in EXPERTS_CLASSES],
)
def test_matches_eager_or_is_refused(family, experts_class, config_classes):
    experts, config = toy_experts(experts_class, config_classes)
    try:
        _check_against_eager(experts)
    except moefuse.UnsupportedExpertsError as refusal:
        assert f"model type '{config.model_type}'" in str(refusal) and experts_class.__name__ in str(refusal)


@pytest.mark.parametrize(
    "family, experts_class, config_classes",
    EXPERTS_CLASSES,
    ids=[f"{f}-{c.__name__}" for f, c, _ in EXPERTS_CLASSES],
)
def test_gate_up_lora_is_the_lora_of_the_stacked_weights_or_is_refused(family, experts_class, config_classes):
    """LoRA on gate_up_proj (gate and up together) and down_proj gives, whatever the family's gating, biases or
    norms, what eager gives with the weights ``W + scaling * B @ A`` (PEFT's ``target_parameters`` LoRA):
    output and the factors' gradients; or the family is refused naming its structure."""
    experts, config = toy_experts(experts_class, config_classes)
    refusal = lora_refusal(experts, ("gate_up_proj", "down_proj"))
    if refusal is not None:
        with pytest.raises(moefuse.UnsupportedExpertsError, match=f"model type '{config.model_type}'"):
            check_lora_supported(experts, ("gate_up_proj", "down_proj"))
        return
    g = torch.Generator().manual_seed(1)
    gate_up, down = stacked_expert_weights(experts)
    num_experts, rows, hidden = gate_up.shape
    inter, rank = down.shape[2], 3

    def factors(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(num_experts, rank, in_features, generator=g) / in_features**0.5
        b = torch.randn(num_experts, out_features, rank, generator=g) / rank**0.5
        return a.requires_grad_(), b.requires_grad_()

    pairs = {"gate_up_proj": (*factors(rows, hidden), 0.5), "down_proj": (*factors(hidden, inter), 2.0)}
    lora = ExpertsLora(gate_up=LoraWeights(*pairs["gate_up_proj"]), down=LoraWeights(*pairs["down_proj"]))
    hidden_states = 2 * torch.randn(TOKENS, hidden, generator=g)
    top_k_index = torch.rand(TOKENS, num_experts, generator=g).argsort(dim=1)[:, :TOP_K]
    top_k_weights = torch.rand(TOKENS, TOP_K, generator=g)
    grad_out = torch.randn(TOKENS, hidden, generator=g)

    out = moefuse.fused_experts(
        hidden_states, gate_up, down, top_k_index, top_k_weights, lora=[lora], **experts_structure(experts)
    )
    out.backward(grad_out)
    got = [t.grad.clone() for name in pairs for t in pairs[name][:2]]
    for name in pairs:
        for t in pairs[name][:2]:
            t.grad = None

    # eager with the merged weights, as a function of the factors (stored transposed where the family does)
    merged = {}
    for name, (a, b, scaling) in pairs.items():
        delta = scaling * torch.bmm(b, a)
        stored = getattr(experts, name)
        merged[name] = stored + (delta.transpose(1, 2) if getattr(experts, "is_transposed", False) else delta)
    experts.config._experts_implementation = "eager"
    ref = torch.func.functional_call(experts, merged, (hidden_states, top_k_index, top_k_weights))
    ref.backward(grad_out)
    want = [t.grad for name in pairs for t in pairs[name][:2]]
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5 * max(g_want.abs().max().item(), 1.0))


def _fused_gating(experts: torch.nn.Module) -> Gating | None:
    """The gating the fused Triton path computes for these experts, or ``None`` where they run composed."""
    try:
        structure = experts_structure(experts)
    except moefuse.UnsupportedExpertsError:
        return None
    if "post_fn" in structure:
        return None
    return gating_of(structure.get("act_fn"), structure.get("gate_fn"))


def test_gated_families_run_fused_on_the_triton_kernels(monkeypatch):
    """Every family whose experts gate as the kernels compute other than plain SwiGLU (GELU's tanh form, Gemma 4's;
    GPT-OSS's clamped SwiGLU with biases and interleaved rows; other clamped gates), and a SwiGLU one, run the fused
    Triton path (interpreted on a CPU) with eager's output and gradients."""
    from moefuse.ops import moe_triton

    fused = []
    original = moe_triton.triton_fused_experts
    monkeypatch.setattr(moe_triton, "triton_fused_experts", lambda *a: fused.append(a[6]) or original(*a))
    checked = {}
    for family, experts_class, config_classes in EXPERTS_CLASSES:
        experts, _ = toy_experts(experts_class, config_classes)
        gating = _fused_gating(experts)
        if gating is not None and (gating != SWIGLU or family == "qwen3_moe"):
            fused.clear()
            with use_backend("triton"):
                _check_against_eager(experts)
            assert [plan.gating for plan in fused] == [gating], family
            checked[family] = gating
    assert checked.get("qwen3_moe") == SWIGLU, checked
    assert checked.get("gemma4") == Gating("gelu_tanh"), checked
    assert checked.get("gpt_oss") == Gating("silu", alpha=1.702, limit=7.0, up_shift=1.0, interleaved=True), (
        checked
    )


def _check_against_eager(experts: torch.nn.Module, reference: torch.nn.Module | None = None) -> None:
    """``"moefuse"`` experts give ``eager``'s output and every gradient (or raise UnsupportedExpertsError); ``eager``
    runs ``reference`` where given (the same experts with other stored weights)."""
    g = torch.Generator().manual_seed(0)
    # Inputs large enough that the families' clamps (SwiGLU limits, softcaps) cut some gate/up values.
    hidden_states = 2 * torch.randn(TOKENS, TOY["hidden"], generator=g)
    top_k_index = torch.rand(TOKENS, TOY["experts"], generator=g).argsort(dim=1)[:, :TOP_K]
    top_k_weights = torch.rand(TOKENS, TOP_K, generator=g)
    inputs = (hidden_states, top_k_index, top_k_weights)
    grad_out = torch.randn(TOKENS, TOY["hidden"], generator=g)

    out_eager, grads_eager = _forward_backward(reference or experts, "eager", inputs, grad_out)
    out, grads = _forward_backward(experts, moefuse.EXPERTS_IMPLEMENTATION, inputs, grad_out)
    scale = out_eager.abs().max().item()
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5 * scale)
    assert grads.keys() == grads_eager.keys()
    for name, grad_eager in grads_eager.items():
        assert (grads[name] is None) == (grad_eager is None), name
        if grad_eager is not None:
            atol = 1e-5 * max(grad_eager.abs().max().item(), 1.0)
            torch.testing.assert_close(grads[name], grad_eager, rtol=1e-5, atol=atol, msg=name)


def _quantized(experts: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``experts`` with 4-bit gate_up_proj and down_proj stacks (frozen, as QLoRA holds them), and a copy holding
    their dequantized values as dense stacks."""
    dense = copy.deepcopy(experts)
    experts.config._experts_implementation = moefuse.EXPERTS_IMPLEMENTATION
    quantize_experts(experts, progress=False)  # QLoRA's defaults: NF4, nested statistics
    for name in PROJECTIONS:
        setattr(dense, name, torch.nn.Parameter(getattr(experts, name).dequantize(), requires_grad=False))
    return experts, dense


@pytest.mark.parametrize(
    "family, experts_class, config_classes",
    EXPERTS_CLASSES,
    ids=[f"{f}-{c.__name__}" for f, c, _ in EXPERTS_CLASSES],
)
def test_4bit_experts_match_eager_on_their_dequantized_weights(family, experts_class, config_classes):
    """Every family whose experts moefuse takes LoRA on (what QLoRA trains) runs on frozen 4-bit stacks with the
    output and gradients (input, routing weights, biases) eager gives on the stacks' dequantized values; on the
    Triton path too for the gatings the fused kernels compute other than plain SwiGLU, and for Qwen3-MoE's."""
    experts, _ = toy_experts(experts_class, config_classes)
    if lora_refusal(experts, ("gate_up_proj", "down_proj")) is not None:
        return  # refused for LoRA, so for QLoRA: test_gate_up_lora_is_the_lora_of_the_stacked_weights_or_is_refused
    gating = _fused_gating(experts)
    quantized, dense = _quantized(experts)
    _check_against_eager(quantized, dense)
    if gating is not None and (gating != SWIGLU or family == "qwen3_moe"):
        with use_backend("triton"):
            _check_against_eager(quantized, dense)


def test_structure_arguments_that_do_not_fit_are_refused_clearly():
    hidden_states, top_k_index, top_k_weights = (
        torch.randn(4, 16),
        torch.zeros(4, 1, dtype=torch.long),
        torch.ones(4, 1),
    )
    gate_up, down = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    args = (hidden_states, gate_up, down, top_k_index, top_k_weights)
    with pytest.raises(ValueError, match=r"gate_up_bias must be \[E, out\] = \(4, 16\)"):
        moefuse.fused_experts(*args, gate_up_bias=torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"down_bias must be \[E, out\] = \(4, 16\)"):
        moefuse.fused_experts(*args, down_bias=torch.zeros(16))
    with pytest.raises(ValueError, match=r"down_proj must be \[E, H, I\] with \(E, H\) = \(4, 16\)"):
        moefuse.fused_experts(
            hidden_states, gate_up, down[:, :8], top_k_index, top_k_weights, gate_fn=torch.relu
        )
    gate = LoraWeights(torch.zeros(4, 1, 16), torch.zeros(4, args[1].shape[1] // 2, 1))
    with pytest.raises(ValueError, match="gate and up LoRA apart only with act_fn"):
        moefuse.fused_experts(*args, gate_fn=torch.relu, lora=[ExpertsLora(gate=gate)])
