"""Checkpoint layouts and conversion between them."""

from .layouts import LAYOUTS, Checkpoint, CheckpointError, TransformersLayoutView, detect_layout

__all__ = ["LAYOUTS", "Checkpoint", "CheckpointError", "TransformersLayoutView", "detect_layout"]
