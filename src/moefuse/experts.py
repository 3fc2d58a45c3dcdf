"""The ``"moefuse"`` experts implementation, registered into Transformers' ``ExpertsInterface``.

Any experts class decorated with ``@use_experts_implementation`` dispatches its forward through
``config._experts_implementation``; ``import moefuse`` adds ``"moefuse"`` to the choices, so
``from_pretrained(..., experts_implementation="moefuse")`` and ``model.set_experts_implementation("moefuse")``
route the experts through :func:`moefuse.fused_experts`.
"""

from __future__ import annotations

import inspect

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel

from .ops.moe import fused_experts

EXPERTS_IMPLEMENTATION = "moefuse"
SUPPORTED_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


class UnsupportedExpertsError(NotImplementedError):
    """The model's experts have a structure the moefuse kernels do not compute."""


def _unsupported_reason(experts: torch.nn.Module) -> str | None:
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        return "do not store gate_up_proj and down_proj stacks"
    if not getattr(experts, "has_gate", True):
        return "have no gate (a plain up projection)"
    if getattr(experts, "has_bias", False):
        return "have biases"
    if not getattr(experts, "is_concatenated", True):
        return "interleave the gate and up rows"
    if getattr(experts, "has_post_expert_norm", False):
        return "apply a norm after each expert"
    if getattr(experts, "_is_expert_parallel", False):
        return "are sharded by Transformers' expert-parallel plan"
    return None


def check_supported(experts: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedExpertsError` naming the model family when moefuse cannot run these experts."""
    reason = _unsupported_reason(experts)
    if reason is None:
        return
    model_type = getattr(getattr(experts, "config", None), "model_type", "unknown")
    raise UnsupportedExpertsError(
        f"moefuse cannot run the experts of model type '{model_type}' ({type(experts).__name__}): they {reason}. "
        "moefuse supports gated experts stored as gate_up_proj [E, 2I, H] and down_proj [E, H, I] without bias "
        f"(tested: {', '.join(SUPPORTED_FAMILIES)}); load this model with experts_implementation='grouped_mm'."
    )


def stacked_expert_weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` of an experts module, as the ops take them."""
    gate_up_proj, down_proj = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        # Transposed storage ([E, H, 2I] and [E, I, H]): views, the GEMMs read them through their strides.
        gate_up_proj, down_proj = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    return gate_up_proj, down_proj


# Under torch.compile the experts run eagerly between the compiled graphs (one graph break per layer): Dynamo
# traced through the kernels' launches and routing otherwise, which ran many times slower than eager. A
# ``fullgraph=True`` compile is refused with this reason.
@torch.compiler.disable(reason="moefuse's experts run eagerly under torch.compile (not yet custom operators)")
def moefuse_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Forward of an ``@use_experts_implementation`` experts module through :func:`moefuse.fused_experts`."""
    check_supported(self)
    gate_up_proj, down_proj = stacked_expert_weights(self)
    # The router's topk picks ids in range: no need for the check's host sync on every layer.
    return fused_experts(
        hidden_states,
        gate_up_proj,
        down_proj,
        top_k_index,
        top_k_weights,
        act_fn=self.act_fn,
        check_index_range=False,
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
