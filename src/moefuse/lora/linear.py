"""PEFT's LoRA ``Linear`` with its common case on :func:`moefuse.ops.lora_linear.lora_linear`.

:class:`LoraLinear` is PEFT's own layer (same adapter weights, state-dict keys, merging, saving): only its forward
differs, and only where one plain adapter is active (no dropout in training, no DoRA or other variant, no LoRA
bias, not merged, ``nn.Linear`` weights as ``[out, in]``); every other case runs PEFT's forward. PEFT builds it
where a LoRA config carries :func:`use_fused_lora_linear`'s registration, for ``nn.Linear`` layers themselves
(bitsandbytes' quantized linear layers subclass ``nn.Linear`` and keep PEFT's own layers).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear
from torch import nn

from ..ops.lora_linear import lora_linear


class _ExactType(type):
    def __instancecheck__(cls, instance: object) -> bool:
        return type(instance) is nn.Linear


class PlainLinear(metaclass=_ExactType):
    """``isinstance(m, PlainLinear)``: ``m`` is an ``nn.Linear`` itself, not a subclass (PEFT matches its custom
    modules by ``isinstance``)."""


class LoraLinear(Linear):
    """PEFT's LoRA ``Linear``, whose plain case runs as one autograd function (see the module's docstring)."""

    def _plain_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when this call is the plain case, else ``None``."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        dropout = self.lora_dropout[name]
        if name in self.lora_variant or self.lora_bias.get(name, False):
            return None
        if not (
            isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and not dropout.training)
        ):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._plain_adapter(args, kwargs)
        base = self.get_base_layer()
        if name is None or type(base) is not nn.Linear:
            return super().forward(x, *args, **kwargs)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if (
            not torch.is_autocast_enabled(x.device.type)
            and not x.dtype == base.weight.dtype == a.dtype == b.dtype
        ):
            return super().forward(x, *args, **kwargs)  # PEFT's mixed-dtype promotion without autocast
        return lora_linear(x, base.weight, base.bias, a, b, self.scaling[name])

    def __repr__(self) -> str:
        return "moefuse." + super().__repr__()


def use_fused_lora_linear(config: LoraConfig) -> LoraConfig:
    """Have PEFT build :class:`LoraLinear` for the ``nn.Linear`` layers ``config`` targets (the registration lives
    on this config object only and is not saved with it). Returns ``config``."""
    config._register_custom_module({PlainLinear: LoraLinear})
    return config
