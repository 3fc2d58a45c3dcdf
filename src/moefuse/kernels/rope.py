"""Rotary position embedding of queries and keys, forward and backward, one kernel each way for both.

``out = x * cos + rotate_half(x) * sin`` per head, as Transformers' ``apply_rotary_pos_emb`` computes it, with
``rotate_half(x) = [-x2, x1]`` for the halves ``x1, x2`` of the head dim. In halves:
``out1 = x1·c1 - x2·s1``, ``out2 = x2·c2 + x1·s2``; its gradient is ``dx1 = g1·c1 + g2·s2``,
``dx2 = g2·c2 - g1·s1``. PyTorch runs the forward as ~10 kernels (slices, a negation, a concatenation, products
and sums, for q and for k) reading and writing each activation several times; here one program per token reads
its cos and sin once and rotates every query and key head of that token. The launcher is in
:mod:`moefuse.ops.rope`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    base_x,
    base_out,
    heads,
    stride_xh,
    stride_oh,
    c1,
    c2,
    s1,
    s2,
    BACKWARD: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    """Rotate the ``heads`` heads of one token, a block of heads at a time: head ``h``'s ``[2 * HALF]`` values
    at ``x_ptr + base_x + h * stride_xh`` (unit stride), written at ``out_ptr + base_out + h * stride_oh``;
    ``c1, c2, s1, s2`` are the token's cos and sin halves, ``[HALF]`` each in fp32."""
    cols = tl.arange(0, HALF)
    for start in range(0, heads, BLOCK_HEADS):
        offs_h = start + tl.arange(0, BLOCK_HEADS)
        mask = (offs_h < heads)[:, None]
        x_rows = x_ptr + base_x + offs_h.to(tl.int64)[:, None] * stride_xh + cols[None, :]
        x1 = tl.load(x_rows, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            out1 = x1 * c1 + x2 * s2
            out2 = x2 * c2 - x1 * s1
        else:
            out1 = x1 * c1 - x2 * s1
            out2 = x2 * c2 + x1 * s2
        out_rows = out_ptr + base_out + offs_h.to(tl.int64)[:, None] * stride_oh + cols[None, :]
        tl.store(out_rows, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_rows + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)


# The sequence length follows the batch: not specialised on, one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["seq_len"])
def rope_kernel(
    # Pointers
    q_ptr,  # [B, Hq, S, D] queries (or their gradient), unit stride along D
    k_ptr,  # [B, Hk, S, D] keys (or their gradient), unit stride along D
    cos_ptr,  # [B or 1, S, D], unit stride along D
    sin_ptr,  # [B or 1, S, D], unit stride along D
    q_out_ptr,  # [B, Hq, S, D] out, unit stride along D
    k_out_ptr,  # [B, Hk, S, D] out, unit stride along D
    # Dimensions (the grid is one program per token: B * S)
    seq_len,  # S
    q_heads,  # Hq
    k_heads,  # Hk
    # Strides
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_cb,  # 0 where cos and sin are broadcast over the batch
    stride_cs,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    # Metadata
    BACKWARD: tl.constexpr,  # the gradient (the transposed rotation) instead of the rotation
    BLOCK_HEADS: tl.constexpr,  # heads rotated at once
    HALF: tl.constexpr,  # D / 2, a power of two
):
    """``out = x * cos + rotate_half(x) * sin`` for q and k at one token (program), or its gradient."""
    token = tl.program_id(0)
    b = token // seq_len
    s = token % seq_len
    cols = tl.arange(0, HALF)
    trig = b.to(tl.int64) * stride_cb + s.to(tl.int64) * stride_cs + cols
    c1 = tl.load(cos_ptr + trig).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + trig + HALF).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + trig).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + trig + HALF).to(tl.float32)[None, :]
    b64, s64 = b.to(tl.int64), s.to(tl.int64)
    _rotate_heads(
        q_ptr, q_out_ptr, b64 * stride_qb + s64 * stride_qs, b64 * stride_qob + s64 * stride_qos, q_heads,
        stride_qh, stride_qoh, c1, c2, s1, s2, BACKWARD, BLOCK_HEADS, HALF,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, b64 * stride_kb + s64 * stride_ks, b64 * stride_kob + s64 * stride_kos, k_heads,
        stride_kh, stride_koh, c1, c2, s1, s2, BACKWARD, BLOCK_HEADS, HALF,
    )  # fmt: skip
