"""Operations with autograd, each beside the PyTorch reference it is tested against."""

from .grouped_gemm import moe_fused_linear, moe_fused_linear_reference
from .lora import ExpertsLora, LoraWeights
from .moe import fused_experts, fused_experts_reference
from .routing import ExpertRouting, route, route_reference

__all__ = [
    "ExpertRouting",
    "ExpertsLora",
    "LoraWeights",
    "fused_experts",
    "fused_experts_reference",
    "moe_fused_linear",
    "moe_fused_linear_reference",
    "route",
    "route_reference",
]
