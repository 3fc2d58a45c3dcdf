"""Routing on the GPU: a stable counting sort of the ``S = T * K`` assignments by expert, in two launches.

- :func:`routing_count_kernel`: each program counts its block of ``BLOCK`` assignments per expert
  (``counts [num_blocks, E]``).
- :func:`routing_scatter_kernel`: each program finds where its block's rows go (all rows of smaller experts,
  plus this expert's rows in earlier blocks), sorts the block by ``(expert, position)`` and writes every
  assignment's flat index and token at its grouped row, and its grouped row at its flat index. Program 0 also
  writes ``m_sizes`` and each expert's end row (int32, ``grouped_mm``'s ``offs``).
- :func:`grouped_rows_kernel`: a ``[T, H]`` tensor's rows copied into grouped order, token by token.
- :func:`token_sums_kernel`: the reverse, each token's ``K`` grouped rows summed into its row of ``[T, H]``.

Keys ``expert * BLOCK + position`` are unique, so the order inside an expert is the token order, as
``torch.argsort(stable=True)`` gives. No atomics: the result is the same on every run. An id outside ``[0, E)``
is left out of every expert (its grouped row is -1; the caller checks ids when they may be wrong). The launchers
are in :mod:`moefuse.ops.routing`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_ids(ids_ptr, block, S, E, BLOCK: tl.constexpr):
    """This block's expert ids as int32; past ``S`` and out of range: ``E`` (a bin that is never read)."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < S, other=E).to(tl.int32)
    return tl.where((ids >= 0) & (ids < E), ids, E)


# Sizes that follow the batch are not specialised on: one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["S"])
def routing_count_kernel(
    # Pointers
    ids_ptr,  # [S] expert id of each assignment (token-major: t * K + k)
    counts_ptr,  # [num_blocks, E] int32 out: each block's assignments per expert
    # Dimensions
    S,  # assignments: tokens * K
    E,  # experts
    # Metadata
    BLOCK: tl.constexpr,  # assignments per program
    BINS: tl.constexpr,  # E + 1 (the bin of ids out of range) as a power of two
):
    """``counts[b, e] = #{i in block b : ids[i] = e}``."""
    block = tl.program_id(0)
    counts = tl.histogram(_block_ids(ids_ptr, block, S, E, BLOCK), BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + block * E + bins, counts, mask=bins < E)


# Sizes that follow the batch are not specialised on: one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["S", "num_blocks"])
def routing_scatter_kernel(
    # Pointers
    ids_ptr,  # [S] expert id of each assignment (token-major: t * K + k)
    counts_ptr,  # [num_blocks, E] int32: routing_count_kernel's
    base_ptr,  # [num_blocks, BINS] int32 scratch: each block's first grouped row per expert
    m_sizes_ptr,  # [E] int64 out (written by program 0): rows per expert
    offsets_ptr,  # [E] int32 out (written by program 0): each expert's end row
    sorted_slots_ptr,  # [S] int64 out: the assignment at each grouped row
    token_index_ptr,  # [S] int64 out: the token at each grouped row
    grouped_row_ptr,  # [S] int64 out: each assignment's grouped row (-1 for an id out of range)
    # Dimensions
    S,  # assignments: tokens * K
    E,  # experts
    num_blocks,  # programs: S / BLOCK, rounded up
    top_k,  # K
    # Metadata
    BLOCK: tl.constexpr,  # assignments per program
    BINS: tl.constexpr,  # E + 1 (the bin of ids out of range) as a power of two
    CHUNK: tl.constexpr,  # blocks' counts loaded per step
):
    """``grouped_row[i] = sum_{e < ids[i]} m_sizes[e] + #{j < i : ids[j] = ids[i]}``, and its inverses
    ``sorted_slots`` and ``token_index`` (``sorted_slots // K``)."""
    block = tl.program_id(0)
    bins = tl.arange(0, BINS)
    # Every expert's rows in all blocks (totals) and in the blocks before this one, CHUNK blocks per load.
    totals = tl.zeros((BINS,), tl.int32)
    before = tl.zeros((BINS,), tl.int32)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        counts = tl.load(
            counts_ptr + blocks[:, None] * E + bins[None, :],
            mask=(blocks[:, None] < num_blocks) & (bins[None, :] < E),
            other=0,
        )
        totals += tl.sum(counts, 0)
        before += tl.sum(tl.where(blocks[:, None] < block, counts, 0), 0)
    if block == 0:
        tl.store(m_sizes_ptr + bins, totals.to(tl.int64), mask=bins < E)
        tl.store(offsets_ptr + bins, tl.cumsum(totals, 0), mask=bins < E)
    mine = tl.load(counts_ptr + block * E + bins, mask=bins < E, other=0)
    # The p-th row of this block in sorted order, of expert e, goes to row base[e] + p of the grouped order:
    # base = (rows of smaller experts) + (e's rows in earlier blocks) - (rows of smaller experts in this block).
    base = (tl.cumsum(totals, 0) - totals) + before - (tl.cumsum(mine, 0) - mine)
    # Triton cannot index a register vector by a tensor: base goes through this block's row of a scratch buffer.
    tl.store(base_ptr + block * BINS + bins, base)
    tl.debug_barrier()

    position = tl.arange(0, BLOCK)
    keys = tl.sort(_block_ids(ids_ptr, block, S, E, BLOCK) * BLOCK + position)
    expert = keys // BLOCK
    slot = block * BLOCK + keys % BLOCK
    valid = expert < E
    row = tl.load(base_ptr + block * BINS + expert, mask=valid, other=0) + position
    tl.store(sorted_slots_ptr + row, slot.to(tl.int64), mask=valid)
    tl.store(token_index_ptr + row, (slot // top_k).to(tl.int64), mask=valid)
    tl.store(grouped_row_ptr + slot, tl.where(valid, row, -1).to(tl.int64), mask=slot < S)


# Sizes that follow the batch are not specialised on: one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["T"])
def grouped_rows_kernel(
    # Pointers
    x_ptr,  # [T, H], unit column stride
    grouped_row_ptr,  # [S] each assignment's grouped row (-1: left out)
    out_ptr,  # [S, H] out, unit column stride
    # Dimensions
    T,
    H,
    top_k,  # K
    # Strides
    stride_x,
    stride_out,
    # Metadata
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # columns per program
):
    """``out[grouped_row[t * K + k]] = x[t]`` for every ``k``.

    Each block of token rows is read once and stored at its ``K`` grouped rows (a gather in grouped order would
    read every token ``K`` times). Rows of -1 (ids left out) are skipped."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < T
    col_mask = cols < H
    rows = tl.load(
        x_ptr + tokens.to(tl.int64)[:, None] * stride_x + cols[None, :],
        mask=token_mask[:, None] & col_mask[None, :],
    )
    for k in range(top_k):
        dest = tl.load(grouped_row_ptr + tokens.to(tl.int64) * top_k + k, mask=token_mask, other=-1)
        tl.store(
            out_ptr + dest[:, None] * stride_out + cols[None, :],
            rows,
            mask=(dest >= 0)[:, None] & col_mask[None, :],
        )


# Sizes that follow the batch are not specialised on: one compiled kernel serves every step's size.
@triton.jit(do_not_specialize=["T"])
def token_sums_kernel(
    # Pointers
    y_ptr,  # [S, H] in grouped order, unit column stride
    grouped_row_ptr,  # [S] each assignment's grouped row (-1: left out)
    out_ptr,  # [T, H] out, unit column stride
    # Dimensions
    T,
    H,
    # Strides
    stride_y,
    stride_out,
    # Metadata
    TOP_K: tl.constexpr,  # K
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # columns per program
):
    """``out[t] = sum_k y[grouped_row[t * K + k]]``, in fp32 and ``k`` order, rounded once to ``out``'s dtype.

    Rows of -1 (ids left out) add nothing. Each token's sum is taken in one program: no atomics."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < T
    col_mask = cols < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = tl.load(grouped_row_ptr + tokens.to(tl.int64) * TOP_K + k, mask=token_mask, other=-1)
        acc += tl.load(
            y_ptr + row[:, None] * stride_y + cols[None, :],
            mask=(row >= 0)[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & col_mask[None, :])
