"""LoRA on fused experts through PEFT.

After ``import moefuse``, PEFT's ``get_peft_model(model, LoraConfig(target_modules=[..., "gate_proj", "up_proj",
"down_proj"]))`` puts per-expert LoRA on the experts of models that run on moefuse (see
:mod:`moefuse.lora.targets`), beside ordinary PEFT LoRA on attention, router or shared experts. Adapters save as
``<...>.mlp.experts.{gate_proj|up_proj|down_proj}.lora_A.weight [E, r, in]`` / ``.lora_B.weight [E, out, r]``.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel
from peft import get_peft_model as _peft_get_peft_model
from transformers import PreTrainedModel

from .layer import ExpertsLoraLayer
from .targets import install

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The experts' projections lora_config targets by default: gate and up apart, as PEFT on per-expert experts.
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def lora_config(
    r: int = 16,
    lora_alpha: float | None = None,
    *,
    target_modules: list[str] | str | None = None,
    **kwargs: Any,
) -> LoraConfig:
    """A ``LoraConfig`` for attention + experts: ``target_modules`` defaults to the attention projections and
    ``gate_proj``/``up_proj``/``down_proj`` (the experts, and dense or shared MLPs where the model has them);
    ``lora_alpha`` defaults to ``2 * r``. Other keyword arguments go to ``LoraConfig`` unchanged."""
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        target_modules=list(ATTENTION_PROJECTIONS + EXPERT_PROJECTIONS)
        if target_modules is None
        else target_modules,
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        **kwargs,
    )


def get_peft_model(model: PreTrainedModel, r: int = 16, **kwargs: Any) -> PeftModel:
    """One call for "LoRA r on attention + experts": ``peft.get_peft_model(model, lora_config(r, **kwargs))``.

    The model's experts must run on moefuse (``experts_implementation="moefuse"``, the default of
    ``moefuse.Qwen3MoeFusedForCausalLM``); otherwise PEFT warns and only the other targets get LoRA.
    """
    return _peft_get_peft_model(model, lora_config(r, **kwargs))


__all__ = [
    "ATTENTION_PROJECTIONS",
    "EXPERT_PROJECTIONS",
    "ExpertsLoraLayer",
    "get_peft_model",
    "install",
    "lora_config",
]
