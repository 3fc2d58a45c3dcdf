"""PEFT's LoRA layer over bitsandbytes' ``Linear4bit`` (QLoRA's attention), its plain case on
:func:`moefuse.ops.lora_linear.lora_linear`: the NF4/FP4 weight dequantised by bitsandbytes in the forward and
again in the backward, as bitsandbytes' own ``matmul_4bit`` does, and the adapter's product accumulated onto the
base product (PEFT clones the base output, then scales and adds the adapter's in two more passes). Everything else
(merging, saving, dropout in training, variants) is PEFT's ``Linear4bit``. Imports bitsandbytes.
"""

from __future__ import annotations

import functools

import bitsandbytes as bnb
from peft.tuners.lora.bnb import Linear4bit

from .linear import PlainCase, same_dtypes


class LoraLinear4bit(PlainCase, Linear4bit):
    """PEFT's LoRA ``Linear4bit``, whose plain case runs as one autograd function."""

    def _operands(self, x, a, b):
        base = self.get_base_layer()
        state = getattr(base.weight, "quant_state", None)
        # bitsandbytes sets the compute dtype and recovers a lost quant state on a layer's first forward: PEFT's
        # forward runs until both are there.
        if state is None or base.compute_dtype is None or not same_dtypes(x, base.compute_dtype, a, b):
            return None
        return base.weight, base.bias, functools.partial(bnb.functional.dequantize_4bit, quant_state=state)
