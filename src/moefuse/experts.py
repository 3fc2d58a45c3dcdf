"""The ``"moefuse"`` experts implementation, registered into Transformers' ``ExpertsInterface``.

Any experts class decorated with ``@use_experts_implementation`` dispatches its forward through
``config._experts_implementation``; ``import moefuse`` adds ``"moefuse"`` to the choices, so
``from_pretrained(..., experts_implementation="moefuse")`` and ``model.set_experts_implementation("moefuse")``
route the experts through :func:`moefuse.fused_experts`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection
from typing import Any

import torch
from transformers.integrations import moe as transformers_moe
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel

from .ops.gating import ACTIVATIONS, Gating, recognise_gate
from .ops.moe import fused_experts

EXPERTS_IMPLEMENTATION = "moefuse"


class UnsupportedExpertsError(NotImplementedError):
    """The model's experts have a structure the moefuse kernels do not compute."""


# Transformers' gate, act_fn(gate) * up on [gate; up] columns (None on releases before ``_apply_gate``).
_DEFAULT_APPLY_GATE = getattr(transformers_moe, "_default_apply_gate", None)


def _up_name(experts: torch.nn.Module) -> str:
    """The first projection's stack: ``gate_up_proj``, or ``up_proj`` for experts without a gate."""
    return "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"


def _has_own_gate(experts: torch.nn.Module) -> bool:
    return getattr(type(experts), "_apply_gate", _DEFAULT_APPLY_GATE) is not _DEFAULT_APPLY_GATE


def _contract_reason(experts: torch.nn.Module) -> str | None:
    """Why moefuse's forward cannot compute these experts as Transformers' experts functions do, or None."""
    up = _up_name(experts)
    if not hasattr(experts, up) or not hasattr(experts, "down_proj"):
        return f"do not store {up} and down_proj stacks"
    if getattr(experts, "has_bias", False) and not (
        hasattr(experts, f"{up}_bias") and hasattr(experts, "down_proj_bias")
    ):
        return f"have biases (has_bias) but no {up}_bias and down_proj_bias stacks"
    if getattr(experts, "_is_expert_parallel", False):
        return "are sharded by Transformers' expert-parallel plan"
    return None


def lora_refusal(experts: torch.nn.Module, projections: Collection[str]) -> str | None:
    """Why moefuse's expert LoRA on ``projections`` (``gate_proj``, ``up_proj``, ``gate_up_proj``, ``down_proj``)
    cannot reach these experts, or None. LoRA on the stacked ``gate_up_proj`` (gate and up together) and on
    ``down_proj`` is the same whatever the gating, biases or norm between them; ``gate_proj``/``up_proj`` apart
    need ``act_fn(gate) * up`` on ``[gate; up]`` rows."""
    reason = _contract_reason(experts)
    if reason is not None:
        return reason
    if not getattr(experts, "has_gate", True):
        return "have no gate (a plain up projection)"
    apart = sorted({"gate_proj", "up_proj"} & set(projections))
    if apart and not gate_and_up_apart(experts):
        gating = (
            "interleave the gate and up rows"
            if not getattr(experts, "is_concatenated", True)
            else f"compute their own gate ({type(experts).__name__}._apply_gate)"
        )
        return (
            f"{gating}, so LoRA on {' and '.join(apart)} apart cannot be placed; target gate_up_proj (gate and "
            "up together, one A) instead"
        )
    return None


def _refuse(experts: torch.nn.Module, reason: str, supported: str = "") -> UnsupportedExpertsError:
    model_type = getattr(getattr(experts, "config", None), "model_type", "unknown")
    return UnsupportedExpertsError(
        f"moefuse cannot run the experts of model type '{model_type}' ({type(experts).__name__}): they {reason}. "
        f"{supported}Load this model with experts_implementation='grouped_mm'."
    )


def gate_and_up_apart(experts: torch.nn.Module) -> bool:
    """Whether the experts' gate_up_proj is known to hold the gate rows, then the up rows: they gate as
    ``act_fn(gate) * up``, so LoRA can be placed on gate and up apart and gate_up_proj's LoRA splits into theirs
    (a family's own gate orders its rows its own way: GPT-OSS interleaves them, and only newer Transformers say
    so with ``is_concatenated``)."""
    return "act_fn" in experts_structure(experts)


def check_lora_supported(experts: torch.nn.Module, projections: Collection[str]) -> None:
    """Raise :class:`UnsupportedExpertsError` naming the model family where moefuse's expert LoRA on
    ``projections`` cannot reach these experts (:func:`lora_refusal`)."""
    reason = lora_refusal(experts, projections)
    if reason is not None:
        raise _refuse(experts, reason)


# A family's own gate found to be one the fused kernels compute (or not), by class and constants: found once.
_OWN_GATINGS: dict[tuple, Gating | None] = {}


def own_gating(experts: torch.nn.Module) -> Gating | None:
    """The :class:`~moefuse.ops.gating.Gating` that computes the experts' own ``_apply_gate``, or ``None``.

    The candidates are the kernels' gatings with the module's ``alpha`` and ``limit`` (GPT-OSS's clamped SwiGLU,
    ``up + 1``, rows interleaved; DeepSeek-V4's clamped SiLU; ...); one is taken only where it returns what
    ``_apply_gate`` does on probe values (:func:`~moefuse.ops.gating.recognise_gate`), so a family whose gate
    differs, or a release that changes one, runs its own function, composed."""
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    key = (
        type(experts),
        alpha,
        limit,
        repr(getattr(experts, "act_fn", None)),
    )  # repr: nn.GELU's approximation
    if key not in _OWN_GATINGS:
        constants = {"limit": math.inf if limit is None else float(limit)}
        candidates = [
            Gating(activation, **constants, up_shift=up_shift, interleaved=interleaved)
            for activation in ACTIVATIONS
            for up_shift in (0.0, 1.0)
            for interleaved in (False, True)
        ]
        if alpha is not None:  # a sigmoid slope: SiLU's
            candidates = [
                Gating(
                    "silu", alpha=float(alpha), **constants, up_shift=c.up_shift, interleaved=c.interleaved
                )
                for c in candidates
                if c.activation == "silu"
            ]
        _OWN_GATINGS[key] = recognise_gate(experts._apply_gate, candidates)
    return _OWN_GATINGS[key]


def experts_structure(experts: torch.nn.Module) -> dict[str, Any]:
    """The keyword arguments of :func:`moefuse.fused_experts` that compute these experts as Transformers' own
    experts functions do: the family's ``_apply_gate`` (or ``act_fn`` without a gate), biases and post-expert
    norm. Plain gated experts get ``act_fn`` alone, which the Triton path fuses when it is SiLU or GELU's tanh form
    (:func:`moefuse.ops.gating.activation_name`); a family's own gate that the kernels compute comes as a
    :class:`~moefuse.ops.gating.Gating` (:func:`own_gating`), which the Triton path fuses too.

    Raises :class:`UnsupportedExpertsError` naming the model family and the structure it cannot compute.
    """
    reason = _contract_reason(experts)
    if reason is not None:
        raise _refuse(experts, reason)
    structure: dict[str, Any] = {}
    if not getattr(experts, "has_gate", True):
        structure["gate_fn"] = experts.act_fn
    elif _has_own_gate(experts) or not getattr(experts, "is_concatenated", True):
        # Transformers' experts functions hand the gate/up GEMM's output to _apply_gate whatever the layout.
        structure["gate_fn"] = own_gating(experts) or experts._apply_gate
    else:
        structure["act_fn"] = experts.act_fn
    if getattr(experts, "has_bias", False):
        structure["gate_up_bias"] = getattr(experts, f"{_up_name(experts)}_bias")
        structure["down_bias"] = experts.down_proj_bias
    if getattr(experts, "has_post_expert_norm", False):
        structure["post_fn"] = experts.post_expert_norm
    return structure


def stacked_expert_weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up_proj [E, 2I, H]`` (``up_proj [E, I, H]`` for experts without a gate) and ``down_proj [E, H, I]``
    of an experts module, as the ops take them."""
    gate_up_proj, down_proj = getattr(experts, _up_name(experts)), experts.down_proj
    if getattr(experts, "is_transposed", False):
        # Transposed storage ([E, H, N] and [E, I, H]): views, the GEMMs read them through their strides.
        gate_up_proj, down_proj = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    return gate_up_proj, down_proj


def moefuse_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Forward of an ``@use_experts_implementation`` experts module through :func:`moefuse.fused_experts`."""
    structure = experts_structure(self)
    gate_up_proj, down_proj = stacked_expert_weights(self)
    # The router's topk picks ids in range: no need for the check's host sync on every layer.
    return fused_experts(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_index,
        top_k_weights,
        check_index_range=False,
        **structure,
    )


def _accept_registered_experts_names() -> None:
    """Let ``from_pretrained(experts_implementation="moefuse")`` through on Transformers releases whose check
    lists the built-in names instead of reading ``ALL_EXPERTS_FUNCTIONS`` (5.6 and others before the change)."""
    original = PreTrainedModel.get_correct_experts_implementation
    if getattr(original, "_moefuse", False) or "ALL_EXPERTS_FUNCTIONS" in inspect.getsource(original):
        return

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        if requested_experts == EXPERTS_IMPLEMENTATION:
            return requested_experts
        return original(self, requested_experts)

    get_correct_experts_implementation._moefuse = True
    PreTrainedModel.get_correct_experts_implementation = get_correct_experts_implementation


def register() -> None:
    """Register ``"moefuse"`` in Transformers' experts interface (idempotent; done by ``import moefuse``)."""
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, moefuse_experts_forward)
    _accept_registered_experts_names()
