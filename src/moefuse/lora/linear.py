"""PEFT's LoRA ``Linear`` with its common case on :func:`moefuse.ops.lora_linear.lora_linear`.

:class:`LoraLinear` is PEFT's own layer (same adapter weights, state-dict keys, merging, saving): only its forward
differs, and only where one plain adapter is active (no dropout in training, no DoRA or other variant, no LoRA
bias, not merged, weights as ``[out, in]``); every other case runs PEFT's forward. PEFT builds it where a LoRA
config carries :func:`use_fused_lora_linear`'s registration, for ``nn.Linear`` layers themselves, and
:class:`~moefuse.lora.linear_4bit.LoraLinear4bit` (PEFT's layer over bitsandbytes' ``Linear4bit``, the weight
dequantised in the forward and again in the backward) for QLoRA's 4-bit linear layers.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear
from torch import nn

from ..ops.lora_linear import Dequantize, lora_linear


class _ExactType(type):
    def __instancecheck__(cls, instance: object) -> bool:
        return type(instance) is nn.Linear


class PlainLinear(metaclass=_ExactType):
    """``isinstance(m, PlainLinear)``: ``m`` is an ``nn.Linear`` itself, not a subclass (PEFT matches its custom
    modules by ``isinstance``)."""


class PlainCase:
    """The forward of a PEFT LoRA layer whose plain case runs on :func:`lora_linear` (mixed in before PEFT's
    layer class, whose forward runs every other case). Subclasses give :meth:`_operands`."""

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

    def _operands(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, Dequantize | None] | None:
        """``(weight, bias, dequantize)`` of the base layer for :func:`lora_linear`, or ``None`` where PEFT's
        forward must run."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._plain_adapter(args, kwargs)
        if name is not None:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            operands = self._operands(x, a, b)
            if operands is not None:
                weight, bias, dequantize = operands
                return lora_linear(x, weight, bias, a, b, self.scaling[name], dequantize)
        return super().forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "moefuse." + super().__repr__()


def same_dtypes(x: torch.Tensor, weight_dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the fused path computes what PEFT would: under autocast (which sets the dtype of every product), or
    with the input, weight and factors in one dtype (PEFT promotes mixed dtypes without autocast)."""
    return torch.is_autocast_enabled(x.device.type) or x.dtype == weight_dtype == a.dtype == b.dtype


class LoraLinear(PlainCase, Linear):
    """PEFT's LoRA ``Linear`` over an ``nn.Linear``, whose plain case runs as one autograd function (see the
    module's docstring)."""

    def _operands(self, x, a, b):
        base = self.get_base_layer()
        if type(base) is not nn.Linear or not same_dtypes(x, base.weight.dtype, a, b):
            return None
        return base.weight, base.bias, None


def use_fused_lora_linear(config: LoraConfig) -> LoraConfig:
    """Have PEFT build :class:`LoraLinear` for the ``nn.Linear`` layers ``config`` targets, and
    :class:`~moefuse.lora.linear_4bit.LoraLinear4bit` for bitsandbytes' ``Linear4bit`` ones (the registration
    lives on this config object only and is not saved with it). Returns ``config``."""
    config._register_custom_module({PlainLinear: LoraLinear})
    # A model with bitsandbytes' layers has imported it; importing it for any other costs a second at start.
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        from .linear_4bit import LoraLinear4bit

        config._register_custom_module({bnb.nn.Linear4bit: LoraLinear4bit})
    return config
