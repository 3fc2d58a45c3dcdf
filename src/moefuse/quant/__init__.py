"""4-bit experts (QLoRA): bitsandbytes' NF4/FP4 blockwise format for fused expert stacks.

:class:`ExpertWeights4bit` holds an ``[E, out, in]`` stack, each expert quantized exactly as bitsandbytes'
``quantize_4bit`` quantizes it; the moefuse experts ops run their grouped GEMMs straight on it.
"""

from .tensor import ExpertWeights4bit, is_4bit

__all__ = ["ExpertWeights4bit", "is_4bit"]
