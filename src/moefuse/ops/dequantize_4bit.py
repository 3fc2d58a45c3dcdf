"""Dense copies of 4-bit expert weights (:class:`moefuse.quant.ExpertWeights4bit`) for the grouped GEMMs.

4-bit experts run dequantise-then-GEMM: each projection's stack is dequantised into a transient dense copy (one
Triton kernel on the GPU, PyTorch elsewhere), the dense kernels run on it, and the copy is freed; backward
dequantises again instead of keeping a copy. Kernels that dequantise weight tiles in registers inside the GEMM
were tried and removed: each row tile dequantised its weight tiles again, so they fell further behind this path
as the tokens grew (docs/qlora.md).
"""

from __future__ import annotations

import torch

from ..quant.tensor import ExpertWeights4bit, is_4bit
from .backend import use_triton
from .launch import cdiv, launch

_DEQUANTIZE_BLOCK = 1024  # values per program


def dequantize(
    w: ExpertWeights4bit, dtype: torch.dtype | None = None, *, on_triton: bool | None = None
) -> torch.Tensor:
    """The dense stack of ``w`` (its shape and orientation; ``dtype`` default its compute dtype): on the Triton
    kernel or in PyTorch, as ``on_triton`` says (default: the settings' backend for ``w``'s device)."""
    if not (use_triton(w.packed) if on_triton is None else on_triton):
        return w.dequantize(dtype=dtype)
    from ..kernels.dequantize_4bit import dequantize_4bit_kernel

    experts, out_features, in_features = w.stored_shape
    n = out_features * in_features
    out = torch.empty(experts, out_features, in_features, device=w.device, dtype=dtype or w.dtype)
    if out.numel():
        nested = w.nested
        launch(
            dequantize_4bit_kernel,
            lambda meta: (experts, cdiv(n, meta["BLOCK"])),
            packed_ptr=w.packed,
            absmax_ptr=w.absmax,
            nested_absmax_ptr=w.nested_absmax if nested else w.absmax,
            offset_ptr=w.offset if nested else w.absmax,
            code_ptr=w.code,
            nested_code_ptr=w.nested_code if nested else w.code,
            out_ptr=out,
            n=n,
            stride_pe=w.packed.stride(0),
            stride_ae=w.absmax.stride(0),
            stride_ne=w.nested_absmax.stride(0) if nested else 0,
            stride_oe=out.stride(0),
            BLOCKSIZE=w.blocksize,
            NESTED=nested,
            BLOCK=_DEQUANTIZE_BLOCK,
        )
    return out.transpose(1, 2) if w.transposed else out


def dense(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as the dense Triton kernels take it: a dequantised copy of a 4-bit stack, any other tensor as is."""
    return dequantize(weight, on_triton=True) if is_4bit(weight) else weight
