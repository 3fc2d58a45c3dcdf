"""4-bit experts (QLoRA): bitsandbytes' NF4/FP4 blockwise format for fused expert stacks.

:class:`ExpertWeights4bit` holds an ``[E, out, in]`` stack, each expert quantized exactly as bitsandbytes'
``quantize_4bit`` quantizes it; the moefuse experts ops run their grouped GEMMs straight on it.
:func:`quantize_experts` quantizes a model's experts in place, :func:`from_pretrained` loads a checkpoint with
4-bit experts (and bitsandbytes 4-bit linear layers), :func:`save_pretrained` writes such a model for reloading.
"""

from .model import from_pretrained, quantize_experts, save_pretrained
from .tensor import ExpertWeights4bit, is_4bit

__all__ = ["ExpertWeights4bit", "from_pretrained", "is_4bit", "quantize_experts", "save_pretrained"]
