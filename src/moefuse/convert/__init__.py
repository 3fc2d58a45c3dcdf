"""Checkpoint layouts and streaming, lossless conversion between them: models, LoRA adapters, optimizer states."""

from .checkpoint import Checkpoint, CheckpointError
from .layouts import (
    FUSED_LAYOUTS,
    LAYOUTS,
    LORA_LAYOUTS,
    TransformersLayoutView,
    detect_layout,
    detect_lora_layout,
)
from .lora import convert_lora, convert_lora_to_fused, convert_lora_to_unfused
from .model import convert_model, convert_model_to_fused, convert_model_to_unfused
from .optimizer import convert_optimizer_state, optimizer_param_names

__all__ = [
    "FUSED_LAYOUTS",
    "LAYOUTS",
    "LORA_LAYOUTS",
    "Checkpoint",
    "CheckpointError",
    "TransformersLayoutView",
    "convert_lora",
    "convert_lora_to_fused",
    "convert_lora_to_unfused",
    "convert_model",
    "convert_model_to_fused",
    "convert_model_to_unfused",
    "convert_optimizer_state",
    "detect_layout",
    "detect_lora_layout",
    "optimizer_param_names",
]
