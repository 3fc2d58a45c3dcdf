"""The experts' grouped GEMMs on 4-bit weights (:class:`moefuse.quant.ExpertWeights4bit`), frozen.

:func:`moefuse.fused_experts` takes 4-bit ``gate_up_proj`` / ``down_proj`` as it takes dense ones: the Triton
path dequantises each stack for the GEMMs that read it (:func:`moefuse.ops.dequantize_4bit.dense`); the composed
path (PyTorch backend, several LoRA adapters) projects through :func:`moe_fused_linear_4bit`. Backward gives the
input gradient only: 4-bit weights are not trained (LoRA adapters on top are), and what is saved for backward is
the 4-bit tensor itself, never a dense copy.
"""

from __future__ import annotations

import torch

from ..quant.tensor import ExpertWeights4bit, is_4bit
from .backend import use_triton
from .dequantize_4bit import dequantize
from .grouped_gemm import check_grouped_inputs, grouped_mm, moe_fused_linear


def check_frozen(name: str, weight: torch.Tensor) -> None:
    """4-bit weights cannot take a gradient: a clear error instead of a dense one nobody can apply."""
    if is_4bit(weight) and weight.requires_grad:
        raise ValueError(
            f"{name} is 4-bit (moefuse.quant) and requires grad; 4-bit expert weights are frozen: set "
            "requires_grad=False and train LoRA adapters on top (moefuse.lora / PEFT)"
        )


def _project(x: torch.Tensor, weight: ExpertWeights4bit, m_sizes: torch.Tensor, triton: bool) -> torch.Tensor:
    """``x[rows of e] @ weight[e]ᵀ`` for 4-bit ``weight`` (logical ``[E, N, K]``, maybe a transposed view), on a
    dense copy for this call only."""
    if triton:
        from . import triton_gemm

        return triton_gemm.grouped_gemm(x, dequantize(weight, on_triton=True), m_sizes)
    return grouped_mm(x, weight.dequantize().transpose(1, 2), m_sizes)


class _MoeFusedLinear4bit(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: ExpertWeights4bit, m_sizes: torch.Tensor, on_triton: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, m_sizes)
        ctx.triton = on_triton
        return _project(x, weight, m_sizes, on_triton)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, m_sizes = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _project(grad_out.contiguous(), weight.transpose(1, 2), m_sizes, ctx.triton)
        return grad_x, None, None, None


def moe_fused_linear_4bit(
    input: torch.Tensor, weight: ExpertWeights4bit, m_sizes: torch.Tensor, *, on_triton: bool | None = None
) -> torch.Tensor:
    """:func:`moefuse.moe_fused_linear` on a frozen 4-bit ``weight [E, out, in]``: ``[N, out]`` in its compute
    dtype, differentiable in ``input`` only."""
    check_grouped_inputs(input, weight, m_sizes)
    check_frozen("weight", weight)
    on_triton = use_triton(input) if on_triton is None else on_triton
    return _MoeFusedLinear4bit.apply(input.to(weight.dtype), weight, m_sizes, on_triton)


def grouped_linear(
    input: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor, *, on_triton: bool | None = None
) -> torch.Tensor:
    """:func:`moe_fused_linear_4bit` for 4-bit weights, :func:`moefuse.moe_fused_linear` otherwise."""
    if is_4bit(weight):
        return moe_fused_linear_4bit(input, weight, m_sizes, on_triton=on_triton)
    return moe_fused_linear(input, weight, m_sizes, on_triton=on_triton)
