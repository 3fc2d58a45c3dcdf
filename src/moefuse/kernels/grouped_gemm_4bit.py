"""Triton kernels of the experts' grouped GEMMs on 4-bit weights (bitsandbytes' NF4/FP4 blockwise format).

The twins of :mod:`moefuse.kernels.grouped_gemm`'s row kernels with the weight operand read from the 4-bit data
of :class:`moefuse.quant.ExpertWeights4bit`: each ``BLOCK_K x BLOCK_N`` weight tile is dequantised in registers
(4-bit code → code value × block absmax, the absmax itself from the nested statistics) right before its
``tl.dot``, so the weights cross memory at half a byte per value. The tile schedule, gather/scatter, epilogues
and autotune configs are those of the dense kernels. Weights are frozen here: there is no weight-gradient kernel.

Each expert's matrix ``W [out, in]`` is stored flat (``out * in`` values, row-major, two per byte, high nibble
first) in blocks of ``BLOCKSIZE`` values; a GEMM reads it either as ``B[n, k] = W[n, k]`` (forward, ``x·Wᵀ``)
or, ``TRANSPOSED``, as ``B[n, k] = W[k, n]`` (input gradient, ``dY·W``). :func:`_weight_tile` reads a tile along
``W``'s rows in both: packed bytes as vectors when ``in`` is even, one absmax per row and block when rows are
whole blocks (Qwen3, Mixtral, OLMoE widths at bitsandbytes' blocksize 64), each value on its own otherwise.

- :func:`grouped_gemm_4bit_kernel`: ``C[c_row(r)] = scale[r] * A[a_row(r)] @ B[e]ᵀ``.
- :func:`gate_up_swiglu_4bit_kernel`: the gate/up projection with SwiGLU in its epilogue.
- :func:`dequantize_4bit_kernel`: the dense stack, for the dequantise-then-GEMM path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grouped_gemm import (
    TILE_CONFIGS,
    _configs,
    _expert_tile,
    _gate_up_lora_terms,
    _lora_term,
    _prune,
    _row_offsets,
    _rows_epilogue,
    _swiglu_epilogue,
)


@triton.jit
def _absmax(absmax_ptr, nested_absmax_ptr, offset, nested_code_ptr, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of the blocks ``block`` (any shape; pointers at this expert), zero outside ``mask`` (the
    ``offset`` when ``NESTED``): ``absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + offset``."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        scale += offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset,
    code_ptr,
    nested_code_ptr,
    flat,
    mask,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
):
    """fp32 values at the int64 flat indices ``flat`` of one expert's matrix (pointers already at that expert),
    zero outside ``mask``: ``code[nibble] * absmax[block]``, every value gathered on its own (the dense
    dequantisation, and the GEMM tiles' fallback for odd ``in``)."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (4 - 4 * (flat % 2)).to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble)
    scale = _absmax(absmax_ptr, nested_absmax_ptr, offset, nested_code_ptr, flat // BLOCKSIZE, mask, NESTED)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _weight_tile(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset,
    code_ptr,
    nested_code_ptr,
    rows,
    row_mask,
    col0,
    in_features,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    EVEN_IN: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
):
    """fp32 ``W[rows, col0 : col0 + COLS]`` of one expert's ``W [out, in]`` (pointers at that expert): the
    columns are the contiguous direction of the packed data; ``col0`` is a multiple of ``COLS``. Values in
    masked rows (``row_mask``) or columns (``>= in``) are finite but not zero: the GEMM's other operand is zero
    there (masked ``k``) or their output is not stored (masked ``n``).

    ``EVEN_IN`` (``in`` even): every row starts on a byte, so the tile is ``COLS / 2`` contiguous bytes per
    row, loaded as vectors; each byte's two codes are looked up and interleaved (high nibble first).
    ``ROW_BLOCKS`` (``in`` a multiple of ``BLOCKSIZE``): every row starts a block, and as ``BLOCKSIZE`` and
    ``COLS`` are powers of two the tile's columns lie in one block (``BLOCKSIZE >= COLS``) or in
    ``COLS / BLOCKSIZE`` whole blocks, so the absmax is read once per row and block, not per value.
    Otherwise the fallback reads each value's byte or absmax on its own (:func:`_dequantize`'s way).
    """
    cols = col0 + tl.arange(0, COLS)
    rows = rows.to(tl.int64)
    if EVEN_IN:
        pairs = col0 // 2 + tl.arange(0, COLS // 2)
        byte_mask = row_mask[:, None] & (pairs < in_features // 2)[None, :]
        byte_ptrs = packed_ptr + rows[:, None] * (in_features // 2) + pairs[None, :]
        byte = tl.load(byte_ptrs, mask=byte_mask, other=0).to(tl.int32)
        # One lookup per value in the 16-entry code, 64 bytes: every lane of a warp reads the same L1 line, so
        # each lookup is one L1 wavefront (a 256-entry byte -> pair table, one lookup per byte, spreads a
        # warp's reads over 2 KiB, about 14 lines, and costs more L1 time than it saves in instructions).
        values = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF)))
    else:
        flat = rows[:, None] * in_features + cols[None, :]
        byte = tl.load(
            packed_ptr + flat // 2, mask=row_mask[:, None] & (cols < in_features)[None, :], other=0
        )
        values = tl.load(code_ptr + ((byte.to(tl.int32) >> (4 - 4 * (flat % 2)).to(tl.int32)) & 0xF))
    if ROW_BLOCKS:
        first_block = rows * (in_features // BLOCKSIZE) + col0 // BLOCKSIZE
        if BLOCKSIZE >= COLS:
            scale = _absmax(
                absmax_ptr, nested_absmax_ptr, offset, nested_code_ptr, first_block, row_mask, NESTED
            )
            values = values * scale[:, None]
        else:
            blocks = first_block[:, None] + tl.arange(0, COLS // BLOCKSIZE)[None, :]
            scale = _absmax(
                absmax_ptr, nested_absmax_ptr, offset, nested_code_ptr, blocks, row_mask[:, None], NESTED
            )
            values = tl.reshape(values, (ROWS, COLS // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None]
            values = tl.reshape(values, (ROWS, COLS))
    else:
        flat = rows[:, None] * in_features + cols[None, :]
        mask = row_mask[:, None] & (cols < in_features)[None, :]
        values = values * _absmax(
            absmax_ptr, nested_absmax_ptr, offset, nested_code_ptr, flat // BLOCKSIZE, mask, NESTED
        )
    return values


def _tile_layout(in_name: str):
    """The ``EVEN_IN`` / ``ROW_BLOCKS`` paths of :func:`_weight_tile` for the kernel argument holding ``in``."""
    return triton.heuristics(
        {
            "EVEN_IN": lambda args: args[in_name] % 2 == 0,
            "ROW_BLOCKS": lambda args: args[in_name] % args["BLOCKSIZE"] == 0,
        }
    )


@triton.jit
def _expert_offset(offset_ptr, expert, NESTED: tl.constexpr):
    if NESTED:
        return tl.load(offset_ptr + expert)
    return 0.0


@triton.jit
def _matmul_tile_4bit(
    a_ptr,
    a_rows,
    row_mask,
    stride_am,
    stride_ak,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset,
    code_ptr,
    nested_code_ptr,
    in_features,
    n0,
    N,
    K,
    TRANSPOSED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    EVEN_IN: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``sum_k A[a_rows, k] * B[offs_n, k]`` as an fp32 ``[BLOCK_M, BLOCK_N]`` tile, ``B`` this expert's 4-bit
    weight read forward (``W[n, k]``) or ``TRANSPOSED`` (``W[k, n]``), columns ``n0 + [0, BLOCK_N)``."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        ks = k * BLOCK_K + offs_k
        k_mask = ks < K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if TRANSPOSED:  # rows k, contiguous columns n
            b = _weight_tile(
                packed_ptr,
                absmax_ptr,
                nested_absmax_ptr,
                offset,
                code_ptr,
                nested_code_ptr,
                ks,
                k_mask,
                n0,
                in_features,
                BLOCK_K,
                BLOCK_N,
                BLOCKSIZE,
                NESTED,
                EVEN_IN,
                ROW_BLOCKS,
            )
        else:  # rows n, contiguous columns k
            b = tl.trans(
                _weight_tile(
                    packed_ptr,
                    absmax_ptr,
                    nested_absmax_ptr,
                    offset,
                    code_ptr,
                    nested_code_ptr,
                    offs_n,
                    offs_n < N,
                    k * BLOCK_K,
                    in_features,
                    BLOCK_N,
                    BLOCK_K,
                    BLOCKSIZE,
                    NESTED,
                    EVEN_IN,
                    ROW_BLOCKS,
                )
            )
        acc = tl.dot(a, b.to(a_ptr.dtype.element_ty), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.autotune(
    configs=_configs(TILE_CONFIGS),
    key=[
        "N",
        "K",
        "ROWS_PER_EXPERT",
        "GATHER_A",
        "SCATTER_C",
        "HAS_LORA",
        "TRANSPOSED",
        "BLOCKSIZE",
        "NESTED",
    ],
    prune_configs_by=_prune("N", "K", "a_ptr", four_bit=True),
    cache_results=True,
)
@_tile_layout("in_features")
@triton.jit
def grouped_gemm_4bit_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    c_ptr,
    m_sizes_ptr,
    a_index_ptr,
    c_index_ptr,
    scale_ptr,
    lora_t_ptr,
    lora_b_ptr,
    lora_mask_ptr,
    N,
    K,
    in_features,
    num_experts,
    ROWS_PER_EXPERT,
    lora_rank,
    stride_am,
    stride_ak,
    stride_pe,
    stride_ae,
    stride_ne,
    stride_cm,
    stride_cn,
    stride_ltm,
    stride_lbe,
    stride_lbn,
    stride_lbr,
    stride_lmm,
    TRANSPOSED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    LORA_MASK: tl.constexpr,
    LORA_R: tl.constexpr,
    PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_IN: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
):
    """``C[c_row(r), n] = scale[r] * (sum_k A[a_row(r), k] * B[e(r), n, k] + LoRA[r, n])``, ``B`` 4-bit (the
    LoRA term as in the dense kernel)."""
    pid = tl.program_id(0)
    expert, row0, row_end, pid_n = _expert_tile(
        pid, m_sizes_ptr, num_experts, (N + BLOCK_N - 1) // BLOCK_N, BLOCK_M, E_POW2
    )
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_rows = _row_offsets(a_index_ptr, rows, row_mask, GATHER_A)
    e = expert.to(tl.int64)
    acc = _matmul_tile_4bit(
        a_ptr,
        a_rows,
        row_mask,
        stride_am,
        stride_ak,
        packed_ptr + e * stride_pe,
        absmax_ptr + e * stride_ae,
        nested_absmax_ptr + e * stride_ne,
        _expert_offset(offset_ptr, e, NESTED),
        code_ptr,
        nested_code_ptr,
        in_features,
        pid_n * BLOCK_N,
        N,
        K,
        TRANSPOSED,
        BLOCKSIZE,
        NESTED,
        EVEN_IN,
        ROW_BLOCKS,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )

    if HAS_LORA:
        lora = (lora_t_ptr, lora_b_ptr, lora_mask_ptr, lora_rank)
        lora_strides = (stride_ltm, stride_lbe, stride_lbn, stride_lbr, stride_lmm)
        acc = _lora_term(
            acc, lora, lora_strides, expert, rows, offs_n, row_mask, n_mask, LORA_MASK, LORA_R, PRECISION
        )
    _rows_epilogue(
        acc,
        c_ptr,
        c_index_ptr,
        scale_ptr,
        rows,
        offs_n,
        row_mask,
        n_mask,
        stride_cm,
        stride_cn,
        SCATTER_C,
        SCALE_ROWS,
    )


@triton.autotune(
    configs=_configs(TILE_CONFIGS),
    key=["N", "K", "ROWS_PER_EXPERT", "STORE_GATE_UP", "HAS_LORA", "BLOCKSIZE", "NESTED"],
    prune_configs_by=_prune("N", "K", "x_ptr", weight_tiles=2, four_bit=True),
    cache_results=True,
)
@_tile_layout("K")
@triton.jit
def gate_up_swiglu_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    gate_up_ptr,
    h_ptr,
    scale_ptr,
    m_sizes_ptr,
    x_index_ptr,
    lora_t_ptr,
    lora_b_ptr,
    lora_mask_ptr,
    N,
    K,
    num_experts,
    ROWS_PER_EXPERT,
    lora_rank,
    stride_xm,
    stride_xk,
    stride_pe,
    stride_ae,
    stride_ne,
    stride_gm,
    stride_gn,
    stride_hm,
    stride_hn,
    stride_ltm,
    stride_lbe,
    stride_lbn,
    stride_lbr,
    stride_lmm,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    STORE_GATE_UP: tl.constexpr,
    SCALE_H: tl.constexpr,
    HAS_LORA: tl.constexpr,
    LORA_MASK: tl.constexpr,
    LORA_R: tl.constexpr,
    PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_IN: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
):
    """``h = silu(gate) * up`` for gathered rows ``X[x_row(r)]``, with the 4-bit ``W [E, 2N, K]`` (gate rows,
    then up rows): one program computes a column tile of both halves from the same loaded rows of ``X``.
    A LoRA term (``HAS_LORA``) joins the pre-activations; ``gate_up [rows, 2N]`` is written when ``STORE_GATE_UP``."""
    pid = tl.program_id(0)
    expert, row0, row_end, pid_n = _expert_tile(
        pid, m_sizes_ptr, num_experts, (N + BLOCK_N - 1) // BLOCK_N, BLOCK_M, E_POW2
    )
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = _row_offsets(x_index_ptr, rows, row_mask, True)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    e = expert.to(tl.int64)
    packed_ptr += e * stride_pe
    absmax_ptr += e * stride_ae
    nested_absmax_ptr += e * stride_ne
    offset = _expert_offset(offset_ptr, e, NESTED)

    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        ks = k * BLOCK_K + offs_k
        k_mask = ks < K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_gate = tl.trans(
            _weight_tile(
                packed_ptr,
                absmax_ptr,
                nested_absmax_ptr,
                offset,
                code_ptr,
                nested_code_ptr,
                offs_n,
                n_mask,
                k * BLOCK_K,
                K,
                BLOCK_N,
                BLOCK_K,
                BLOCKSIZE,
                NESTED,
                EVEN_IN,
                ROW_BLOCKS,
            )
        )
        w_up = tl.trans(  # the up rows follow the N gate rows
            _weight_tile(
                packed_ptr,
                absmax_ptr,
                nested_absmax_ptr,
                offset,
                code_ptr,
                nested_code_ptr,
                offs_n + N,
                n_mask,
                k * BLOCK_K,
                K,
                BLOCK_N,
                BLOCK_K,
                BLOCKSIZE,
                NESTED,
                EVEN_IN,
                ROW_BLOCKS,
            )
        )
        gate = tl.dot(x, w_gate.to(x_ptr.dtype.element_ty), gate, input_precision=PRECISION)
        up = tl.dot(x, w_up.to(x_ptr.dtype.element_ty), up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    if HAS_LORA:
        gate, up = _gate_up_lora_terms(
            gate,
            up,
            (lora_t_ptr, lora_b_ptr, lora_mask_ptr, lora_rank),
            (stride_ltm, stride_lbe, stride_lbn, stride_lbr, stride_lmm),
            expert,
            rows,
            offs_n,
            row_mask,
            n_mask,
            N,
            LORA_MASK,
            LORA_R,
            PRECISION,
        )
    _swiglu_epilogue(
        gate,
        up,
        gate_up_ptr,
        h_ptr,
        scale_ptr,
        rows,
        offs_n,
        row_mask,
        n_mask,
        N,
        stride_gm,
        stride_gn,
        stride_hm,
        stride_hn,
        STORE_GATE_UP,
        SCALE_H,
    )


@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    out_ptr,
    n,
    stride_pe,
    stride_ae,
    stride_ne,
    stride_oe,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[e, i] = W[e].flat[i]`` in the output's dtype; program ``(e, j)`` writes ``BLOCK`` values."""
    e = tl.program_id(0).to(tl.int64)
    flat = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    values = _dequantize(
        packed_ptr + e * stride_pe,
        absmax_ptr + e * stride_ae,
        nested_absmax_ptr + e * stride_ne,
        _expert_offset(offset_ptr, e, NESTED),
        code_ptr,
        nested_code_ptr,
        flat,
        mask,
        BLOCKSIZE,
        NESTED,
    )
    tl.store(out_ptr + e * stride_oe + flat, values.to(out_ptr.dtype.element_ty), mask=mask)
