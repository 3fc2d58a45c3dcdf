"""Operations with autograd, each beside the PyTorch reference it is tested against."""

from .cross_entropy import causal_lm_loss, cross_entropy_rows, use_chunked_loss
from .grouped_gemm import moe_fused_linear, moe_fused_linear_reference
from .lora import ExpertsLora, LoraWeights
from .moe import fused_experts, fused_experts_reference
from .rms_norm import rms_norm, rms_norm_reference, use_fused_rms_norm
from .rope import apply_rotary_pos_emb, fused_rope, rope_reference
from .routing import ExpertRouting, route, route_reference

__all__ = [
    "ExpertRouting",
    "ExpertsLora",
    "LoraWeights",
    "apply_rotary_pos_emb",
    "causal_lm_loss",
    "cross_entropy_rows",
    "fused_experts",
    "fused_experts_reference",
    "fused_rope",
    "moe_fused_linear",
    "moe_fused_linear_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_reference",
    "route",
    "route_reference",
    "use_chunked_loss",
    "use_fused_rms_norm",
]
