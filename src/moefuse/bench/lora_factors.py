"""The LoRA factors of a PEFT model in one canonical form, so two LoRA implementations can share adapter values
and have their gradients compared.

Canonical factors of an adapted weight ``W [out, in]`` (per expert for the experts' stacks ``[E, out, in]``):
``lora_A [(E,) r, in]`` and ``lora_B [(E,) out, r]``, ``W + scaling * lora_B @ lora_A``, keyed
``<module path>.lora_A`` / ``.lora_B`` (experts: ``<experts path>.gate_up_proj.lora_A`` ...). Three layouts map
onto it:

- PEFT's ``lora.Linear`` (attention projections): the same tensors.
- moefuse's :class:`~moefuse.lora.ExpertsLoraLayer` with LoRA on ``gate_up_proj`` and ``down_proj``: the same
  tensors.
- PEFT's ``ParamWrapper`` (``target_parameters``): ``lora_A [r*E, in]`` expert-major and ``lora_B [out, r*E]``
  rank-major. PEFT < 0.21 reads a ``[E, out, in]`` stack as ``[E, in, out]``, so there its ``lora_A`` is the
  canonical ``B`` transposed and its ``lora_B`` the canonical ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import ParamWrapper
from torch import nn

from ..lora import ExpertsLoraLayer

ADAPTER = "default"


@dataclass
class CanonicalFactor:
    """One canonical factor: ``read("data")`` / ``read("grad")`` give it (gradient ``None`` when missing),
    ``write`` sets it."""

    read: Callable[[str], torch.Tensor | None]
    write: Callable[[torch.Tensor], None]


def _attr(param: nn.Parameter, which: str) -> torch.Tensor | None:
    return param.detach() if which == "data" else param.grad


def _plain(param: nn.Parameter) -> CanonicalFactor:
    return CanonicalFactor(lambda which: _attr(param, which), lambda value: param.copy_(value))


def _moefuse_experts(layer: ExpertsLoraLayer, key: str) -> dict[str, CanonicalFactor]:
    together, down = layer.gate_up_proj, layer.down_proj
    if ADAPTER not in together.lora_A or ADAPTER not in down.lora_A:
        raise SystemExit(
            f"moefuse bench: {key} has no LoRA on gate_up_proj and down_proj (gate and up together), the adapter "
            "PEFT's target_parameters trains; the benchmarks compare that one"
        )
    return {
        f"{key}.{projection}.lora_{f}": _plain(
            getattr(getattr(layer, projection), f"lora_{f}")[ADAPTER].weight
        )
        for projection in ("gate_up_proj", "down_proj")
        for f in "AB"
    }


def _param_wrapper(wrapper: ParamWrapper, key: str) -> dict[str, CanonicalFactor]:
    a, b = wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight
    experts = wrapper.num_experts
    if experts == 1:
        raise SystemExit(f"moefuse bench: {key}.{wrapper.parameter_name} is not a stack of experts")
    # Whether PEFT's "in" is the weight's input dimension (PEFT >= 0.21 swaps [E, out, in] stacks; transposed
    # [E, in, out] storage needs no swap); otherwise its factors act on the output side.
    forward = getattr(wrapper, "_did_swap_in_out_features", False) or getattr(
        wrapper.get_base_layer(), "is_transposed", False
    )
    rank = a.shape[0] // experts

    def to_a(t: torch.Tensor) -> torch.Tensor:  # [E, r, in]
        return t.view(experts, rank, -1) if forward else t.view(-1, rank, experts).permute(2, 1, 0)

    def to_b(t: torch.Tensor) -> torch.Tensor:  # [E, out, r]
        return (
            t.view(-1, rank, experts).permute(2, 0, 1)
            if forward
            else t.view(experts, rank, -1).transpose(1, 2)
        )

    a_param, b_param = (a, b) if forward else (b, a)  # the PEFT parameters holding canonical A and B

    def read(param: nn.Parameter, convert: Callable) -> Callable[[str], torch.Tensor | None]:
        return lambda which: None if _attr(param, which) is None else convert(_attr(param, which))

    def write_a(value: torch.Tensor) -> None:
        a_param.copy_(
            value.reshape(-1, value.shape[2])
            if forward
            else value.permute(2, 1, 0).reshape(-1, rank * experts)
        )

    def write_b(value: torch.Tensor) -> None:
        b_param.copy_(
            value.permute(1, 2, 0).reshape(-1, rank * experts)
            if forward
            else value.transpose(1, 2).reshape(experts * rank, -1)
        )

    name = f"{key}.{wrapper.parameter_name}"
    return {
        f"{name}.lora_A": CanonicalFactor(read(a_param, to_a), write_a),
        f"{name}.lora_B": CanonicalFactor(read(b_param, to_b), write_b),
    }


def canonical_factors(model: nn.Module) -> dict[str, CanonicalFactor]:
    """Every LoRA factor of ``model`` (one adapter, ``"default"``) under its canonical name, sorted by name."""
    factors: dict[str, CanonicalFactor] = {}
    for name, module in model.named_modules():
        key = name.replace(".base_layer", "")
        if isinstance(module, ExpertsLoraLayer):
            factors.update(_moefuse_experts(module, key))
        elif isinstance(module, ParamWrapper):
            factors.update(_param_wrapper(module, key))
        elif isinstance(module, LoraLinear):
            factors[f"{key}.lora_A"] = _plain(module.lora_A[ADAPTER].weight)
            factors[f"{key}.lora_B"] = _plain(module.lora_B[ADAPTER].weight)
    return dict(sorted(factors.items()))


def random_canonical_values(
    factors: dict[str, CanonicalFactor], seed: int, std: float
) -> dict[str, torch.Tensor]:
    """Adapter values from ``seed``: ``A`` as PEFT initialises it (uniform, bound 1/sqrt(in)); ``B`` N(0, std)
    instead of PEFT's zeros, so the adapters change the outputs and every factor gets a gradient to compare."""
    values = {}
    generator = None
    for name, factor in factors.items():
        current = factor.read("data")
        if generator is None:
            generator = torch.Generator(current.device).manual_seed(seed)
        value = torch.empty(current.shape, device=current.device, dtype=torch.float32)
        if name.endswith("lora_A"):
            bound = 1 / math.sqrt(current.shape[-1])
            value.uniform_(-bound, bound, generator=generator)
        else:
            value.normal_(0.0, std, generator=generator)
        values[name] = value.to(current.dtype)
    return values


@torch.no_grad()
def write_canonical(factors: dict[str, CanonicalFactor], values: dict[str, torch.Tensor]) -> None:
    """Set every factor of a model from canonical ``values`` (the same names, from another layout or seed)."""
    missing = sorted(set(factors) ^ set(values))
    if missing:
        raise RuntimeError(f"LoRA factors do not match between implementations: {', '.join(missing[:4])}")
    for name, factor in factors.items():
        factor.write(values[name])


def canonical_grads(factors: dict[str, CanonicalFactor]) -> dict[str, torch.Tensor]:
    """The gradient of every canonical factor (absent where a factor got none)."""
    grads = {}
    for name, factor in factors.items():
        grad = factor.read("grad")
        if grad is not None:
            grads[f"grad {name}"] = grad
    return grads
