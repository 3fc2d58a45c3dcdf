"""moefuse: fast, small fine-tuning of Mixture-of-Experts models inside the Hugging Face ecosystem.

``import moefuse`` registers the experts implementation ``"moefuse"`` in Transformers, so any MoE model whose
experts use ``@use_experts_implementation`` can run on it:
``AutoModelForCausalLM.from_pretrained(path, experts_implementation="moefuse")``. It registers the attention
implementation ``"moefuse_varlen"`` too: causal attention within each sequence of packed rows
(``attn_implementation="moefuse_varlen"``, see ``moefuse.attention``).
"""

from . import attention, lora
from ._version import package_version
from .convert import (
    convert_lora,
    convert_lora_to_fused,
    convert_lora_to_unfused,
    convert_model,
    convert_model_to_fused,
    convert_model_to_unfused,
    convert_optimizer_state,
)
from .experts import EXPERTS_IMPLEMENTATION, UnsupportedExpertsError, register
from .models import Qwen3MoeFusedForCausalLM, Qwen3MoeFusedModel
from .ops import fused_experts, moe_fused_linear

__version__ = package_version()

register()
attention.register()
lora.install()  # PEFT's target_modules reach the experts by gate_proj/up_proj/down_proj

__all__ = [
    "convert_lora",
    "convert_lora_to_fused",
    "convert_lora_to_unfused",
    "convert_model",
    "convert_model_to_fused",
    "convert_model_to_unfused",
    "convert_optimizer_state",
    "EXPERTS_IMPLEMENTATION",
    "Qwen3MoeFusedForCausalLM",
    "Qwen3MoeFusedModel",
    "UnsupportedExpertsError",
    "fused_experts",
    "moe_fused_linear",
]
