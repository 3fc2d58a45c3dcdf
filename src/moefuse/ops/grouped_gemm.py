"""Grouped GEMM over rows sorted by expert: ``moe_fused_linear`` and its reference.

``output[b, o] = sum_i weight[e(b), o, i] * input[b, i]`` where rows ``b`` are grouped by expert,
``m_sizes[e]`` rows for expert ``e``. Two paths, chosen by :mod:`moefuse.ops.backend`: the Triton kernels
(CUDA by default), and the PyTorch path, which runs everywhere: ``torch.nn.functional.grouped_mm`` where its
layout rules allow it, a per-expert loop otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import device_capability, use_triton

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned base pointers and non-unit strides. Storages start aligned, so the
    offset into the storage decides (readable under torch.compile, unlike ``data_ptr``)."""
    size = t.element_size()
    if (t.storage_offset() * size) % 16:
        return False
    return all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def grouped_mm_supports(*tensors: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` takes these operands (dtype, GPU, alignment)."""
    if not HAS_GROUPED_MM:
        return False
    device, dtype = tensors[0].device, tensors[0].dtype
    # On CUDA the grouped_mm kernels are bf16 on sm80+, and under torch.compile its shape function takes bf16
    # only (the CPU's eager kernel takes any float); other dtypes take the loop.
    if dtype != torch.bfloat16 and (device.type == "cuda" or torch.compiler.is_compiling()):
        return False
    if device.type == "cuda" and device_capability(device.index) < (8, 0):
        return False
    return all(_aligned(t) for t in tensors)


def _offsets(m_sizes: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """grouped_mm's ``offs``: ``offsets`` when the caller has them (``ExpertRouting.offsets``), else each expert's
    end row computed from ``m_sizes``."""
    return torch.cumsum(m_sizes, dim=0, dtype=torch.int32) if offsets is None else offsets


def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, m_sizes: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]`` for ``a [N, k]`` grouped by expert and ``b [E, k, n]``; ``offsets``:
    each expert's end row as int32 (``ExpertRouting.offsets``), else computed from ``m_sizes``."""
    if a.shape[0] == 0:
        return a.new_zeros(0, b.shape[-1])
    if grouped_mm_supports(a, b):
        return F.grouped_mm(a, b, offs=_offsets(m_sizes, offsets))
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for e, m in enumerate(m_sizes.tolist()):
        if m:
            torch.mm(a[start : start + m], b[e], out=out[start : start + m])
        start += m
    return out


def grouped_mm_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, m_sizes: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """``dW[e] = grad_out[rows of e]^T @ x[rows of e]`` → ``[E, out, in]`` (zeros for experts without rows);
    ``offsets`` as for :func:`grouped_mm`."""
    num_experts = m_sizes.numel()
    if grad_out.shape[0] > 0 and grouped_mm_supports(grad_out.t(), x):
        return F.grouped_mm(grad_out.t(), x, offs=_offsets(m_sizes, offsets))
    out = x.new_zeros(num_experts, grad_out.shape[1], x.shape[1])
    start = 0
    for e, m in enumerate(m_sizes.tolist()):
        if m:
            torch.mm(grad_out[start : start + m].t(), x[start : start + m], out=out[e])
        start += m
    return out


class _MoeFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor, on_triton: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, m_sizes)
        ctx.triton = on_triton
        if on_triton:
            from . import triton_gemm

            return triton_gemm.grouped_gemm(x, weight, m_sizes)
        return grouped_mm(x, weight.transpose(1, 2), m_sizes)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, m_sizes = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.triton:
            from . import triton_gemm

            if ctx.needs_input_grad[0]:
                grad_x = triton_gemm.grouped_gemm(grad_out, weight.transpose(1, 2), m_sizes)
            if ctx.needs_input_grad[1]:
                grad_w = triton_gemm.grouped_weight_grad(grad_out, x, m_sizes)
            return grad_x, grad_w, None, None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad_out, weight, m_sizes)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_mm_weight_grad(grad_out, x, m_sizes)
        return grad_x, grad_w, None, None


def check_grouped_inputs(x: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor) -> None:
    """Clear errors for the inputs of :func:`moe_fused_linear`."""
    if x.dim() != 2:
        raise ValueError(f"input must be 2-D [rows, in_features], got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(
            f"weight must be 3-D [experts, out_features, in_features], got shape {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"input has {x.shape[1]} features but weight {tuple(weight.shape)} expects in_features={weight.shape[2]}"
        )
    if not x.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise TypeError(f"input and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if m_sizes.dim() != 1 or m_sizes.numel() != weight.shape[0]:
        raise ValueError(
            f"m_sizes must be 1-D with one count per expert ({weight.shape[0]}), got {tuple(m_sizes.shape)}"
        )
    if m_sizes.dtype.is_floating_point or m_sizes.dtype == torch.bool:
        raise TypeError(f"m_sizes must be an integer tensor, got {m_sizes.dtype}")
    if x.device != weight.device or m_sizes.device != weight.device:
        raise ValueError(
            f"input, weight and m_sizes must share a device, got {x.device}, {weight.device}, {m_sizes.device}"
        )
    if m_sizes.device.type == "cpu":
        total = int(m_sizes.sum())
        if total != x.shape[0] or bool((m_sizes < 0).any()):
            raise ValueError(
                f"m_sizes must be non-negative and sum to the {x.shape[0]} input rows, got sum {total}"
            )


def moe_fused_linear(
    input: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor, *, on_triton: bool | None = None
) -> torch.Tensor:
    """Per-expert linear layer on rows grouped by expert.

    Args:
        input: ``[N, in]`` rows sorted by expert.
        weight: ``[E, out, in]`` one weight matrix per expert.
        m_sizes: ``[E]`` integer row counts, summing to ``N``.
        on_triton: run on the Triton kernels (an experts plan's backend); default: the settings' backend.

    Returns:
        ``[N, out]`` in ``weight``'s dtype (``input`` is cast to it, as under autocast).
    """
    check_grouped_inputs(input, weight, m_sizes)
    on_triton = use_triton(input) if on_triton is None else on_triton
    return _MoeFusedLinear.apply(input.to(weight.dtype), weight, m_sizes, on_triton)


def moe_fused_linear_reference(
    input: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor
) -> torch.Tensor:
    """Per-expert loop with ``F.linear`` (autograd through PyTorch), the twin every kernel is tested against."""
    outputs = []
    start = 0
    for e, m in enumerate(m_sizes.tolist()):
        outputs.append(F.linear(input[start : start + m], weight[e]))
        start += m
    if not outputs:
        return input.new_zeros(input.shape[0], weight.shape[1])
    return torch.cat(outputs, dim=0)
