"""Model classes with moefuse experts, one module per family."""

from .qwen3_moe import Qwen3MoeFusedForCausalLM, Qwen3MoeFusedModel

__all__ = ["Qwen3MoeFusedForCausalLM", "Qwen3MoeFusedModel"]
