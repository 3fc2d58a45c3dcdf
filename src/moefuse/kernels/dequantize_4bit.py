"""Triton kernel that dequantises a stack of 4-bit expert weights (bitsandbytes' NF4/FP4 blockwise format).

``out[e].flat[i] = code[nibble(e, i)] * absmax[e, i // BLOCKSIZE]``, the absmax itself from the nested statistics
when they are there: ``absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + offset[e]``.

Each expert's matrix ``W [out, in]`` is stored flat (``out * in`` values, row-major, two per byte, high nibble
first). The 4-bit experts run dequantise-then-GEMM: one projection's stack is dequantised into a transient dense
copy, the dense grouped GEMM runs on it, and the copy is freed (see :mod:`moefuse.ops.dequantize_4bit`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _absmax(absmax_ptr, nested_absmax_ptr, offset, nested_code_ptr, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of the blocks ``block`` (pointers at this expert), zero outside ``mask``."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        scale += offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def dequantize_4bit_kernel(
    # Pointers
    packed_ptr,  # [E, n / 2] uint8: two 4-bit codes per byte, high nibble first
    absmax_ptr,  # [E, n / BLOCKSIZE] fp32, or uint8 indices into nested_code when NESTED
    nested_absmax_ptr,  # [E, blocks / 256] fp32 (NESTED only; else never read)
    offset_ptr,  # [E] fp32 (NESTED only; else never read)
    code_ptr,  # [16] fp32: the NF4 or FP4 code book
    nested_code_ptr,  # [256] fp32 (NESTED only; else never read)
    out_ptr,  # [E, n] in the compute dtype
    # Dimensions
    n,  # values per expert: out * in
    # Strides
    stride_pe,
    stride_ae,
    stride_ne,
    stride_oe,
    # Metadata
    BLOCKSIZE: tl.constexpr,  # values per absmax block
    NESTED: tl.constexpr,  # absmax is itself 8-bit quantised
    BLOCK: tl.constexpr,  # values per program
):
    """Program ``(e, j)`` writes values ``j * BLOCK ...`` of expert ``e``."""
    e = tl.program_id(0).to(tl.int64)
    flat = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    byte = tl.load(packed_ptr + e * stride_pe + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (4 - 4 * (flat % 2)).to(tl.int32)) & 0xF
    offset = tl.load(offset_ptr + e) if NESTED else 0.0
    scale = _absmax(
        absmax_ptr + e * stride_ae,
        nested_absmax_ptr + e * stride_ne,
        offset,
        nested_code_ptr,
        flat // BLOCKSIZE,
        mask,
        NESTED,
    )
    values = tl.where(mask, tl.load(code_ptr + nibble) * scale, 0.0)
    tl.store(out_ptr + e * stride_oe + flat, values.to(out_ptr.dtype.element_ty), mask=mask)
