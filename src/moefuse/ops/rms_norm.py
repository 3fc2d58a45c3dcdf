"""RMSNorm as Transformers' Llama-style models compute it, in one kernel each way on the Triton backend.

``rms_norm(x, weight, eps)`` equals ``weight * (x.float() * rsqrt(mean(x.float()²) + eps)).to(x.dtype)``, the
forward of ``Qwen3MoeRMSNorm`` and its siblings, roundings included, and so does its gradient. PyTorch runs that
as ~8 elementwise and reduction kernels forward and ~10 backward over the whole activation; a Qwen3-MoE decoder
layer has four of them (two on the hidden states, the per-head q and k norms). On the Triton backend
(:mod:`moefuse.kernels.rms_norm`) each way is one kernel reading and writing the rows once; elsewhere
:func:`rms_norm_reference` runs (PyTorch ops, the formula above). :func:`use_fused_rms_norm` switches a model's
norm modules to it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .backend import launches_triton
from .launch import cdiv, launch, next_power_of_2, unit_columns

# Widest row kept whole in registers; wider rows take the PyTorch path.
MAX_FUSED_WIDTH = 16384
# Elements a program holds per tensor: rows per program = this / the row's width (power of two).
_BLOCK_ELEMENTS = 4096

# Norm modules whose forward is the Llama-style formula above: those of the families moefuse runs (each tested
# against its own forward).
RMS_NORM_CLASSES = frozenset({"Qwen3MoeRMSNorm", "Qwen2MoeRMSNorm", "MixtralRMSNorm", "OlmoeRMSNorm"})


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' Llama-style RMSNorm in PyTorch ops (differentiable)."""
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@functools.cache
def _programs_per_sm(device_index: int) -> int:
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _blocks(width: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_H, num_warps)`` for rows of ``width``."""
    block_h = next_power_of_2(width)
    block_r = max(1, _BLOCK_ELEMENTS // block_h)
    return block_r, block_h, 8 if block_h >= 4096 else 4


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, width]`` with unit column stride (a view when it can be)."""
    return unit_columns(x.reshape(-1, x.shape[-1]))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows2 = _rows_of(x)
        rows, width = rows2.shape
        y = torch.empty(rows, width, device=x.device, dtype=torch.result_type(weight, x))
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block_r, block_h, warps = _blocks(width)
        if rows:
            launch(
                _kernels().rms_norm_forward_kernel,
                lambda meta: (cdiv(rows, block_r),),
                x_ptr=rows2,
                w_ptr=weight,
                y_ptr=y,
                rstd_ptr=rstd,
                rows=rows,
                H=width,
                stride_x=rows2.stride(0),
                stride_y=y.stride(0),
                eps=eps,
                BLOCK_R=block_r,
                BLOCK_H=block_h,
                num_warps=warps,
            )
        ctx.save_for_backward(rows2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        rows2, weight, rstd = ctx.saved_tensors
        rows, width = rows2.shape
        dy = _rows_of(grad_y)
        dx = torch.empty_like(rows2, memory_format=torch.contiguous_format)
        weight_grad = ctx.needs_input_grad[1]
        block_r, block_h, warps = _blocks(width)
        programs = max(1, min(cdiv(rows, block_r), _programs(rows2)))
        # A frozen weight has no partial sums: the kernel never writes them, so dx stands in for the pointer.
        dw_partial = (
            torch.empty(programs, width, device=dy.device, dtype=torch.float32) if weight_grad else dx
        )
        if rows:
            launch(
                _kernels().rms_norm_backward_kernel,
                lambda meta: (programs,),
                dy_ptr=dy,
                x_ptr=rows2,
                w_ptr=weight,
                rstd_ptr=rstd,
                dx_ptr=dx,
                dw_partial_ptr=dw_partial,
                rows=rows,
                H=width,
                stride_dy=dy.stride(0),
                stride_x=rows2.stride(0),
                stride_dx=dx.stride(0),
                BLOCK_R=block_r,
                BLOCK_H=block_h,
                WEIGHT_GRAD=weight_grad,
                num_warps=warps,
            )
        grad_weight = None
        if weight_grad:
            grad_weight = (dw_partial.sum(0) if rows else weight.new_zeros(width, dtype=torch.float32)).to(
                weight.dtype
            )
        return dx.view(ctx.x_shape), grad_weight, None


def _kernels():
    from ..kernels import rms_norm

    return rms_norm


def _programs(x: torch.Tensor) -> int:
    """Programs of the backward: a few per SM (each then sums the weight's gradient over many row blocks)."""
    return _programs_per_sm(x.device.index or 0) if x.is_cuda else 4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` with ``weight [width]``, as Transformers' Llama-style norms compute it
    (output dtype: ``weight``'s and ``x``'s promoted). One Triton kernel each way on the Triton backend (rows up
    to :data:`MAX_FUSED_WIDTH` wide, eager), :func:`rms_norm_reference` otherwise and under torch.compile."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight must be [width] = [{x.shape[-1]}] for x of shape {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if x.shape[-1] <= MAX_FUSED_WIDTH and launches_triton(x):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def use_fused_rms_norm(model: nn.Module, enable: bool = True) -> int:
    """Run every Llama-style RMSNorm module of ``model`` (a Transformers model, or a PEFT model around one;
    classes in :data:`RMS_NORM_CLASSES`) through :func:`rms_norm` (``enable=False``: back to their own forward).
    Returns how many modules were switched. Weights and state dicts are untouched."""
    switched = 0
    for module in model.modules():
        if type(module).__name__ not in RMS_NORM_CLASSES:
            continue
        if enable:
            module.forward = _fused_forward.__get__(module)
        else:
            vars(module).pop("forward", None)
        switched += 1
    return switched
