"""RMSNorm of rows, forward and backward, a block of rows per program, each row whole in registers.

The arithmetic follows Transformers' Llama-style ``RMSNorm`` step by step, roundings included: the row in fp32,
``rstd = rsqrt(mean(x²) + eps)``, ``x * rstd`` rounded to the input's dtype, then times the weight (rounded to
the output's dtype). PyTorch runs that as ~8 kernels forward and ~10 backward, each reading and writing the whole
activation; here it is one kernel each way. The launchers are in :mod:`moefuse.ops.rms_norm`.

- :func:`rms_norm_forward_kernel`: ``y`` and the per-row ``rstd`` (fp32, kept for backward).
- :func:`rms_norm_backward_kernel`: ``dx``, and per program the partial sums of the weight's gradient over the
  rows it visited (one row of a ``[programs, H]`` fp32 buffer, summed after: no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(x_ptr, stride_x, block, rows, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row indices, column indices and mask of row block ``block``, and its rows of ``x`` in fp32."""
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (offs_r < rows)[:, None] & (cols < H)[None, :]
    x = tl.load(x_ptr + offs_r.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    return offs_r, cols, mask, x.to(tl.float32)


# Sizes that follow the batch are not specialised on: one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["rows"])
def rms_norm_forward_kernel(
    # Pointers
    x_ptr,  # [rows, H], unit column stride
    w_ptr,  # [H] the weight
    y_ptr,  # [rows, H] out, unit column stride
    rstd_ptr,  # [rows] fp32 out: each row's rsqrt(mean(x²) + eps), for backward
    # Dimensions
    rows,
    H,
    # Strides
    stride_x,
    stride_y,
    # Scalars
    eps,  # a runtime float: one compiled kernel serves every model's eps
    # Metadata
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_H: tl.constexpr,  # H as a power of two: a row whole in registers
):
    """``y = w * (x * rstd)``, ``rstd = rsqrt(mean(x²) + eps)``, roundings as in Transformers' RMSNorm."""
    offs_r, cols, mask, x = _rows(x_ptr, stride_x, tl.program_id(0), rows, H, BLOCK_R, BLOCK_H)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / H + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = (w[None, :] * normed).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_r.to(tl.int64)[:, None] * stride_y + cols[None, :], y, mask=mask)
    tl.store(rstd_ptr + offs_r, rstd, mask=offs_r < rows)


# Sizes that follow the batch are not specialised on: one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["rows"])
def rms_norm_backward_kernel(
    # Pointers
    dy_ptr,  # [rows, H], unit column stride
    x_ptr,  # [rows, H], unit column stride
    w_ptr,  # [H] the weight
    rstd_ptr,  # [rows] fp32: the forward's
    dx_ptr,  # [rows, H] out, unit column stride
    dw_partial_ptr,  # [programs, H] fp32 out: each program's sum of the weight's gradient (WEIGHT_GRAD)
    # Dimensions
    rows,
    H,
    # Strides
    stride_dy,
    stride_x,
    stride_dx,
    # Metadata
    BLOCK_R: tl.constexpr,  # rows per step
    BLOCK_H: tl.constexpr,  # H as a power of two: a row whole in registers
    WEIGHT_GRAD: tl.constexpr,  # write dw_partial (the weight is trained)
):
    """``dx = rstd * (dn - x * rstd² * mean(dn * x))`` with ``dn = dy * w``; ``dw = sum_rows dy * x * rstd``.

    Programs stride over the row blocks, so the weight's partial sums take one row per program."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(rows, BLOCK_R), programs):
        offs_r, cols, mask, x = _rows(x_ptr, stride_x, block, rows, H, BLOCK_R, BLOCK_H)
        offs_r64 = offs_r.to(tl.int64)[:, None]
        rstd = tl.load(rstd_ptr + offs_r, mask=offs_r < rows, other=0.0)
        dy = tl.load(dy_ptr + offs_r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # y = w * normed: each factor's gradient is formed in y's dtype, normed's then cast to the input's.
        d_normed = (dy * w[None, :]).to(dy_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty).to(tl.float32)
        if WEIGHT_GRAD:
            normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += tl.sum((dy * normed).to(dy_ptr.dtype.element_ty).to(tl.float32), 0)
        # normed = x * rstd(x): dx = rstd * (d_normed - x * rstd² * mean(d_normed * x))
        dot = tl.sum(d_normed * x, 1) / H
        dx = rstd[:, None] * (d_normed - x * (rstd * rstd * dot)[:, None])
        tl.store(dx_ptr + offs_r64 * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WEIGHT_GRAD:
        tl.store(dw_partial_ptr + pid * H + cols, dw, mask=cols < H)
