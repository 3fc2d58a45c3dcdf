"""Qwen3-MoE with moefuse experts: the classes handed to LLaMA-Factory's ``custom_model_class``.

They are Transformers' Qwen3-MoE classes with three differences: the experts run through moefuse unless
another ``experts_implementation`` is asked for, ``from_pretrained`` also reads the fused checkpoint
layouts other projects write (see :mod:`moefuse.convert.layouts`), and the causal LM's training loss is
:func:`moefuse.ops.causal_lm_loss`. ``save_pretrained`` writes an ordinary
Qwen3-MoE checkpoint (per-expert Hub layout), which any engine serves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3MoeModel

from ..convert.layouts import Checkpoint, TransformersLayoutView, detect_layout
from ..experts import EXPERTS_IMPLEMENTATION
from ..ops.cross_entropy import causal_lm_loss
from ..ops.rms_norm import use_fused_rms_norm


def _default_to_moefuse(config: Qwen3MoeConfig) -> None:
    if config._experts_implementation is None:
        config._experts_implementation = EXPERTS_IMPLEMENTATION


def _from_pretrained(cls, base, pretrained_model_name_or_path, model_args, kwargs):
    """Load through Transformers; checkpoints in a layout it cannot read go in as a lazy converted view."""
    kwargs.setdefault("experts_implementation", EXPERTS_IMPLEMENTATION)
    path = (
        Path(os.fspath(pretrained_model_name_or_path)) if pretrained_model_name_or_path is not None else None
    )
    if path is None or not path.is_dir() or "state_dict" in kwargs or not any(path.glob("*.safetensors")):
        return base.from_pretrained.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)
    ckpt = Checkpoint.open(path)
    layout = detect_layout(ckpt.shapes)
    if layout not in ("qwen3_moe_fused", "veomni"):
        return base.from_pretrained.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)
    kwargs.setdefault("config", cls.config_class.from_pretrained(path))
    model = base.from_pretrained.__func__(
        cls, None, *model_args, state_dict=TransformersLayoutView(ckpt, layout), **kwargs
    )
    loaded = model[0] if isinstance(model, tuple) else model
    # Transformers records the (here: no) conversions it applied and reverts them on save; forget them so
    # save_pretrained writes the default Hub layout, as for a model loaded from the Hub.
    loaded._weight_conversions = None
    if (path / "generation_config.json").exists() and loaded.can_generate():
        loaded.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _save_as_qwen3_moe(save_directory: str | os.PathLike, base_class_name: str) -> None:
    config_file = Path(save_directory) / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        config["architectures"] = [base_class_name]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class _SwitchableExperts:
    """Transformers allows ``set_experts_implementation`` only when the class's own module source holds
    ``@use_experts_implementation``; the experts here are Transformers' Qwen3-MoE experts, which do use it."""

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True


class Qwen3MoeFusedModel(_SwitchableExperts, Qwen3MoeModel):
    """``Qwen3MoeModel`` whose experts run through moefuse by default, and its RMSNorms through
    :func:`~moefuse.ops.rms_norm` (``use_fused_rms_norm(model, enable=False)`` goes back to their own forward)."""

    def __init__(self, config: Qwen3MoeConfig):
        _default_to_moefuse(config)
        super().__init__(config)
        use_fused_rms_norm(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return _from_pretrained(cls, Qwen3MoeModel, pretrained_model_name_or_path, model_args, kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        _save_as_qwen3_moe(save_directory, "Qwen3MoeModel")


class Qwen3MoeFusedForCausalLM(_SwitchableExperts, Qwen3MoeForCausalLM):
    """``Qwen3MoeForCausalLM`` whose experts run through moefuse by default, loading every known layout; its
    RMSNorms run :func:`~moefuse.ops.rms_norm` and its loss :func:`~moefuse.ops.causal_lm_loss` (same values as
    Transformers', fewer kernels)."""

    def __init__(self, config: Qwen3MoeConfig):
        _default_to_moefuse(config)
        super().__init__(config)
        use_fused_rms_norm(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return _from_pretrained(cls, Qwen3MoeForCausalLM, pretrained_model_name_or_path, model_args, kwargs)

    @property
    def loss_function(self):
        """moefuse's :func:`~moefuse.ops.causal_lm_loss` (Transformers' causal-LM loss, same values, without fp32
        copies of the logits) unless another one was set."""
        return vars(self).get("_loss_function", causal_lm_loss)

    @loss_function.setter
    def loss_function(self, value):
        self._loss_function = value

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        _save_as_qwen3_moe(save_directory, "Qwen3MoeForCausalLM")
