"""A linear layer with one LoRA adapter, ``y = x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ``, as one autograd function.

PEFT computes the adapter's term apart from the base product: the input cast to the adapter's dtype (float32 by
default) and, under autocast, back again; ``lora_B(lora_A(x))``, then ``* scaling`` and ``result + ...`` as two
more passes over the ``[tokens, out]`` output; mirrored in the backward, where the input's gradient comes back
through the same casts and is added to the base product's. Those passes over the activations cost more than the
adapter's own products. Here the input is read in the compute dtype as it is, the scaling is folded into the
small ``B`` (``[out, r]``), and the adapter's product is accumulated onto the base output in the GEMM's epilogue
(``addmm_``); the backward likewise accumulates ``(dY·s·B)·A`` onto ``dY·W``. The factors' gradients come back in
their own dtype. The products run in autocast's dtype where autocast is on, else in the input's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)  # [N, in]; no copy when x is in dtype already
            w, a = weight.to(dtype), lora_a.to(dtype)  # [out, in], [r, in]
            scaled_b = (lora_b * scaling).to(dtype)  # [out, r]
            t = rows @ a.T  # [N, r]
            out = F.linear(rows, w, None if bias is None else bias.to(dtype))
            out.addmm_(t, scaled_b.T)  # + s·t·Bᵀ, accumulated by the GEMM
        ctx.save_for_backward(rows, t, w, a, scaled_b)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        rows, t, w, a, scaled_b = ctx.saved_tensors
        weight_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad_out.reshape(-1, w.shape[0]).to(rows.dtype)  # [N, out]
        dt = g @ scaled_b  # [N, r]
        grads = [None] * 7
        if ctx.needs_input_grad[0]:
            dx = g @ w
            dx.addmm_(dt, a)  # + (dY·s·B)·A, accumulated by the GEMM
            grads[0] = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grads[1] = (g.T @ rows).to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grads[2] = g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(bias_dtype)
        if ctx.needs_input_grad[3]:
            grads[3] = (dt.T @ rows).to(a_dtype)
        if ctx.needs_input_grad[4]:
            grads[4] = torch.mm(g.T, t).to(b_dtype).mul_(ctx.scaling)
        return tuple(grads)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ`` for ``x [..., in]``, ``weight [out, in]``, ``lora_a [r, in]``, ``lora_b
    [out, r]``: PEFT's LoRA ``Linear`` (no dropout), in autocast's dtype where autocast is on, else in ``x``'s
    (every tensor is cast to it; the output is in it)."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling), _compute_dtype(x))


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`lora_linear` (in ``x``'s dtype), for tests."""
    dtype = x.dtype
    lora = F.linear(F.linear(x, lora_a.to(dtype)), lora_b.to(dtype)) * scaling
    return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype)) + lora
