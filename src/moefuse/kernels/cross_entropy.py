"""Cross-entropy of logits rows: one program per row, streaming the vocabulary in blocks.

- :func:`cross_entropy_forward_kernel`: per row ``lse = logsumexp(x)`` (online, in fp32) and
  ``loss = lse - x[target]`` (0 where the target is ``ignore_index``).
- :func:`cross_entropy_backward_kernel`: ``dx = (softmax(x) - onehot(target)) * dloss``, from the saved ``lse``,
  written in the logits' dtype.

Each pass reads the logits once in their own dtype (bf16: 2 bytes an element), where an fp32 upcast, an fp32
log-softmax and its backward move 5-6 times that. The launchers are in :mod:`moefuse.ops.cross_entropy`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row(logits_ptr, target_ptr, stride_row, ignore_index):
    """This program's row: its index, its logits, its target (int64) and whether it counts (not ignored)."""
    row = tl.program_id(0)
    target = tl.load(target_ptr + row).to(tl.int64)
    return row, logits_ptr + row.to(tl.int64) * stride_row, target, target != ignore_index


@triton.jit
def cross_entropy_forward_kernel(
    # Pointers
    logits_ptr,  # [rows, V], unit column stride
    target_ptr,  # [rows] integer
    loss_ptr,  # [rows] fp32 out
    lse_ptr,  # [rows] fp32 out: logsumexp of each row, for backward
    # Dimensions
    V,  # the vocabulary
    # Strides
    stride_row,
    # Scalars
    ignore_index,  # the target of a row that adds no loss
    # Metadata
    BLOCK_V: tl.constexpr,  # columns per step
):
    """``loss[r] = logsumexp(x[r]) - x[r, target[r]]`` (0 where ``target[r] == ignore_index``), one row a program."""
    row, row_ptr, target, valid = _row(logits_ptr, target_ptr, stride_row, ignore_index)
    cols = tl.arange(0, BLOCK_V)
    # Per lane: the running maximum and the sum of exp(x - maximum). Lanes that have seen only -inf (the tail
    # past V, or -inf logits) keep sum 0; `shift` keeps them away from (-inf) - (-inf).
    lane_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
        lane_max = new_max
    row_max = tl.max(lane_max, 0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), 0))

    in_range = (target >= 0) & (target < V)
    # A target outside the vocabulary gives a NaN loss instead of reading out of bounds (a check on the host
    # would cost a synchronisation per step).
    picked = tl.load(row_ptr + target, mask=valid & in_range, other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def cross_entropy_backward_kernel(
    # Pointers
    logits_ptr,  # [rows, V], unit column stride
    target_ptr,  # [rows] integer
    lse_ptr,  # [rows] fp32: the forward's
    grad_loss_ptr,  # [rows] the loss's gradient, any stride
    grad_ptr,  # [rows, V] out, unit column stride
    # Dimensions
    V,  # the vocabulary
    # Strides
    stride_row,
    stride_grad_row,
    stride_grad_loss,
    # Scalars
    ignore_index,  # the target of a row that adds no loss
    # Metadata
    BLOCK_V: tl.constexpr,  # columns per step
):
    """``dx[r] = (softmax(x[r]) - onehot(target[r])) * dloss[r]`` (0 where ignored), one row a program."""
    row, row_ptr, target, valid = _row(logits_ptr, target_ptr, stride_row, ignore_index)
    grad_row_ptr = grad_ptr + row.to(tl.int64) * stride_grad_row
    lse = tl.load(lse_ptr + row)
    scale = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32)
    scale = tl.where(valid, scale, 0.0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
        tl.store(grad_row_ptr + offs, (p * scale).to(grad_ptr.dtype.element_ty), mask=mask)
